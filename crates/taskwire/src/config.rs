//! One configuration, three sources: a TOML file, `TASKWIRE_*` environment
//! variables and command-line flags all fill the same [`Settings`]; the layers
//! are merged with [`Settings::or`] (higher layer first) and turned into a
//! validated [`Config`] with [`Settings::into_config`].
//!
//! ```
//! use taskwire::config::Settings;
//! let file = Settings::from_toml("max_inflight = 64\nping_interval_ms = 5000\n").unwrap();
//! let flags = Settings { max_inflight: Some(8), ..Settings::default() };
//! let cfg = flags.or(file).into_config().unwrap();
//! assert_eq!(cfg.max_inflight_per_connection, 8);
//! assert_eq!(cfg.ping_interval, std::time::Duration::from_secs(5));
//! ```
//!
//! Names are the same everywhere: the TOML key `max_inflight` is the flag
//! `--max-inflight` and the variable `TASKWIRE_MAX_INFLIGHT`. Every error names
//! the setting at fault.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::compute::ComputeConfig;
use crate::server::Config;

/// Why a configuration was refused. The message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML or has an unknown or mistyped key.
    #[error("invalid configuration file {path}: {message}")]
    Parse {
        /// The file (or `<string>`).
        path: PathBuf,
        /// The parser's message, which names the key and its line.
        message: String,
    },
    /// A setting has a value the server cannot run with.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The setting's name (the TOML key).
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        setting,
        reason: reason.into(),
    }
}

/// A token bucket: `per_second` requests on average, bursts of up to `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// Tokens added per second (≥ 1).
    pub per_second: u32,
    /// Bucket size: the most requests accepted at once after a quiet period (≥ 1).
    pub burst: u32,
}

/// One accepted client token, with optional limits of its own that replace the
/// server-wide ones for the connections that present it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken {
    /// The secret (at least 16 characters of `A-Z a-z 0-9 - . _ ~`).
    pub token: String,
    /// Most open connections presenting this token at once.
    pub max_connections: Option<usize>,
    /// In-flight requests per connection (replaces `max_inflight`).
    pub max_inflight: Option<usize>,
    /// Request rate per connection (replaces `rate_limit_*`).
    pub rate_limit: Option<RateLimit>,
}

impl std::fmt::Debug for AuthToken {
    // Never print a secret into a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthToken")
            .field("token", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field("max_inflight", &self.max_inflight)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

/// Certificate chain and private key, PEM files, for `wss://`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// One `[[tokens]]` entry of the configuration file.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenSettings {
    /// The secret.
    pub token: String,
    /// Most open connections with this token.
    pub max_connections: Option<usize>,
    /// In-flight requests per connection with this token.
    pub max_inflight: Option<usize>,
    /// Requests per second per connection with this token.
    pub rate_limit_per_sec: Option<u32>,
    /// Burst per connection with this token (default: `rate_limit_per_sec`).
    pub rate_limit_burst: Option<u32>,
}

impl std::fmt::Debug for TokenSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSettings")
            .field("token", &"<redacted>")
            .field("max_connections", &self.max_connections)
            .field("max_inflight", &self.max_inflight)
            .finish_non_exhaustive()
    }
}

