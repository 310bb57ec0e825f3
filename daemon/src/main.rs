//! Thin entry point: all behaviour lives in the library.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(callbox::cli::main())
}
