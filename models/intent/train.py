"""Trains callbox's intent classifier and exports it to ONNX (called by models/convert.py).

Data (see README.md beside this file, the data card):
  * templates.py — hand-written domain examples, expanded with slot fillers and ASR-style
    noise (fillers, dropped characters, homophones, commas); templates at positions
    4, 9, 14, … of each label are evaluation-only, at 2, 7, 12, … validation-only;
  * ../shared/data/text/cped/valid_split.csv — Chinese TV dialogue as `other` (utterances
    with domain words left out), split by dialogue (2 of 10 buckets eval, 1 validation);
  * ../shared/data/text/clinc150/train_val.json — English: are_you_a_bot → human_request,
    maybe → hesitation, the other intents and out-of-scope → `other`; train → train
    (a tenth of it, by text hash, validation), val → eval.
Model: multinomial logistic regression over featurize.py's hashed character n-grams
(class-balanced, L2), full-batch Adam in numpy, seeded. L2 and the confidence threshold are
chosen on the validation split (mean of zh and en macro-F1); the chosen model is retrained
on train + validation and evaluated once on the evaluation split. Export: features[1, DIMS] → MatMul →
Add → Softmax. Writes intent/intent.onnx, intent/eval.tsv, intent/parity.tsv and returns
the manifest entry with labels, featurizer, threshold and held-out metrics.
"""

import csv
import json
import os
import random
import time

import numpy as np

import featurize
import templates

LABELS = ["price_inquiry", "product_question", "purchase_intent", "callback_request", "hesitation", "refusal",
          "complaint", "human_request", "budget_concern", "competitor_comparison", "customization_request",
          "do_not_call", "other"]
L2_GRID = [3e-4, 1e-4, 3e-5]
THRESHOLD_GRID = [0.0, 0.15, 0.3]
HELD_OUT_EVERY = 5
VALIDATION_AT = 2  # template position (mod HELD_OUT_EVERY) kept for choosing L2 and threshold
DOMAIN_WORDS = ["钱", "贵", "便宜", "买", "卖", "办", "投诉", "骗", "人工", "机器", "电话", "号码", "考虑", "不需要",
                "不用", "忙", "开车", "定制", "价格", "优惠", "预算", "滚"]

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


def fill(template, rng, lang):
    products = templates.PRODUCTS_ZH if lang == "zh" else templates.PRODUCTS_EN
    rivals = templates.COMPETITORS_ZH if lang == "zh" else templates.COMPETITORS_EN
    times = templates.TIMES_ZH if lang == "zh" else templates.TIMES_EN
    return template.replace("{p}", rng.choice(products)).replace("{c}", rng.choice(rivals)).replace(
        "{t}", rng.choice(times))


def noisy(text, rng, lang):
    """What ASR and phone speech do to a sentence."""
    if lang == "zh":
        chars = [c for c in text if c != " " or rng.random() < 0.5]
        chars = [templates.HOMOPHONES_ZH.get(c, c) if rng.random() < 0.08 else c for c in chars]
        if len(chars) > 4 and rng.random() < 0.25:
            del chars[rng.randrange(len(chars))]
        if len(chars) > 3 and rng.random() < 0.3:
            chars.insert(rng.randrange(1, len(chars)), "，")
        text = "".join(chars)
        if rng.random() < 0.4:
            text = rng.choice(templates.FILLERS_ZH) + rng.choice(["，", "", " "]) + text
        if rng.random() < 0.2:
            text += rng.choice(["啊", "吧", "呢", "。", "？", "嘛"])
    else:
        words = text.split()
        if len(words) > 3 and rng.random() < 0.2:
            del words[rng.randrange(len(words))]
        text = " ".join(words)
        if rng.random() < 0.4:
            text = rng.choice(templates.FILLERS_EN) + rng.choice([", ", " "]) + text
        if rng.random() < 0.3:
            text = text.capitalize() + rng.choice([".", "?", ""])
    return text


