"""Trains callbox's intent classifier and exports it to ONNX (called by models/convert.py).

Data: corpus.py (see README.md beside this file, the data card) — telemarketing_intent_cn,
MASSIVE zh-CN and CrossWOZ from ../shared, CPED and CLINC150, our templates for the labels
those lack, the ASR noise model on everything, joined fragments (two intents in one
utterance) and context pairs (a short reply whose meaning is the agent's last utterance).
Candidates (nets.py) are trained on `train` and chosen, with their threshold, by macro-F1 on
`val` only; the three test splits are scored once, for the report. Export: indices[n],
values[n] → probabilities[1, 13] (one sigmoid per label, or a softmax). Writes
intent/intent.onnx, intent/eval.tsv (the test splits), intent/parity.tsv (sentences with
their Python features, for the Rust twin's test) and returns the manifest entry.
"""

import csv
import json
import os
import time

import numpy as np

import corpus
import featurize
import nets

LABELS = ["price_inquiry", "product_question", "purchase_intent", "callback_request", "hesitation", "refusal",
          "complaint", "human_request", "budget_concern", "competitor_comparison", "customization_request",
          "do_not_call", "other"]
# (name, nets.train arguments); every sigmoid candidate is scored at each threshold.
CANDIDATES = [
    ("linear-softmax", {"hidden": 0, "output": "softmax", "epochs": 10}),
    ("linear-sigmoid", {"hidden": 0, "output": "sigmoid", "epochs": 15}),
    ("mlp32-sigmoid", {"hidden": 32, "output": "sigmoid", "epochs": 6}),
    ("mlp64-sigmoid", {"hidden": 64, "output": "sigmoid", "epochs": 6}),
]
THRESHOLDS = [0.2, 0.3, 0.5, 0.7]
TEST_SPLITS = ["test_tele", "test_tmpl", "test_clinc"]

# A keyword baseline for comparison (the first label with a keyword in the text wins).
KEYWORDS = {
    "price_inquiry": ["多少钱", "价格", "收费", "费用", "how much", "price", "cost", "fee"],
    "product_question": ["功能", "怎么办理", "支付", "分期", "include", "installment", "how does"],
    "purchase_intent": ["我要买", "办一个", "下单", "签约", "sign me up", "buy", "order"],
    "callback_request": ["开车", "晚点", "再打", "开会", "driving", "call me back", "later", "meeting"],
    "hesitation": ["考虑", "想想", "商量", "再说", "think", "not sure", "maybe"],
    "refusal": ["不需要", "不感兴趣", "不要", "not interested", "no thanks", "don't need"],
    "complaint": ["投诉", "骗", "太差", "complaint", "scam", "terrible", "fraud"],
    "human_request": ["人工", "机器人", "真人", "robot", "human", "real person", "agent"],
    "budget_concern": ["太贵", "预算", "便宜", "expensive", "afford", "budget", "cheaper"],
    "competitor_comparison": ["别家", "其他家", "competitor", "other company"],
    "customization_request": ["定制", "个性化", "customize", "custom", "tailor"],
    "do_not_call": ["别再打", "骚扰", "号码", "stop calling", "harassment", "my number"],
}


def keyword_baseline(text):
    t = text.lower()
    for label, words in KEYWORDS.items():
        if any(w in t for w in words):
            return label
    return "other"


def metrics(gold, pred, labels=None):
    """Accuracy, macro-F1 over the gold labels present, F1 per label."""
    acc = float(np.mean([g == p for g, p in zip(gold, pred)])) if gold else 0.0
    per_label = {}
    for label in labels or sorted(set(gold)):
        if label not in gold:
            continue
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        per_label[label] = round(2 * tp / max(2 * tp + fp + fn, 1), 4)
    macro = float(np.mean(list(per_label.values()))) if per_label else 0.0
    # The rows a user acts on (gold label not `other`): how many come out right, and the
    # macro-F1 over their labels (a reply read as `other` counts against its label).
    domain = [(g, p) for g, p in zip(gold, pred) if g != "other"]
    domain_f1 = [f for label, f in per_label.items() if label != "other"]
    return {"accuracy": round(acc, 4), "macro_f1": round(macro, 4), "n": len(gold), "f1": per_label,
            "domain_accuracy": round(float(np.mean([g == p for g, p in domain])), 4) if domain else None,
            "domain_macro_f1": round(float(np.mean(domain_f1)), 4) if domain_f1 else None}


