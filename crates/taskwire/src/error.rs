//! The library's one error type: what went wrong, and where (the setting, the
//! address, the file), so that a caller can print it as it is.

use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::registry::RegisterError;

/// Why a [`Server`](crate::Server) could not be built, bound or run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration was refused; the message names the setting.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// The listener could not be bound (the port is in use, the address is
    /// not local, permission denied).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used; the message names the
    /// setting and the file.
    #[error("TLS: {0}")]
    Tls(ConfigError),
    /// A task could not be registered (so that `registry.io(..)?` works in
    /// a function that returns this type).
    #[error(transparent)]
    Register(#[from] RegisterError),
    /// Any other I/O failure while serving.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What [`Server`](crate::Server)'s methods return.
pub type Result<T, E = Error> = std::result::Result<T, E>;