def domain_examples(rng, variants):
    train, val, held = [], [], []
    for lang, table in (("zh", templates.ZH), ("en", templates.EN)):
        for label, rows in table.items():
            for i, template in enumerate(rows):
                position = i % HELD_OUT_EVERY
                target = held if position == HELD_OUT_EVERY - 1 else val if position == VALIDATION_AT else train
                n = variants if target is train else max(3, variants // 4)
                for _ in range(n):
                    target.append((noisy(fill(template, rng, lang), rng, lang), label, lang))
    return train, val, held


def cped_other(shared, rng):
    train, val, held = [], [], []
    with open(os.path.join(shared, "data/text/cped/valid_split.csv"), encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            text = row["Utterance"].strip()
            if not text or any(w in text for w in DOMAIN_WORDS):
                continue
            bucket = hash_bucket(row["Dialogue_ID"])
            target = held if bucket < 2 else val if bucket == 2 else train
            target.append((text, "other", "zh"))
    rng.shuffle(train)
    return train[:3000], val[:300], held[:600]


def clinc(shared, rng):
    with open(os.path.join(shared, "data/text/clinc150/train_val.json"), encoding="utf-8") as f:
        data = json.load(f)

    def convert(items, other_keep):
        out = []
        for text, intent in items:
            label = templates.CLINC_MAP.get(intent, "other")
            if label == "other" and rng.random() > other_keep:
                continue
            out.append((text, label, "en"))
        return out

    train = convert(data["train"], 0.15) + [(t, "other", "en") for t, _ in data["oos_train"]]
    val = [row for row in train if hash_bucket(row[0]) == 0]
    train = [row for row in train if hash_bucket(row[0]) != 0]
    held = convert(data["val"], 0.15) + [(t, "other", "en") for t, _ in data["oos_val"]]
    return train, val, held


def hash_bucket(key, buckets=10):
    return featurize.fnv1a(key.encode()) % buckets


def to_sparse(texts):
    rows, idx, val = [], [], []
    for r, text in enumerate(texts):
        for k, v in featurize.features(text):
            rows.append(r)
            idx.append(k)
            val.append(v)
    return np.array(rows), np.array(idx), np.array(val, np.float32)


def logits_of(W, b, sparse, n):
    rows, idx, val = sparse
    out = np.tile(b, (n, 1)).astype(np.float32)
    contrib = W[idx] * val[:, None]
    for c in range(W.shape[1]):
        out[:, c] += np.bincount(rows, weights=contrib[:, c], minlength=n)
    return out


def softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train_model(texts, labels, epochs=150, lr=0.1, l2=1e-4, seed=7, names=None):
    names = names or LABELS
    n, c = len(texts), len(names)
    sparse = to_sparse(texts)
    rows, idx, val = sparse
    y = np.array([names.index(label) for label in labels])
    counts = np.bincount(y, minlength=c).astype(np.float32)
    weights = (n / (c * np.maximum(counts, 1)))[y].astype(np.float32)
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((featurize.DIMS, c)) * 0.001).astype(np.float32)
    b = np.zeros(c, np.float32)
    m_w, v_w, m_b, v_b = np.zeros_like(W), np.zeros_like(W), np.zeros_like(b), np.zeros_like(b)
    onehot = np.eye(c, dtype=np.float32)[y]
    for step in range(1, epochs + 1):
        p = softmax(logits_of(W, b, sparse, n))
        g = (p - onehot) * weights[:, None] / weights.sum()
        gW = np.zeros_like(W)
        for k in range(c):
            gW[:, k] = np.bincount(idx, weights=val * g[rows, k], minlength=featurize.DIMS)
        gW += l2 * W
        gb = g.sum(axis=0)
        for param, grad, m, v in ((W, gW, m_w, v_w), (b, gb, m_b, v_b)):
            m *= 0.9
            m += 0.1 * grad
            v *= 0.999
            v += 0.001 * grad * grad
            param -= lr * (m / (1 - 0.9 ** step)) / (np.sqrt(v / (1 - 0.999 ** step)) + 1e-8)
    return W, b


def predict(W, b, texts, threshold):
    probs = softmax(logits_of(W, b, to_sparse(texts), len(texts)))
    best = probs.argmax(axis=1)
    return [LABELS[i] if probs[r, i] >= threshold else "other" for r, i in enumerate(best)]


def per_language(rows, pred):
    """Metrics per language of (text, gold, lang) rows against predictions."""
    report = {}
    for lang in ("zh", "en"):
        pairs = [(g, p, t) for (t, g, la), p in zip(rows, pred) if la == lang]
        report[lang] = metrics([g for g, _, _ in pairs], [p for _, p, _ in pairs])
        report[lang]["keyword_baseline"] = metrics([g for g, _, _ in pairs], [keyword_baseline(t) for _, _, t in pairs])
    return report


def select(train, val):
    """Every (L2, threshold) of the grid trained on train and scored on validation only."""
    tried = []
    for l2 in L2_GRID:
        W, b = train_model([t for t, _, _ in train], [label for _, label, _ in train], l2=l2)
        for threshold in THRESHOLD_GRID:
            report = per_language(val, predict(W, b, [t for t, _, _ in val], threshold))
            score = (report["zh"]["macro_f1"] + report["en"]["macro_f1"]) / 2
            tried.append({"l2": l2, "threshold": threshold, "val_macro_f1_zh": report["zh"]["macro_f1"],
                          "val_macro_f1_en": report["en"]["macro_f1"], "score": round(score, 4)})
    # On a tie the higher threshold wins: an unsure answer should rather be `other`.
    best = max(tried, key=lambda r: (r["score"], r["threshold"]))
    return best, tried


def metrics(gold, pred):
    acc = float(np.mean([g == p for g, p in zip(gold, pred)])) if gold else 0.0
    f1s = []
    for label in sorted(set(gold)):
        tp = sum(g == label and p == label for g, p in zip(gold, pred))
        fp = sum(g != label and p == label for g, p in zip(gold, pred))
        fn = sum(g == label and p != label for g, p in zip(gold, pred))
        f1s.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": round(acc, 4), "macro_f1": round(float(np.mean(f1s)), 4), "n": len(gold)}


def export_onnx(W, b, path, n_labels=len(LABELS)):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["features", "weights"], ["logits_raw"]),
         helper.make_node("Add", ["logits_raw", "bias"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1)],
        "intent",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, featurize.DIMS])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, n_labels])],
        [numpy_helper.from_array(W.astype(np.float32), "weights"), numpy_helper.from_array(b.astype(np.float32), "bias")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="callbox-intent")
    model.ir_version = 8
    onnx.checker.check_model(model)
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def build(out, shared):
    """Trains, evaluates, exports; returns (manifest fields, files written)."""
    started = time.time()
    rng = random.Random(20261122)
    dom_train, dom_val, dom_held = domain_examples(rng, variants=12)
    cped_train, cped_val, cped_held = cped_other(shared, rng)
    clinc_train, clinc_val, clinc_held = clinc(shared, rng)
    train = dom_train + cped_train + clinc_train
    val = dom_val + cped_val + clinc_val
    held = dom_held + cped_held + clinc_held
    rng.shuffle(train)
    chosen, tried = select(train, val)
    for row in tried:
        print(f"  intent: l2 {row['l2']:g} threshold {row['threshold']}: validation macro-F1 "
              f"zh {row['val_macro_f1_zh']:.3f} en {row['val_macro_f1_en']:.3f}")
    print(f"  intent: chosen l2 {chosen['l2']:g} threshold {chosen['threshold']}; retrained on train + validation")
    train = train + val
    W, b = train_model([t for t, _, _ in train], [label for _, label, _ in train], l2=chosen["l2"])
    threshold = chosen["threshold"]
    report = per_language(held, predict(W, b, [t for t, _, _ in held], threshold))
    folder = os.path.join(out, "intent")
    os.makedirs(folder, exist_ok=True)
    export_onnx(W, b, os.path.join(folder, "intent.onnx"))
    with open(os.path.join(folder, "eval.tsv"), "w", encoding="utf-8") as f:
        f.write("text\tlabel\tlang\n")
        for text, label, lang in held:
            f.write(f"{text}\t{label}\t{lang}\n")
    # Parity set: held-out and training sentences with the Python features, for the Rust twin.
    with open(os.path.join(folder, "parity.tsv"), "w", encoding="utf-8") as f:
        for text, _, _ in (held + train)[:1500]:
            feats = " ".join(f"{k}:{v:.7f}" for k, v in featurize.features(text))
            f.write(f"{text}\t{feats}\n")
    counts = {}
    for _, label, lang in train:
        counts.setdefault(lang, {}).setdefault(label, 0)
        counts[lang][label] += 1
    fields = {
        "labels": LABELS,
        "threshold": threshold,
        "selection": {"chosen": chosen, "tried": tried},
        "featurizer": {"version": featurize.VERSION, "dims": featurize.DIMS, "n_min": featurize.N_MIN,
                       "n_max": featurize.N_MAX},
        "metrics": report,
        "train_counts": counts,
        "train_secs": round(time.time() - started, 1),
    }
    return fields, {"model": "intent/intent.onnx", "eval": "intent/eval.tsv", "parity": "intent/parity.tsv"}


