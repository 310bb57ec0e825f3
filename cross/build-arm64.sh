#!/usr/bin/env bash
# Reproducible arm64 build: compiles with Debian's toolchain, runs the whole
# test suite under qemu-user, and packages the arm64 .deb.
# The tests are built in the release profile so that one compilation serves
# both the tests and the package (halves the CI time on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=cross/env.sh
. cross/env.sh
target="$CALLBOX_CROSS_TARGET"

"$CARGO" --version
"$RUSTC" --version
"$CARGO" test --release --locked --target "$target" --no-fail-fast
"$CARGO" build --release --locked --target "$target" -p callbox
file "target/$target/release/callbox"
bash packaging/build-deb.sh "$target"
