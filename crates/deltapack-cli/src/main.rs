//! The `deltapack` binary: the CLI of `src/lib.rs` on this process's arguments.

fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(deltapack_cli::main(std::env::args_os().collect()))
}
