//! `channel-sim`: the sandbox channels (Alipay, WeChat Pay v3, HMAC-JSON supplier) with fault
//! injection. Not built yet: the channels issue delivers it. Until then this binary says so
//! and exits non-zero instead of pretending to serve.

fn main() -> std::process::ExitCode {
    eprintln!(
        "channel-sim is not implemented yet (it arrives with the channels issue); \
         the gateway's sandbox currently needs no channel"
    );
    std::process::ExitCode::from(2)
}
