//! The `gateway` command: parses the command line and calls into the library
//! ([`gateway::cli`]).

use std::process::ExitCode;

use clap::Parser;
use gateway::cli::{self, Cli};

/// mimalloc rather than glibc's malloc: see gateway/Cargo.toml and docs/PERFORMANCE.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cli::run(Cli::parse())
}
