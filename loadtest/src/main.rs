//! `loadtest`: the open-loop load generator. Not built yet: the load-test issue delivers it.
//! Until then this binary says so and exits non-zero. The criterion benches in `benches/`
//! measure the authorize path today.

fn main() -> std::process::ExitCode {
    eprintln!(
        "loadtest is not implemented yet (it arrives with the load-test issue); \
         see benches/ and docs/PERFORMANCE.md for today's measurements"
    );
    std::process::ExitCode::from(2)
}
