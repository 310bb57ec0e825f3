# shellcheck shell=bash
# Environment for the reproducible arm64 build with Debian 12's toolchain
# (rustc-web 1.96 + libstd-rust-web-dev:arm64), run through qemu-user.
# Source it: `. cross/env.sh`. cross/setup.sh installs the packages.
export CALLBOX_CROSS_TARGET=aarch64-unknown-linux-gnu
# Debian's cargo and rustc, not rustup's: only Debian ships the arm64 std here.
export CARGO=/usr/bin/cargo
export RUSTC=/usr/bin/rustc
export RUSTDOC=/usr/bin/rustdoc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu=1
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig
# No -L: with -L /usr/aarch64-linux-gnu threaded programs hang (two glibcs mixed).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
# The CPU qemu emulates: a Cortex-A76 (ARMv8.2 with fp16 and dot product, no SVE), the
# core of the small ARM boxes callbox runs on (Raspberry Pi 5, RK3588). qemu's default
# `max` CPU offers SVE2, so tract picks its SVE2 kernels, which qemu emulates element by
# element: the 2-s clip took 9 min 24 s to transcribe that way (encoder 475 s) and 36 s as
# an A76 (encoder 20 s), with the same text.
export QEMU_CPU=cortex-a76
# Without binfmt_misc, a test's child processes (the daemon it starts) must be
# started through qemu explicitly; tests/support/mod.rs reads this.
export CALLBOX_TEST_EXEC_WRAPPER=qemu-aarch64-static
