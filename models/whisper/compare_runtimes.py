"""tract vs onnxruntime on the very same ONNX files and audio: speed ratios and token identity.

For every clip in ../shared/data/speech/transcripts.tsv (16 kHz), as one utterance on
callbox's encoder bucket (the smallest of --buckets holding the clip + 1 s), alternating
runtimes round by round so that machine drift hits both:
  * onnxruntime (one intra-op thread): log-mel (numpy reference), encoder, greedy decoder
    with callbox's rules (no special token but end-of-text; neither blank nor end-of-text
    first; budget of 12 tokens per second + 4);
  * tract: `callbox bench asr --whole --json --runs 2 FILE` (its own Rust front end, the
    measured run after a warm-up).
Prints per clip the encoder and per-token decoder times of both and their ratios
(tract / onnxruntime), and whether the generated token ids are identical. Exit 1 if any
clip's tokens differ.

Run: models/cache/venv/bin/python models/whisper/compare_runtimes.py --callbox target/release/callbox
"""

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import evaluate  # noqa: E402  (OrtWhisper's sessions, paths, clip loader)


def tract_run(callbox, models, path, lang):
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as config:
        config.write(f'[speech]\nlanguage = "{lang}"\n')
        config.flush()
        out = subprocess.run([callbox, "--config", config.name, "bench", "asr", "--whole", "--json", "--runs", "2",
                              "--models", models, path], check=True, capture_output=True, text=True)
    row = next(r for r in json.loads(out.stdout)["rows"] if not r["telephone"])
    return row["token_ids"], row["encoder_ms"], row["decoder_ms"]


def bucket_for(samples, buckets):
    need = samples + 16000
    return next((b for b in buckets if b * 16000 >= need), buckets[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbox", required=True, help="callbox binary (release build)")
    parser.add_argument("--buckets", default="4,8,15,30")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    buckets = [int(b) for b in args.buckets.split(",")]
    sdist = os.path.join(evaluate.CACHE, "wheels", "openai_whisper-20250625.tar.gz")
    if not os.path.exists(sdist):
        subprocess.run([sys.executable, os.path.join(HERE, "make_mel_reference.py")], check=True)
    with tarfile.open(sdist) as tar:
        npz = tar.extractfile("openai_whisper-20250625/whisper/assets/mel_filters.npz").read()
    ort_model = evaluate.OrtWhisper(np.load(io.BytesIO(npz))["mel_80"])
    rows, mismatched = [], 0
    with open(os.path.join(evaluate.SPEECH, "transcripts.tsv"), encoding="utf-8") as f:
        clips = [(r["file"], r["lang"]) for r in csv.DictReader(f, delimiter="\t")]
    for clip, lang in clips:
        path = os.path.join(evaluate.SPEECH, clip)
        audio = evaluate.load(path)
        secs = bucket_for(len(audio), buckets)
        o_enc, o_dec, t_enc, t_dec = [], [], [], []
        for _ in range(args.rounds):
            # callbox's greedy rules: no special token but end-of-text, no blank or end first.
            o_tokens, enc, dec = ort_model.decode(audio, secs, lang, suppress_blank=True)
            o_enc.append(enc)
            o_dec.append(dec)
            t_tokens, enc, dec = tract_run(args.callbox, evaluate.CACHE, path, lang)
            t_enc.append(enc)
            t_dec.append(dec)
        steps = max(len(o_tokens) + 4, 1)
        same = o_tokens == t_tokens
        first_diff = next((i for i, (a, b) in enumerate(zip(o_tokens, t_tokens)) if a != b),
                          None if same else min(len(o_tokens), len(t_tokens)))
        mismatched += not same
        row = {
            "clip": clip, "audio_secs": round(len(audio) / 16000, 2), "bucket_secs": secs,
            "tokens": len(o_tokens), "identical": same, "first_difference": first_diff,
            "ort_encoder_ms": statistics.median(o_enc), "tract_encoder_ms": statistics.median(t_enc),
            "ort_ms_per_step": statistics.median(o_dec) / steps, "tract_ms_per_step": statistics.median(t_dec) / steps,
        }
        row["encoder_ratio"] = row["tract_encoder_ms"] / row["ort_encoder_ms"]
        row["decoder_ratio"] = row["tract_ms_per_step"] / row["ort_ms_per_step"]
        rows.append(row)
        if not args.json:
            print(f"{clip:<34} {row['audio_secs']:>5.1f}s/{secs:>2}s  enc ort {row['ort_encoder_ms']:6.0f} "
                  f"tract {row['tract_encoder_ms']:6.0f} ms ×{row['encoder_ratio']:.2f}   step ort "
                  f"{row['ort_ms_per_step']:5.1f} tract {row['tract_ms_per_step']:5.1f} ms ×{row['decoder_ratio']:.2f}"
                  f"   {len(o_tokens):3} tokens {'identical' if same else f'DIFFER at {first_diff}'}")
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=1))
    else:
        enc = statistics.median(r["encoder_ratio"] for r in rows)
        dec = statistics.median(r["decoder_ratio"] for r in rows)
        print(f"median tract/onnxruntime: encoder ×{enc:.2f}, decoder step ×{dec:.2f}; "
              f"{len(rows) - mismatched}/{len(rows)} clips token-identical")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