def confusion(gold, pred):
    """{gold: {predicted: count}} for the data card."""
    out = {}
    for g, p in zip(gold, pred):
        out.setdefault(g, {}).setdefault(p, 0)
        out[g][p] += 1
    return out


def first_labels(params, X, output, threshold):
    probs = nets.probabilities(params, X, output)
    # Sigmoids: every label over the threshold counts, `other` only when none does; a
    # softmax answers its best label, `other` included.
    return [labels[0] for labels in nets.decide(probs, LABELS, threshold, other_wins=output == "softmax")]


def build(out, shared):
    """Trains the candidates, chooses on validation, reports the tests, exports the choice."""
    started = time.time()
    data = corpus.build(shared, template_variants=40, other_limit=5000)
    X = {name: nets.matrix(rows) for name, rows in data.items()}
    gold = {name: [r.labels[0] for r in rows] for name, rows in data.items()}
    Y = nets.targets(data["train"], LABELS)
    tried, trained = [], {}
    for name, args in CANDIDATES:
        t0 = time.time()
        params = nets.train(X["train"], Y, **args)
        trained[name] = params
        secs = round(time.time() - t0, 1)
        for threshold in (THRESHOLDS if args["output"] == "sigmoid" else [0.0]):
            report = metrics(gold["val"], first_labels(params, X["val"], args["output"], threshold))
            tried.append({"model": name, "threshold": threshold, "val_macro_f1": report["macro_f1"],
                          "val_accuracy": report["accuracy"], "train_secs": secs})
            print(f"  intent: {name} threshold {threshold}: validation macro-F1 {report['macro_f1']:.3f} "
                  f"accuracy {report['accuracy']:.3f} ({secs} s)")
    # On a tie the higher threshold wins: an unsure answer should rather be `other`.
    chosen = max(tried, key=lambda r: (r["val_macro_f1"], r["threshold"]))
    args = dict(CANDIDATES)[chosen["model"]]
    params, output, threshold = trained[chosen["model"]], args["output"], chosen["threshold"]
    print(f"  intent: chosen {chosen['model']} threshold {threshold}")
    report, matrices = {}, {}
    for split in TEST_SPLITS:
        pred = first_labels(params, X[split], output, threshold)
        report[split] = metrics(gold[split], pred, LABELS)
        report[split]["keyword_baseline"] = metrics(gold[split], [keyword_baseline(r.text) for r in data[split]])[
            "macro_f1"]
        matrices[split] = confusion(gold[split], pred)
        print(f"  intent: {split}: accuracy {report[split]['accuracy']:.3f} macro-F1 {report[split]['macro_f1']:.3f}"
              f" (keyword baseline {report[split]['keyword_baseline']:.3f}, n {report[split]['n']}); rows not"
              f" `other`: accuracy {report[split]['domain_accuracy']} macro-F1 {report[split]['domain_macro_f1']}")
    folder = os.path.join(out, "intent")
    os.makedirs(folder, exist_ok=True)
    model_path = os.path.join(folder, "intent.onnx")
    nets.export_onnx(params, model_path, len(LABELS), output)
    # The export must give what numpy gives (onnxruntime on a few rows).
    session = nets.onnx_session(model_path)
    for r in data["test_tele"][:20] + data["val"][-20:]:
        want = nets.probabilities(params, nets.matrix([r]), output)[0]
        got = nets.onnx_probabilities(session, r.text, r.context)
        assert np.abs(want - got).max() < 1e-4, (r, want, got)
    with open(os.path.join(folder, "eval.tsv"), "w", encoding="utf-8") as f:
        f.write("split\ttext\tcontext\tlabel\tlang\n")
        for split in TEST_SPLITS:
            for r in data[split]:
                f.write(f"{split}\t{r.text}\t{r.context}\t{r.labels[0]}\t{r.lang}\n")
    # Parity set: sentences and agent lines with the Python features, for the Rust twin.
    with open(os.path.join(folder, "parity.tsv"), "w", encoding="utf-8") as f:
        for r in [r for r in data["train"] if r.context][:500] + data["test_tele"][:500] + data["train"][:500]:
            feats = " ".join(f"{k}:{v:.7f}" for k, v in featurize.features_with_context(r.text, r.context))
            f.write(f"{r.text}\t{r.context}\t{feats}\n")
    counts = {}
    for r in data["train"]:
        for label in r.labels:
            counts.setdefault(r.lang, {}).setdefault(label, 0)
            counts[r.lang][label] += 1
    fields = {
        "labels": LABELS,
        "threshold": threshold,
        "output": output,
        "selection": {"chosen": chosen, "tried": tried},
        "featurizer": featurizer_entry(),
        "metrics": report,
        "confusion": matrices,
        "train_counts": counts,
        "train_secs": round(time.time() - started, 1),
    }
    return fields, {"model": "intent/intent.onnx", "eval": "intent/eval.tsv", "parity": "intent/parity.tsv"}


