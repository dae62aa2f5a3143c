//! Why a channel call or a callback was refused: [`ChannelError`] (and what it says about the
//! attempt), [`CallbackRefusal`], and the bounds on what a channel's text makes us keep.

/// The longest declined message kept from a channel's (verified) reply: a bound on what a
/// channel's text makes us log and store.
pub const MAX_DECLINE_MESSAGE_CHARS: usize = 256;

/// Why a callback was refused: nothing changes, the protocol's failure answer goes back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallbackRefusal {
    /// The signature is missing, malformed or wrong, or made with an unknown key.
    #[error("bad signature: {0}")]
    BadSignature(String),
    /// Outside the protocol's timestamp window, or a WeChat Pay probe signature.
    #[error("stale or probe: {0}")]
    Stale(String),
    /// Signed, but for another app or merchant than this channel's.
    #[error("for another account: {0}")]
    WrongAccount(String),
    /// Not the protocol's format (or a field we need is missing or bad).
    #[error("malformed: {0}")]
    Malformed(String),
}

impl CallbackRefusal {
    /// A low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            CallbackRefusal::BadSignature(_) => "bad_signature",
            CallbackRefusal::Stale(_) => "stale",
            CallbackRefusal::WrongAccount(_) => "wrong_account",
            CallbackRefusal::Malformed(_) => "malformed",
        }
    }
}

/// The largest callback body read, any protocol (a notice is 0.2 to 1 KiB).
pub const MAX_CALLBACK_BODY_BYTES: usize = 64 * 1024;

/// The longest id, status or event type kept from a callback (Alipay's `notify_id` is 128).
pub const MAX_CALLBACK_TEXT_BYTES: usize = 128;

/// The longest message of a failure answer to a callback, in characters.
pub const MAX_CALLBACK_MESSAGE_CHARS: usize = 256;

/// Refuses a callback body above [`MAX_CALLBACK_BODY_BYTES`] before anything parses it.
pub(crate) fn check_callback_size(body: &[u8]) -> Result<(), CallbackRefusal> {
    if body.len() > MAX_CALLBACK_BODY_BYTES {
        return Err(CallbackRefusal::Malformed(format!(
            "the body is larger than {MAX_CALLBACK_BODY_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A text kept from a callback: 1 to [`MAX_CALLBACK_TEXT_BYTES`] of visible ASCII (ids and
/// statuses are; anything else is not the protocol's format, and would go to logs).
pub(crate) fn callback_text(name: &str, value: &str) -> Result<String, CallbackRefusal> {
    if value.is_empty()
        || value.len() > MAX_CALLBACK_TEXT_BYTES
        || !value.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(CallbackRefusal::Malformed(format!(
            "`{name}` is not 1 to {MAX_CALLBACK_TEXT_BYTES} visible ASCII characters"
        )));
    }
    Ok(value.to_owned())
}

/// The message of a failure answer to a callback: printable ASCII only (anything else becomes
/// `?`), at most [`MAX_CALLBACK_MESSAGE_CHARS`] characters, `default` when empty.
pub(crate) fn callback_reply_message(message: &str, default: &str) -> String {
    let text: String = message
        .chars()
        .take(MAX_CALLBACK_MESSAGE_CHARS)
        .map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c
            } else {
                '?'
            }
        })
        .collect();
    if text.trim().is_empty() {
        default.to_owned()
    } else {
        text
    }
}

/// Why a channel call failed, and what that says about the attempt (the `channels` module
/// docs).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    // --- Certainly not executed -----------------------------------------------------------
    /// The channel's in-flight limit is reached; nothing was sent.
    #[error("too many requests in flight to this channel")]
    Overloaded,
    /// The channel's breaker is open; nothing was sent. (Made by the caller's breaker.)
    #[error("the channel's circuit breaker is open")]
    CircuitOpen,
    /// The TCP connection was refused; nothing was sent.
    #[error("connection refused")]
    ConnectRefused,
    /// No connection could be made (DNS, connect timeout, TLS handshake); nothing was sent.
    #[error("could not connect: {reason}")]
    ConnectFailed { reason: String },
    /// The request was refused locally before sending (bad input for this protocol).
    #[error("invalid request: {reason}")]
    InvalidRequest { reason: String },
    /// A verified, explicit refusal before acceptance (a business decline).
    #[error("declined by the channel: {code}: {message}")]
    Declined { code: String, message: String },
    /// A verified refusal for rate limiting: not executed, but a sign of trouble.
    #[error("rate limited by the channel: {code}")]
    Throttled { code: String },
    /// A verified refusal of *our credentials* (bad signature, unknown app or merchant id,
    /// HTTP 401): not executed, but every call to this channel will fail the same way, so it
    /// counts against the breaker (a decline does not).
    #[error("the channel refused our credentials: {code}: {message}")]
    Rejected { code: String, message: String },

    // --- Unknown outcome: the channel may have executed the request -----------------------
    /// No complete answer within the request timeout.
    #[error("timed out")]
    Timeout,
    /// The connection failed after the request may have been written.
    #[error("I/O error: {reason}")]
    Io { reason: String },
    /// A 5xx, or the channel's own "system error" answer.
    #[error("channel server error (HTTP {status}): {code}")]
    ServerError { status: u16, code: String },
    /// The reply could not be verified (unsigned, forged, stale, malformed, for another
    /// order or merchant).
    #[error("unverifiable reply: {reason}")]
    Unverifiable { reason: String },
    /// The reply body passed the size limit.
    #[error("reply larger than the limit")]
    ResponseTooLarge,
    /// A verified reply whose meaning is unclear for this call (e.g. "order number already
    /// used" on a create): treated as maybe executed.
    #[error("unexpected reply: {reason}")]
    UnexpectedReply { reason: String },
}

