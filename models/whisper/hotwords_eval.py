"""Hotwords measured: term recall and CER with and without an operator term list.

The terms are taken from the shared clips' own reference transcripts (names, places,
domain words a campaign list would hold) and given as ONE list for every clip, as a
campaign's list is given for every call: clips without a term show whether the list makes
the ASR write terms that were not said. Each clip is transcribed at 16 kHz and as its
phone-band 8 kHz µ-law copy by `callbox transcribe --json`, once per mode:
none, bias (`speech.hotword_mode = "bias"`, the default bias) and prompt.

  models/cache/venv/bin/python models/whisper/hotwords_eval.py --callbox target/release/callbox

Recall = occurrences of the terms in the hypotheses / in the references (after the same
normalisation as the CER: simplified characters, no punctuation, lower case); "false"
counts terms written where the reference does not have them. Pinned to one core, so the
RTF column is comparable to `bench asr`.
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SPEECH = os.path.join(REPO, "..", "shared", "data", "speech")
CACHE = os.path.join(REPO, "models", "cache")
sys.path.insert(0, HERE)
from evaluate import Normaliser, edit_distance, telephone_copy  # noqa: E402

# From the references in ../shared/data/speech/transcripts.tsv: place and organisation
# names, business words, a product-like phrase.
TERMS = ["房地产", "中介协会", "广州市", "交易", "停滞", "销售", "商场", "业绩", "汇报", "经理",
         "一首歌", "business", "convenient"]


def count(text, term):
    return text.count(term)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbox", required=True)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    norm = Normaliser()
    terms = [norm(t) for t in TERMS]
    modes = {"none": "", "bias": 'hotword_mode = "bias"', "prompt": 'hotword_mode = "prompt"'}
    totals = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in csv.DictReader(open(os.path.join(SPEECH, "transcripts.tsv"), encoding="utf-8"), delimiter="\t"):
            src = os.path.join(SPEECH, row["file"])
            phone, _ = telephone_copy(src, tmp)
            ref = norm(row["transcript"])
            for variant, path in (("16k", src), ("8k", phone)):
                for mode, line in modes.items():
                    cfg = os.path.join(tmp, "c.toml")
                    hot = "" if mode == "none" else f"hotwords = {json.dumps(TERMS, ensure_ascii=False)}\n{line}\n"
                    with open(cfg, "w", encoding="utf-8") as f:
                        f.write(f"[speech]\nlanguage = \"{row['lang']}\"\n{hot}")
                    out = subprocess.run(["taskset", "-c", "0", args.callbox, "--config", cfg, "transcribe", "--json",
                                          "--models", CACHE, path], capture_output=True, text=True, check=True)
                    report = json.loads(out.stdout)
                    hyp = norm(" ".join(u["text"] for u in report["utterances"]))
                    t = totals.setdefault((row["lang"], variant, mode), [0, 0, 0, 0, 0, 0.0, 0.0])
                    t[0] += edit_distance(ref, hyp)
                    t[1] += len(ref)
                    for term in terms:
                        r, h = count(ref, term), count(hyp, term)
                        t[2] += min(r, h)
                        t[3] += r
                        t[4] += max(0, h - r)
                    t[5] += report["real_time_factor"] * report["duration_secs"]
                    t[6] += report["duration_secs"]
                    if not args.json:
                        print(f"{row['file']:48} {variant:3} {mode:6} {hyp}")
    rows = []
    for (lang, variant, mode), (e, n, hit, want, false, compute, audio) in sorted(totals.items()):
        rows.append({"lang": lang, "variant": variant, "mode": mode, "cer": e / max(n, 1),
                     "term_recall": hit / max(want, 1), "terms_in_reference": want, "false_terms": false,
                     "rtf": compute / max(audio, 1e-9)})
    if args.json:
        print(json.dumps(rows, ensure_ascii=False))
        return
    print(f"{'set':12} {'mode':6} {'CER':>6} {'recall':>8} {'false':>6} {'RTF':>6}")
    for r in rows:
        print(f"{r['lang'] + ' ' + r['variant']:12} {r['mode']:6} {r['cer']:6.3f} "
              f"{r['term_recall']:5.2f} ({r['terms_in_reference']}) {r['false_terms']:6} {r['rtf']:6.3f}")


if __name__ == "__main__":
    main()