def featurizer_entry():
    return {"version": featurize.VERSION, "dims": featurize.DIMS, "context_dims": featurize.CONTEXT_DIMS,
            "n_min": featurize.N_MIN, "n_max": featurize.N_MAX}


# CPED's 13 emotion labels mapped to the text side of callbox's emotion.
SENTIMENTS = ["negative", "neutral", "positive"]
CPED_EMOTION = {"anger": "negative", "disgust": "negative", "depress": "negative", "sadness": "negative",
                "fear": "negative", "worried": "negative", "negative-other": "negative", "neutral": "neutral",
                "astonished": "neutral", "happy": "positive", "relaxed": "positive", "grateful": "positive",
                "positive-other": "positive"}


# telemarketing_intent_cn labels whose replies are hostile: negative for the text sentiment.
HOSTILE_LABELS = {"污言秽语", "不信任", "投诉警告", "骚扰电话"}


def build_sentiment(out, shared):
    """Text sentiment from CPED's emotion labels (mapped to three; split by dialogue) plus the
    insults, accusations and threats of telemarketing_intent_cn as negative (its own split)."""
    train, held, hostile_held = [], [], []
    with open(os.path.join(shared, "data/text/cped/valid_split.csv"), encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            text, label = row["Utterance"].strip(), CPED_EMOTION.get(row["Emotion"])
            if text and label:
                r = corpus.Row(text, (label,), "zh", "", "cped:" + row["Emotion"])
                (held if corpus.hash_bucket(row["Dialogue_ID"]) < 2 else train).append(r)
    for row in corpus.read_tsv(os.path.join(shared, "data/text/telemarketing_intent_cn/data.tsv")):
        if row["source_label"] in HOSTILE_LABELS:
            r = corpus.Row(row["text"].strip(), ("negative",), "zh", "", "tele")
            (hostile_held if row["split"] == "test" else train).append(r)
    args = {"hidden": 0, "output": "softmax", "epochs": 10, "l2": 1e-4}
    params = nets.train(nets.matrix(train), nets.targets(train, SENTIMENTS), **args)

    def predict(rows):
        return [SENTIMENTS[i] for i in nets.probabilities(params, nets.matrix(rows), "softmax").argmax(axis=1)]

    gold = [r.labels[0] for r in held]
    pred = predict(held)
    report = metrics(gold, pred)
    report["majority_baseline"] = metrics(gold, [max(SENTIMENTS, key=gold.count)] * len(gold))["macro_f1"]
    # Per CPED emotion: how often its utterances come out with the mapped sentiment.
    per_emotion = {}
    for r, g in zip(held, pred):
        e = per_emotion.setdefault(r.source[5:], [0, 0])
        e[0] += g == r.labels[0]
        e[1] += 1
    report["recall_by_cped_emotion"] = {k: round(v[0] / v[1], 3) for k, v in sorted(per_emotion.items())}
    report["hostile_replies_negative"] = round(predict(hostile_held).count("negative") / len(hostile_held), 3)
    folder = os.path.join(out, "intent")
    os.makedirs(folder, exist_ok=True)
    nets.export_onnx(params, os.path.join(folder, "sentiment.onnx"), len(SENTIMENTS), "softmax", "sentiment")
    counts = {s: sum(1 for r in train if r.labels[0] == s) for s in SENTIMENTS}
    fields = {
        "labels": SENTIMENTS,
        "output": "softmax",
        "featurizer": featurizer_entry(),
        "metrics": {"zh": report},
        "train_counts": counts,
    }
    return fields, {"model": "intent/sentiment.onnx"}


if __name__ == "__main__":
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    fields, _ = build(os.path.join(here, "..", "cache"), os.path.join(here, "..", "..", "..", "shared"))
    print(json.dumps({k: v for k, v in fields.items() if k != "train_counts"}, indent=1, ensure_ascii=False))
    sys.exit(0)