impl ChannelError {
    /// Whether the attempt certainly did not take effect at the channel, so the payment may
    /// fail over to another channel (DESIGN.md §6).
    pub fn certainly_not_executed(&self) -> bool {
        match self {
            ChannelError::Overloaded
            | ChannelError::CircuitOpen
            | ChannelError::ConnectRefused
            | ChannelError::ConnectFailed { .. }
            | ChannelError::InvalidRequest { .. }
            | ChannelError::Declined { .. }
            | ChannelError::Throttled { .. }
            | ChannelError::Rejected { .. } => true,
            ChannelError::Timeout
            | ChannelError::Io { .. }
            | ChannelError::ServerError { .. }
            | ChannelError::Unverifiable { .. }
            | ChannelError::ResponseTooLarge
            | ChannelError::UnexpectedReply { .. } => false,
        }
    }

    /// Whether the breaker records this as a failure of the channel: timeouts, connection
    /// errors, 5xx, throttling and unverifiable replies do; business declines and refusals
    /// that never reached the channel (in-flight limit, open breaker, invalid request) don't.
    pub fn counts_as_failure(&self) -> bool {
        match self {
            ChannelError::Overloaded
            | ChannelError::CircuitOpen
            | ChannelError::InvalidRequest { .. }
            | ChannelError::Declined { .. }
            | ChannelError::UnexpectedReply { .. } => false,
            ChannelError::ConnectRefused
            | ChannelError::ConnectFailed { .. }
            | ChannelError::Throttled { .. }
            | ChannelError::Rejected { .. }
            | ChannelError::Timeout
            | ChannelError::Io { .. }
            | ChannelError::ServerError { .. }
            | ChannelError::Unverifiable { .. }
            | ChannelError::ResponseTooLarge => true,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            ChannelError::Overloaded => "overloaded",
            ChannelError::CircuitOpen => "circuit_open",
            ChannelError::ConnectRefused => "connect_refused",
            ChannelError::ConnectFailed { .. } => "connect_failed",
            ChannelError::InvalidRequest { .. } => "invalid_request",
            ChannelError::Declined { .. } => "declined",
            ChannelError::Throttled { .. } => "throttled",
            ChannelError::Rejected { .. } => "rejected",
            ChannelError::Timeout => "timeout",
            ChannelError::Io { .. } => "io",
            ChannelError::ServerError { .. } => "server_error",
            ChannelError::Unverifiable { .. } => "unverifiable",
            ChannelError::ResponseTooLarge => "response_too_large",
            ChannelError::UnexpectedReply { .. } => "unexpected_reply",
        }
    }

