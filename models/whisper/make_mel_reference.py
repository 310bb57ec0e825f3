"""Computes, once, the reference values the Rust log-mel front end is tested against.

Reference: openai-whisper 20250625's log_mel_spectrogram, ported to numpy in reference.py,
with the package's own mel_filters.npz. Writes tests/fixtures/whisper_mel_reference.json.
Run: models/cache/venv/bin/python models/whisper/make_mel_reference.py
"""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import wave

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import reference  # noqa: E402

SDIST = "openai_whisper-20250625.tar.gz"
SDIST_SHA256 = "37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96"
CLIP = "zh/BAC009S0764W0121.wav"
WINDOW_SECS = 5
EVERY = 25


def main():
    wheels = os.path.join(REPO, "models", "cache", "wheels")
    path = os.path.join(wheels, SDIST)
    if not os.path.exists(path):
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", wheels, "openai-whisper==20250625"], check=True)
    if hashlib.sha256(open(path, "rb").read()).hexdigest() != SDIST_SHA256:
        sys.exit(f"{path}: sha256 mismatch")
    with tarfile.open(path) as tar:
        npz = tar.extractfile("openai_whisper-20250625/whisper/assets/mel_filters.npz").read()
    filters = np.load(io.BytesIO(npz))["mel_80"]
    clip = os.path.join(REPO, "..", "shared", "data", "speech", CLIP)
    with wave.open(clip) as w:
        audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768.0
    n = WINDOW_SECS * 16000
    mel = reference.log_mel(audio[:n], filters, padding=max(0, n - len(audio)))
    out = {
        "source": "openai-whisper==20250625 log_mel_spectrogram (numpy port) and mel_filters.npz",
        "filters": {
            "band_sums": [float(x) for x in filters.sum(axis=1)],
            "band_peak_bins": [int(x) for x in filters.argmax(axis=1)],
            "band_peaks": [float(x) for x in filters.max(axis=1)],
        },
        "clip": CLIP,
        "window_secs": WINDOW_SECS,
        "frames": int(mel.shape[1]),
        "every": EVERY,
        "sampled_frames": [[round(float(v), 5) for v in mel[:, t]] for t in range(0, mel.shape[1], EVERY)],
        "mean": float(mel.mean()),
    }
    dest = os.path.join(REPO, "tests", "fixtures", "whisper_mel_reference.json")
    with open(dest, "w") as f:
        json.dump(out, f)
        f.write("\n")
    print(f"wrote {dest}: {mel.shape[1]} frames")


if __name__ == "__main__":
    main()
