"""Accuracy and tract-vs-onnxruntime check of the Whisper export on ../shared/data/speech.

For every clip in transcripts.tsv, at 16 kHz and as 8 kHz µ-law telephone audio (via sox):
  * onnxruntime greedy decoding of the same ONNX files, once on Whisper's 30-s window and
    once on callbox's length bucket (the smallest of --buckets holding the audio + 1 s);
  * callbox's own output (`callbox transcribe --json`, tract) on the whole clip;
  * CER of each against the reference (Chinese: characters; English: letters, case-folded,
    punctuation dropped; traditional → simplified with the models' OpenCC table first).
Run: models/cache/venv/bin/python models/whisper/evaluate.py --callbox target/release/callbox
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import time
import tempfile
import unicodedata
import wave

import numpy as np
import onnxruntime as ort

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import reference  # noqa: E402
sys.path.insert(0, os.path.dirname(HERE))

SPEECH = os.path.join(REPO, "..", "shared", "data", "speech")
CACHE = os.path.join(REPO, "models", "cache")


def load(path):
    with wave.open(path) as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1 and w.getframerate() == 16000, path
        return np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def telephone_copy(src, tmp):
    """The clip as a PBX carries it (phone band, 8 kHz µ-law) and that copy back at 16 kHz PCM."""
    phone = os.path.join(tmp, "phone.wav")
    back = os.path.join(tmp, "phone16k.wav")
    subprocess.run(["sox", "-D", src, "-r", "8000", "-e", "u-law", "-b", "8", phone, "sinc", "300-3400"], check=True)
    subprocess.run(["sox", "-D", phone, "-r", "16000", "-e", "signed", "-b", "16", back], check=True)
    return phone, back


class Normaliser:
    def __init__(self):
        table = {}
        with open(os.path.join(CACHE, "text", "zh-t2s.tsv"), encoding="utf-8") as f:
            for line in f:
                src, _, dst = line.rstrip("\n").partition("\t")
                if len(src) == 1:
                    table.setdefault(src, dst)
        self.t2s = table

    def __call__(self, text):
        text = "".join(self.t2s.get(c, c) for c in text).lower()
        return "".join(c for c in text if unicodedata.category(c)[0] in "LN")


def cross_attention(query, keys, values, heads=8):
    """One query [d] against one window's keys and values [frames, d], head by head."""
    d_head = query.shape[0] // heads
    q = query.reshape(heads, d_head)
    k = keys.reshape(-1, heads, d_head).transpose(1, 0, 2)
    v = values.reshape(-1, heads, d_head).transpose(1, 0, 2)
    scores = np.einsum("hd,htd->ht", q, k) / np.sqrt(d_head)
    scores = np.exp(scores - scores.max(axis=1, keepdims=True))
    scores /= scores.sum(axis=1, keepdims=True)
    return np.einsum("ht,htd->hd", scores, v).reshape(-1).astype(np.float32)


