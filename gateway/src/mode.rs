//! How the gateway may run: a leaf, read by the configuration's checks and by the rules that
//! depend on it (webhook URLs).

/// How the gateway may run. The sandbox (`serve --sandbox`, the embedded configuration) uses
/// published test credentials, may use the in-process balance store, migrates its settlement
/// store by itself, and lets merchants' webhook URLs point at loopback hosts; production does
/// none of these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Production,
    Sandbox,
}
