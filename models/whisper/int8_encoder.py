"""Makes a models folder whose Whisper encoder has int8 MatMuls (onnxruntime's
quantize_dynamic), everything else linked to models/cache: an experiment, not shipped
(README, "An int8 encoder, measured again").

Run: models/cache/venv/bin/python models/whisper/int8_encoder.py --out /tmp/q8/m_s8 [--uint8]
then compare: callbox bench asr --models /tmp/q8/m_s8, or compare_faster_whisper.py with
--config 'models_dir = "/tmp/q8/m_s8"'.
"""

import argparse
import hashlib
import json
import os
import shutil

from onnxruntime.quantization import QuantType, quantize_dynamic

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(os.path.dirname(HERE), "cache")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--uint8", action="store_true", help="uint8 weights (default int8)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    os.makedirs(os.path.join(args.out, "whisper-base"))
    for name in os.listdir(CACHE):
        if name not in ("venv", "fw-venv", "wheels", "manifest.json", "whisper-base"):
            os.symlink(os.path.join(CACHE, name), os.path.join(args.out, name))
    for name in os.listdir(os.path.join(CACHE, "whisper-base")):
        if name != "encoder.onnx":
            os.symlink(os.path.join(CACHE, "whisper-base", name), os.path.join(args.out, "whisper-base", name))
    encoder = os.path.join(args.out, "whisper-base", "encoder.onnx")
    quantize_dynamic(os.path.join(CACHE, "whisper-base", "encoder.onnx"), encoder, op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QUInt8 if args.uint8 else QuantType.QInt8)
    with open(os.path.join(CACHE, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(encoder, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    for model in manifest["models"]:
        if model.get("family") == "whisper":
            model["files"]["encoder"]["sha256"] = digest
            model["precision"] = "encoder MatMuls int8 (dynamic), decoder as models/cache"
    with open(os.path.join(args.out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    print(f"{args.out}: encoder {os.path.getsize(encoder) / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