class OrtWhisper:
    def __init__(self, filters):
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        base = os.path.join(CACHE, "whisper-base")
        self.enc = ort.InferenceSession(os.path.join(base, "encoder.onnx"), so)
        self.dec = []
        while os.path.exists(os.path.join(base, f"decoder.{len(self.dec)}.onnx")):
            self.dec.append(ort.InferenceSession(os.path.join(base, f"decoder.{len(self.dec)}.onnx"), so))
        self.vocab = open(os.path.join(base, "tokens.txt"), encoding="utf-8").read().split("\n")
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        self.filters = filters

    def decode(self, audio, secs, lang, max_tokens_per_sec=12.0, suppress_blank=False):
        """Greedy decoding on a `secs` window; returns (token ids, encoder ms, decoder ms).
        `suppress_blank` also bans a blank first token, as callbox does."""
        n = int(secs * 16000)
        audio = audio[:n]
        t0 = time.perf_counter()
        mel = reference.log_mel(audio, self.filters, padding=n - len(audio))
        ck, cv = self.enc.run(None, {"mel": mel[None]})
        t1 = time.perf_counter()
        ctx = 448
        layers = len(self.dec) - 1
        sk = [np.zeros((1, 0, 512), np.float32) for _ in range(layers)]
        sv = [np.zeros((1, 0, 512), np.float32) for _ in range(layers)]
        prompt = [self.ids["<|startoftranscript|>"], self.ids[f"<|{lang}|>"], self.ids["<|transcribe|>"],
                  self.ids["<|notimestamps|>"]]
        eot = self.ids["<|endoftext|>"]
        blank = self.ids.get("Ġ") if suppress_blank else None
        budget = min(int(np.ceil(len(audio) / 16000 * max_tokens_per_sec)) + 4, ctx - len(prompt) - 1)
        out, toks = [], list(prompt)
        for pos in range(ctx - 1):
            # The decoder's parts, with Whisper's cross-attention between them (as callbox does).
            carried = {"token": np.array([toks[pos]], np.int64), "position": np.array([pos], np.int64)}
            for layer, part in enumerate(self.dec):
                if layer == layers:
                    lg = part.run(None, carried)[0]
                    break
                x, query, nk, nv = part.run(None, dict(carried, self_k=sk[layer], self_v=sv[layer],
                                                       self_mask=np.zeros((1, pos + 1), np.float32)))
                sk[layer] = np.concatenate([sk[layer], nk[:, None]], axis=1)
                sv[layer] = np.concatenate([sv[layer], nv[:, None]], axis=1)
                carried = {"x": x, "cross": cross_attention(query[0], ck[layer, 0], cv[layer, 0])[None]}
            if pos + 1 < len(toks):
                continue
            logits = lg[0].copy()
            logits[eot + 1:] = -np.inf
            if not out:
                logits[eot] = -np.inf
                if blank is not None:
                    logits[blank] = -np.inf
            nxt = int(logits.argmax())
            if nxt == eot or len(out) >= budget:
                break
            toks.append(nxt)
            out.append(nxt)
        return out, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000

    def transcribe(self, audio, secs, lang, max_tokens_per_sec=12.0):
        return reference.detokenize(self.vocab, self.decode(audio, secs, lang, max_tokens_per_sec)[0])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbox", required=True, help="callbox binary (tract side)")
    parser.add_argument("--buckets", default="2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,18,20,25,30")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    import io
    import tarfile
    sdist = os.path.join(CACHE, "wheels", "openai_whisper-20250625.tar.gz")
    if not os.path.exists(sdist):
        subprocess.run([sys.executable, os.path.join(HERE, "make_mel_reference.py")], check=True)
    with tarfile.open(sdist) as tar:
        npz = tar.extractfile("openai_whisper-20250625/whisper/assets/mel_filters.npz").read()
    filters = np.load(io.BytesIO(npz))["mel_80"]
    model = OrtWhisper(filters)
    norm = Normaliser()
    rows = []
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in csv.DictReader(open(os.path.join(SPEECH, "transcripts.tsv"), encoding="utf-8"), delimiter="\t"):
            src = os.path.join(SPEECH, row["file"])
            phone, back = telephone_copy(src, tmp)
            for variant, path in (("16k", src), ("8k-ulaw", phone)):
                audio = load(src if variant == "16k" else back)
                secs = len(audio) / 16000
                bucket = next((b for b in buckets if b >= secs + 1.0), buckets[-1])
                full = model.transcribe(audio, 30, row["lang"])
                bucketed = model.transcribe(audio, bucket, row["lang"])
                cfg = os.path.join(tmp, "cb.toml")
                open(cfg, "w").write(f"[speech]\nlanguage = \"{row['lang']}\"\nencoder_buckets_secs = [{args.buckets}]\n")
                out = subprocess.run([args.callbox, "--config", cfg, "transcribe", "--json", "--models", CACHE, path],
                                     capture_output=True, text=True, check=True)
                tract = " ".join(u["text"] for u in json.loads(out.stdout)["utterances"])
                ref = norm(row["transcript"])
                r = {"file": row["file"], "lang": row["lang"], "variant": variant, "bucket": bucket, "reference": row["transcript"]}
                for name, hyp in (("ort_30s", full), ("ort_bucket", bucketed), ("callbox", tract)):
                    r[name] = hyp
                    r[name + "_cer"] = edit_distance(norm(hyp), ref) / max(1, len(ref))
                    key = (row["lang"], variant, name)
                    e, n = totals.get(key, (0, 0))
                    totals[key] = (e + edit_distance(norm(hyp), ref), n + len(ref))
                r["bucket_matches_callbox"] = norm(bucketed) == norm(tract)
                rows.append(r)
                if not args.json:
                    print(f"{row['file']:<48} {variant:<8} b={bucket:>2}s  CER 30s {r['ort_30s_cer']:.3f}  "
                          f"bucket {r['ort_bucket_cer']:.3f}  callbox {r['callbox_cer']:.3f}  "
                          f"{'=' if r['bucket_matches_callbox'] else '≠'}  {tract}")
    summary = {f"{l}/{v}/{n}": round(e / max(1, c), 4) for (l, v, n), (e, c) in sorted(totals.items())}
    if args.json:
        print(json.dumps({"rows": rows, "cer": summary}, ensure_ascii=False))
    else:
        print("\nCER (edits / reference characters, pooled):")
        for k, v in summary.items():
            print(f"  {k:<28} {v:.3f}")


if __name__ == "__main__":
    main()