    pub(crate) fn unverifiable(reason: impl Into<String>) -> Self {
        ChannelError::Unverifiable {
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(reason: impl Into<String>) -> Self {
        ChannelError::InvalidRequest {
            reason: reason.into(),
        }
    }

    /// A verified refusal, with the channel's message cut to [`MAX_DECLINE_MESSAGE_CHARS`]:
    /// a refusal of our credentials ([`CREDENTIAL_REFUSALS`]) is `Rejected`, any other a
    /// business `Declined`.
    pub(crate) fn declined(code: &str, message: &str) -> Self {
        let code_text = truncate_chars(code, MAX_DECLINE_MESSAGE_CHARS);
        let message = truncate_chars(message, MAX_DECLINE_MESSAGE_CHARS);
        if CREDENTIAL_REFUSALS.contains(&code) {
            ChannelError::Rejected {
                code: code_text,
                message,
            }
        } else {
            ChannelError::Declined {
                code: code_text,
                message,
            }
        }
    }
}

/// Refusal codes that mean "your credentials are wrong", per protocol: Alipay's `isv.*`
/// signature and app-id sub-codes, WeChat Pay's `SIGN_ERROR`, and an HTTP 401 (the
/// supplier's, or WeChat's without a code).
pub const CREDENTIAL_REFUSALS: &[&str] = &[
    "isv.invalid-signature",
    "isv.missing-signature",
    "isv.invalid-app-id",
    "isv.invalid-signature-type",
    "SIGN_ERROR",
    "http_401",
];

fn truncate_chars(text: &str, max_chars: usize) -> String {
    text.chars().take(max_chars).collect()
}

/// The answer of a 5xx, whatever its body: an unknown outcome (the `channels` module docs).
/// Checked before any verification, since it is unknown either way.
pub(crate) fn server_error(status: hyper::StatusCode) -> Option<ChannelError> {
    status.is_server_error().then(|| ChannelError::ServerError {
        status: status.as_u16(),
        code: status.canonical_reason().unwrap_or("").to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_say_whether_the_attempt_certainly_did_not_run() {
        let declined = ChannelError::declined("ACQ.ACCESS_FORBIDDEN", "no");
        let certain = [
            ChannelError::Overloaded,
            ChannelError::CircuitOpen,
            ChannelError::ConnectRefused,
            ChannelError::ConnectFailed {
                reason: "dns".into(),
            },
            ChannelError::invalid("x"),
            declined.clone(),
            ChannelError::Throttled { code: "x".into() },
        ];
        let unknown = [
            ChannelError::Timeout,
            ChannelError::Io {
                reason: "reset".into(),
            },
            ChannelError::ServerError {
                status: 502,
                code: "x".into(),
            },
            ChannelError::unverifiable("x"),
            ChannelError::ResponseTooLarge,
            ChannelError::UnexpectedReply { reason: "x".into() },
        ];
        assert!(certain.iter().all(ChannelError::certainly_not_executed));
        assert!(!unknown.iter().any(ChannelError::certainly_not_executed));
        // The breaker's view: declines and local refusals don't count; trouble does.
        for e in [
            &declined,
            &ChannelError::Overloaded,
            &ChannelError::CircuitOpen,
        ] {
            assert!(!e.counts_as_failure(), "{e:?}");
        }
        for e in [
            &ChannelError::Timeout,
            &ChannelError::ConnectRefused,
            &ChannelError::ServerError {
                status: 500,
                code: String::new(),
            },
        ] {
            assert!(e.counts_as_failure(), "{e:?}");
        }
        // A refusal of our credentials is not a business decline: it trips the breaker.
        for code in CREDENTIAL_REFUSALS {
            let e = ChannelError::declined(code, "bad signature");
            assert!(matches!(e, ChannelError::Rejected { .. }), "{code}: {e:?}");
            assert!(
                e.certainly_not_executed() && e.counts_as_failure(),
                "{code}"
            );
        }
        let business = ChannelError::declined("ACQ.ACCESS_FORBIDDEN", "no");
        assert!(!business.counts_as_failure() && business.certainly_not_executed());
        let long = ChannelError::declined("c", &"m".repeat(10_000));
        assert!(
            matches!(long, ChannelError::Declined { message, .. } if message.len() == MAX_DECLINE_MESSAGE_CHARS)
        );
    }
}