macro_rules! settings {
    ($( $(#[$doc:meta])* $name:ident : $ty:ty, )*) => {
        /// Every setting, each optional: one layer of the configuration (the
        /// file, the environment or the flags). See the README's
        /// "Configuration" table for names, defaults and precedence.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[$doc])* pub $name: Option<$ty>, )*
        }

        impl Settings {
            /// This layer over `lower`: each setting set here wins.
            pub fn or(self, lower: Settings) -> Settings {
                Settings { $( $name: self.$name.or(lower.$name), )* }
            }
        }
    };
}

settings! {
    /// Address to listen on.
    addr: SocketAddr,
    /// Largest WebSocket message, bytes.
    max_frame_bytes: usize,
    /// In-flight requests per connection.
    max_inflight: usize,
    /// Most elements of one batch.
    max_batch: usize,
    /// Open connections, all clients.
    max_connections: usize,
    /// Open connections per client IP address.
    max_connections_per_ip: usize,
    /// Cap on any task's deadline, ms.
    max_timeout_ms: u64,
    /// Shutdown grace period, ms.
    shutdown_grace_ms: u64,
    /// WebSocket ping period, ms.
    ping_interval_ms: u64,
    /// WebSocket pings per second a client may send.
    ping_rate_per_sec: u32,
    /// Burst of WebSocket pings a client may send.
    ping_rate_burst: u32,
    /// Outbound queue per connection, messages.
    outbound_queue: usize,
    /// Outbound queue per connection, bytes.
    outbound_bytes: usize,
    /// Slow-consumer timeout, ms.
    write_timeout_ms: u64,
    /// Keep the live task table and per-task metrics (off only to measure their cost).
    observe: bool,
    /// Bearer token for `/admin` and `/metrics`.
    admin_token: String,
    /// Origins allowed besides the server's own host (`*` for any).
    allowed_origins: Vec<String>,
    /// Refuse upgrades without an `Origin` header.
    require_origin: bool,
    /// Client tokens; when any is set, `/ws` requires one.
    tokens: Vec<TokenSettings>,
    /// TLS certificate chain, PEM.
    tls_cert: PathBuf,
    /// TLS private key, PEM.
    tls_key: PathBuf,
    /// Requests per second per connection.
    rate_limit_per_sec: u32,
    /// Burst of requests per connection.
    rate_limit_burst: u32,
    /// Compute worker threads.
    workers: usize,
    /// CPU time slice, µs.
    slice_us: u64,
    /// Not-yielding threshold, ms.
    non_yield_ms: u64,
    /// CPU tasks admitted, all connections.
    queue_limit: usize,
    /// CPU tasks admitted per connection.
    connection_cpu_limit: usize,
    /// Niceness of compute workers.
    nice: i32,
    /// Log filter (used by the binary, not the library).
    log: String,
}

fn rate(
    per_sec: Option<u32>,
    burst: Option<u32>,
    names: (&'static str, &'static str),
) -> Result<Option<RateLimit>, ConfigError> {
    match (per_sec, burst) {
        (None, None) => Ok(None),
        (None, Some(_)) => Err(invalid(names.1, format!("needs `{}` too", names.0))),
        (Some(p), b) => Ok(Some(RateLimit {
            per_second: p,
            burst: b.unwrap_or(p),
        })),
    }
}

impl Settings {
    /// Parses one layer from TOML text.
    pub fn from_toml(text: &str) -> Result<Settings, ConfigError> {
        Self::parse(text, Path::new("<string>"))
    }

    fn parse(text: &str, path: &Path) -> Result<Settings, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })
    }

    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Fills what is unset with the defaults and validates the result.
    pub fn into_config(self) -> Result<Config, ConfigError> {
        let d = Config::default();
        let cd = ComputeConfig::default();
        let ms = Duration::from_millis;
        let workers = self.workers.unwrap_or(cd.workers);
        let tls = match (self.tls_cert, self.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(TlsConfig { cert, key }),
            (Some(_), None) => {
                return Err(invalid("tls_key", "`tls_cert` is set but not `tls_key`"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert", "`tls_key` is set but not `tls_cert`"))
            }
        };
        let tokens = self
            .tokens
            .unwrap_or_default()
            .into_iter()
            .map(|t| {
                Ok(AuthToken {
                    rate_limit: rate(
                        t.rate_limit_per_sec,
                        t.rate_limit_burst,
                        ("tokens.rate_limit_per_sec", "tokens.rate_limit_burst"),
                    )?,
                    token: t.token,
                    max_connections: t.max_connections,
                    max_inflight: t.max_inflight,
                })
            })
            .collect::<Result<Vec<_>, ConfigError>>()?;
        let cfg = Config {
            addr: self.addr.unwrap_or(d.addr),
            max_frame_bytes: self.max_frame_bytes.unwrap_or(d.max_frame_bytes),
            max_inflight_per_connection: self.max_inflight.unwrap_or(d.max_inflight_per_connection),
            max_batch: self.max_batch.unwrap_or(d.max_batch),
            max_connections: self.max_connections.unwrap_or(d.max_connections),
            max_connections_per_ip: self.max_connections_per_ip.or(d.max_connections_per_ip),
            max_task_timeout: self.max_timeout_ms.map(ms).unwrap_or(d.max_task_timeout),
            shutdown_grace: self.shutdown_grace_ms.map(ms).unwrap_or(d.shutdown_grace),
            ping_interval: self.ping_interval_ms.map(ms).unwrap_or(d.ping_interval),
            ping_rate: RateLimit {
                per_second: self.ping_rate_per_sec.unwrap_or(d.ping_rate.per_second),
                burst: self.ping_rate_burst.unwrap_or(d.ping_rate.burst),
            },
            outbound_queue: self.outbound_queue.unwrap_or(d.outbound_queue),
            outbound_bytes: self.outbound_bytes.unwrap_or(d.outbound_bytes),
            write_timeout: self.write_timeout_ms.map(ms).unwrap_or(d.write_timeout),
            admin_token: self.admin_token.or(d.admin_token),
            allowed_origins: self.allowed_origins.unwrap_or(d.allowed_origins),
            require_origin: self.require_origin.unwrap_or(d.require_origin),
            auth_tokens: tokens,
            tls,
            rate_limit: rate(
                self.rate_limit_per_sec,
                self.rate_limit_burst,
                ("rate_limit_per_sec", "rate_limit_burst"),
            )?
            .or(d.rate_limit),
            compute: ComputeConfig {
                workers,
                slice: self.slice_us.map(Duration::from_micros).unwrap_or(cd.slice),
                non_yield_after: self.non_yield_ms.map(ms).unwrap_or(cd.non_yield_after),
                max_extra_workers: workers,
                queue_limit: self.queue_limit.unwrap_or(cd.queue_limit),
                per_connection_limit: self.connection_cpu_limit.unwrap_or(cd.per_connection_limit),
                nice: self.nice.unwrap_or(cd.nice),
                ..cd
            },
            observe: self.observe.unwrap_or(d.observe),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Characters a client token may hold: safe in a header, a query string and a
/// cookie without any escaping.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// The shortest client token accepted: shorter ones can be guessed online.
pub const MIN_TOKEN_LEN: usize = 16;

/// `scheme://host[:port]`, as a browser sends it in `Origin`, or `*`, or `null`.
fn valid_origin(o: &str) -> bool {
    if o == "*" || o == "null" {
        return true;
    }
    let Some((scheme, rest)) = o.split_once("://") else {
        return false;
    };
    !scheme.is_empty()
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        && !rest.is_empty()
        && !rest.contains(['/', '?', '#', ' ', '@'])
}

impl Config {
    /// Checks every setting; the error names the first one at fault (by its
    /// configuration-file name). [`crate::Server::bind`] calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |name: &'static str, v: u128| {
            if v == 0 {
                Err(invalid(name, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
        if self.max_frame_bytes < 1024 {
            return Err(invalid("max_frame_bytes", "must be at least 1024"));
        }
        positive("max_inflight", self.max_inflight_per_connection as u128)?;
        positive("max_batch", self.max_batch as u128)?;
        positive("max_connections", self.max_connections as u128)?;
        if let Some(n) = self.max_connections_per_ip {
            positive("max_connections_per_ip", n as u128)?;
        }
        positive("max_timeout_ms", self.max_task_timeout.as_millis())?;
        positive("ping_interval_ms", self.ping_interval.as_millis())?;
        positive("outbound_queue", self.outbound_queue as u128)?;
        if self.outbound_bytes < self.max_frame_bytes {
            return Err(invalid(
                "outbound_bytes",
                "must be at least max_frame_bytes (a reply as large as a request must fit)",
            ));
        }
        positive("write_timeout_ms", self.write_timeout.as_millis())?;
        if self.admin_token.as_deref() == Some("") {
            return Err(invalid(
                "admin_token",
                "must not be empty (unset it instead)",
            ));
        }
        for o in &self.allowed_origins {
            if !valid_origin(o) {
                return Err(invalid(
                    "allowed_origins",
                    format!("{o:?} is not an origin like \"https://app.example.com\" (or \"*\")"),
                ));
            }
        }
        let check_rate = |r: &Option<RateLimit>, names: (&'static str, &'static str)| {
            if let Some(r) = r {
                positive(names.0, r.per_second as u128)?;
                positive(names.1, r.burst as u128)?;
            }
            Ok::<(), ConfigError>(())
        };
        check_rate(&self.rate_limit, ("rate_limit_per_sec", "rate_limit_burst"))?;
        check_rate(
            &Some(self.ping_rate),
            ("ping_rate_per_sec", "ping_rate_burst"),
        )?;
        let mut seen = std::collections::HashSet::new();
        for t in &self.auth_tokens {
            if t.token.len() < MIN_TOKEN_LEN || !t.token.chars().all(token_char) {
                return Err(invalid(
                    "tokens",
                    format!(
                        "a token must be at least {MIN_TOKEN_LEN} characters of A-Z a-z 0-9 - . _ ~"
                    ),
                ));
            }
            if !seen.insert(t.token.as_str()) {
                return Err(invalid("tokens", "the same token is listed twice"));
            }
            if let Some(n) = t.max_connections {
                positive("tokens.max_connections", n as u128)?;
            }
            if let Some(n) = t.max_inflight {
                positive("tokens.max_inflight", n as u128)?;
            }
            check_rate(
                &t.rate_limit,
                ("tokens.rate_limit_per_sec", "tokens.rate_limit_burst"),
            )?;
        }
        let c = &self.compute;
        positive("workers", c.workers as u128)?;
        if c.slice < Duration::from_micros(100) {
            return Err(invalid("slice_us", "must be at least 100"));
        }
        positive("non_yield_ms", c.non_yield_after.as_millis())?;
        positive("queue_limit", c.queue_limit as u128)?;
        positive("connection_cpu_limit", c.per_connection_limit as u128)?;
        if !(-20..=19).contains(&c.nice) {
            return Err(invalid("nice", "must be between -20 and 19"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
        Settings::default().into_config().unwrap();
    }

    #[test]
    fn higher_layer_wins_setting_by_setting() {
        let file = Settings::from_toml("max_inflight = 5\nmax_connections = 7\n").unwrap();
        let env = Settings {
            max_connections: Some(9),
            ..Settings::default()
        };
        let cfg = env.or(file).into_config().unwrap();
        assert_eq!(cfg.max_inflight_per_connection, 5);
        assert_eq!(cfg.max_connections, 9);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Settings::from_toml("max_inflite = 5\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_inflite"), "{e}");
    }

    #[test]
    fn mistyped_value_is_named() {
        let e = Settings::from_toml("max_inflight = \"many\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_inflight"), "{e}");
    }

    #[test]
    fn invalid_values_name_their_setting() {
        let cases = [
            ("outbound_queue = 0", "outbound_queue"),
            ("ping_interval_ms = 0", "ping_interval_ms"),
            ("tls_cert = \"/x.pem\"", "tls_key"),
            ("rate_limit_burst = 3", "rate_limit_burst"),
            ("allowed_origins = [\"example.com\"]", "allowed_origins"),
            ("[[tokens]]\ntoken = \"short\"", "tokens"),
            (
                "[[tokens]]\ntoken = \"aaaaaaaaaaaaaaaa\"\nmax_inflight = 0",
                "tokens.max_inflight",
            ),
            ("slice_us = 5", "slice_us"),
            ("max_batch = 0", "max_batch"),
            ("ping_rate_per_sec = 0", "ping_rate_per_sec"),
        ];
        for (text, setting) in cases {
            let e = Settings::from_toml(text)
                .and_then(Settings::into_config)
                .unwrap_err();
            match &e {
                ConfigError::Invalid { setting: s, .. } => assert_eq!(*s, setting, "{text}"),
                other => panic!("{text}: {other}"),
            }
            assert!(e.to_string().contains(setting));
        }
    }

    #[test]
    fn tokens_with_limits() {
        let cfg = Settings::from_toml(
            "[[tokens]]\ntoken = \"0123456789abcdef\"\nmax_connections = 2\nrate_limit_per_sec = 10\n",
        )
        .and_then(Settings::into_config)
        .unwrap();
        let t = &cfg.auth_tokens[0];
        assert_eq!(t.max_connections, Some(2));
        assert_eq!(
            t.rate_limit,
            Some(RateLimit {
                per_second: 10,
                burst: 10
            })
        );
        assert!(!format!("{cfg:?}").contains("0123456789abcdef"));
    }

    #[test]
    fn origins() {
        assert!(valid_origin("https://app.example.com"));
        assert!(valid_origin("http://127.0.0.1:8080"));
        assert!(valid_origin("*"));
        assert!(!valid_origin("app.example.com"));
        assert!(!valid_origin("https://app.example.com/"));
    }
}