# CPED's 13 emotion labels mapped to the text side of callbox's emotion.
SENTIMENTS = ["negative", "neutral", "positive"]
CPED_EMOTION = {"anger": "negative", "disgust": "negative", "depress": "negative", "sadness": "negative",
                "fear": "negative", "worried": "negative", "negative-other": "negative", "neutral": "neutral",
                "astonished": "neutral", "happy": "positive", "relaxed": "positive", "grateful": "positive",
                "positive-other": "positive"}


def build_sentiment(out, shared):
    """Text sentiment from CPED's emotion labels (mapped to three), split by dialogue."""
    train, held = [], []
    with open(os.path.join(shared, "data/text/cped/valid_split.csv"), encoding="utf-8-sig") as f:
        for row in csv.DictReader(f):
            text, label = row["Utterance"].strip(), CPED_EMOTION.get(row["Emotion"])
            if text and label:
                (held if hash_bucket(row["Dialogue_ID"]) < 2 else train).append((text, label))
    W, b = train_model([t for t, _ in train], [label for _, label in train], l2=3e-4, names=SENTIMENTS)
    probs = softmax(logits_of(W, b, to_sparse([t for t, _ in held]), len(held)))
    pred = [SENTIMENTS[i] for i in probs.argmax(axis=1)]
    gold = [label for _, label in held]
    report = metrics(gold, pred)
    report["majority_baseline"] = metrics(gold, [max(SENTIMENTS, key=[g for g in gold].count)] * len(gold))
    # Per CPED emotion: how often its utterances come out with the mapped sentiment.
    per_emotion = {}
    with open(os.path.join(shared, "data/text/cped/valid_split.csv"), encoding="utf-8-sig") as f:
        rows = [r for r in csv.DictReader(f) if hash_bucket(r["Dialogue_ID"]) < 2 and r["Utterance"].strip()]
    texts = [r["Utterance"].strip() for r in rows]
    got = [SENTIMENTS[i] for i in softmax(logits_of(W, b, to_sparse(texts), len(texts))).argmax(axis=1)]
    for r, g in zip(rows, got):
        e = per_emotion.setdefault(r["Emotion"], [0, 0])
        e[0] += g == CPED_EMOTION[r["Emotion"]]
        e[1] += 1
    report["recall_by_cped_emotion"] = {k: round(v[0] / v[1], 3) for k, v in sorted(per_emotion.items())}
    folder = os.path.join(out, "intent")
    os.makedirs(folder, exist_ok=True)
    export_onnx(W, b, os.path.join(folder, "sentiment.onnx"), len(SENTIMENTS))
    counts = {s: sum(1 for _, label in train if label == s) for s in SENTIMENTS}
    fields = {
        "labels": SENTIMENTS,
        "featurizer": {"version": featurize.VERSION, "dims": featurize.DIMS, "n_min": featurize.N_MIN,
                       "n_max": featurize.N_MAX},
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
