//! What can go wrong in the client, and which exit status it means.

use std::io;

/// Why the client could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A command-line value that cannot work (exit status 2).
    #[error("{0}")]
    BadArgument(String),
    /// The pre-shared key could not be read or is unusable (exit status 2).
    #[error("pre-shared key: {0}")]
    Psk(String),
    /// The userspace data plane did not come up (sockets, TUN device).
    #[error("data plane: {0}")]
    DataPlane(#[source] io::Error),
    /// The TUN device could not take the inner address or a route.
    #[error("configuring the TUN device: {0}")]
    Tun(String),
    /// The data plane refused a child SA the gateway agreed to.
    #[error("starting child SA: {0}")]
    Child(#[from] evpc_dataplane::DriverError),
    /// stdout is gone (the runner stopped reading): nothing we see can be reported any more.
    #[error("writing the report to stdout: {0}")]
    Report(#[source] io::Error),
    /// The signal handlers could not be installed.
    #[error("installing the signal handlers: {0}")]
    Signals(#[source] io::Error),
    /// The data plane's IKE channel closed (its receive workers are gone).
    #[error("the data plane's IKE channel closed")]
    IkeChannelClosed,
}

impl ClientError {
    /// The process exit status for this error: 2 for what the operator must fix in the
    /// arguments, 1 for the rest.
    pub fn exit_status(&self) -> u8 {
        match self {
            ClientError::BadArgument(_) | ClientError::Psk(_) => 2,
            _ => 1,
        }
    }
}
