//! The one error type of the load generator, with the exit code each kind deserves.

use std::path::PathBuf;

/// Why a run could not be made (a run that was made, however badly the target did, is a
/// [`crate::Report`], not an error).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error(
        "{what} {url:?} is not on a loopback address: loadtest only sends traffic to this machine"
    )]
    NotLoopback { what: String, url: String },
    #[error("invalid settings: {0}")]
    Settings(String),
    #[error("setting up the run: {0}")]
    Setup(String),
    #[error("{path}: {source}")]
    Output {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: cannot draw the plot: {message}")]
    Plot { path: PathBuf, message: String },
}

impl Error {
    /// 2 for what the command line or the manifest got wrong (nothing was sent), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Manifest { .. } | Error::NotLoopback { .. } | Error::Settings(_) => 2,
            Error::Setup(_) | Error::Output { .. } | Error::Plot { .. } => 1,
        }
    }
}
