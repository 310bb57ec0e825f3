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
# Without binfmt_misc, a test's child processes (the daemon it starts) must be
# started through qemu explicitly; tests/support/mod.rs reads this.
export CALLBOX_TEST_EXEC_WRAPPER=qemu-aarch64-static
