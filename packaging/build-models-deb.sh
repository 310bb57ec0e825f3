#!/usr/bin/env bash
# Builds the callbox-models .deb (Architecture: all) from what models/build.sh made:
# models/cache/manifest.json, every file it lists, and the demo call, installed to
# /usr/share/callbox/models (speech.models_dir's default). The daemon package
# Recommends it, so a branch box never needs Python or the package registry.
#   packaging/build-models-deb.sh            # -> target/debian/callbox-models_<version>_all.deb
# Version: models/RELEASE (bump it when the models change) + the manifest's digest, so
# two different model sets never share a version and a newer release upgrades.
set -euo pipefail
cd "$(dirname "$0")/.."
cache=models/cache
manifest=$cache/manifest.json
if [ ! -f "$manifest" ]; then
    echo "build-models-deb: no $manifest; run bash models/build.sh first" >&2
    exit 66
fi
release=$(tr -d '[:space:]' < models/RELEASE)
digest=$(sha256sum "$manifest" | cut -c1-12)
version="$release+m$digest-1"
name=callbox-models
prefix=usr/share/callbox/models

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$work/pkg
mkdir -p "$root/DEBIAN" "$root/$prefix" "$root/usr/share/doc/$name" "$root/usr/share/lintian/overrides"
install -m 0644 packaging/lintian-overrides-models "$root/usr/share/lintian/overrides/$name"

# The manifest names every file the daemon verifies; copy exactly those (and check
# each digest now, so a package never ships a file its own manifest refuses).
python3 - "$manifest" > "$work/files" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
for model in m["models"]:
    for f in model["files"].values():
        print(f["sha256"], f["path"])
EOF
(cd "$cache" && sha256sum --quiet --strict -c) < "$work/files"
cp "$manifest" "$root/$prefix/"
while read -r _ path; do
    install -D -m 0644 "$cache/$path" "$root/$prefix/$path"
done < "$work/files"
if [ -f "$cache/demo/call.wav" ]; then
    install -D -m 0644 "$cache/demo/call.wav" "$root/$prefix/demo/call.wav"
    install -D -m 0644 "$cache/demo/call.txt" "$root/$prefix/demo/call.txt"
else
    echo "build-models-deb: no $cache/demo/call.wav (espeak-ng missing?): callbox demo will need --call" >&2
fi

# Copyright (DEP-5) from the manifest's own license and source fields.
python3 - "$manifest" > "$root/usr/share/doc/$name/copyright" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
print("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/")
print("Upstream-Name: callbox-models")
print("Comment: Models for callbox, built by models/build.sh from pinned, sha256-checked")
print(" sources. Each model's license and sources, as its manifest entry records them:")
for model in m["models"]:
    print(" .")
    print(f" {model['name']} ({model['task']}): {model['license']}")
    for source in model["source"]:
        print(f"   source: {source}")
print()
print("Files: *")
print("Copyright: 2026 callbox team and the upstream authors named above")
print("License: MIT and Apache-2.0 and CC-BY-3.0 and CC-BY-4.0")
print(" The models carry the licenses listed in the Comment above; their full texts are in")
print(" /usr/share/common-licenses/Apache-2.0 and at https://opensource.org/license/mit and")
print(" https://creativecommons.org/licenses/by/3.0/legalcode and")
print(" https://creativecommons.org/licenses/by/4.0/legalcode .")
EOF
{
    echo "$name ($version) unstable; urgency=medium"
    echo
    echo "  * Models release $release; manifest sha256 $digest."
    echo
    echo " -- callbox team <callbox@example.invalid>  $(date -R -d @"$(stat -c %Y "$manifest")")"
} | gzip -9n > "$root/usr/share/doc/$name/changelog.Debian.gz"

installed_kib=$(du -sk --apparent-size "$root/usr" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: $name
Version: $version
Architecture: all
Maintainer: callbox team <callbox@example.invalid>
Installed-Size: $installed_kib
Section: misc
Priority: optional
Enhances: callbox
Description: speech, VAD and intent models for callbox
 Whisper base (ASR, converted to ONNX), Silero VAD, the intent and sentiment
 classifiers and the Traditional-to-Simplified Chinese table, with the
 manifest (file digests) the daemon checks at start, and the sample call for
 "callbox demo". Installed to /usr/share/callbox/models, where callbox looks
 by default.
EOF
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z \
    | xargs -0 md5sum > DEBIAN/md5sums)
chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/md5sums"
find "$root" -type d -exec chmod 0755 {} +
mkdir -p target/debian
deb="target/debian/${name}_${version}_all.deb"
# xz level 1: lintian takes only gz and xz; level 6 takes minutes on 2 cores for ~10 % less.
dpkg-deb --root-owner-group -Zxz -z1 -b "$root" "$deb" >/dev/null
echo "$deb"
