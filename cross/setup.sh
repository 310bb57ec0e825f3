#!/usr/bin/env bash
# Installs the Debian packages the arm64 build needs (idempotent; needs root).
set -euo pipefail
if ! grep -qx arm64 <<<"$(dpkg --print-foreign-architectures)"; then
    dpkg --add-architecture arm64
    apt-get update -q
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu libc6-dev-arm64-cross \
    libasound2-dev:arm64 qemu-user-static pkg-config
