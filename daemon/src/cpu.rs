//! CPU state the compiler does not manage for us.

/// Clears the upper halves of the AVX registers. tract's AVX2/AVX-512 kernels return with
/// them dirty, and on Intel cores every legacy-SSE instruction after that (this crate is
/// built for baseline x86-64: its own loops and glibc's scalar maths) pays a state-merge
/// penalty until something clears them. Measured on a Xeon after each Whisper decoder
/// step: the log-softmax over the 51,865-token vocabulary took 5 ms instead of 0.15, the
/// cross-attention 2.3 ms instead of 0.9 — 27 instead of 18 ms per token. Call it after
/// every tract run whose caller then computes on the CPU. Free elsewhere (AMD, arm64).
#[cfg(target_arch = "x86_64")]
pub fn leave_wide_vectors() {
    #[target_feature(enable = "avx")]
    unsafe fn zero_upper() {
        std::arch::x86_64::_mm256_zeroupper();
    }
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX (checked just above), all `vzeroupper` needs; it zeroes
        // only bits 128 and up of the vector registers, where no Rust value lives across
        // this call (baseline x86-64 code never uses them, and calls clobber them anyway).
        unsafe { zero_upper() }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub fn leave_wide_vectors() {}
