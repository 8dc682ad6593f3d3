//! Every setting of the server, declared once.
//!
//! One declaration per setting (in [`settings!`](self) below) gives its name,
//! type, unit, default, doc line and lower bound; from it come the typed
//! [`Config`] a library user fills in code, the [`Settings`] layer that a TOML
//! file, `TASKWIRE_*` environment variables and command-line flags each fill,
//! the flags themselves ([`Flags`], with the `cli` feature), validation, and the
//! README's configuration table ([`markdown_table`], checked by a test).
//!
//! The layers are merged per setting, the higher first: **flag > environment >
//! file > default**. A file key, a flag and a variable are one name in three
//! spellings: `max_inflight`, `--max-inflight`, `TASKWIRE_MAX_INFLIGHT`.
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
//! Every error names the setting at fault (by its file key, its flag or its
//! variable, whichever the value came from).

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::compute::ComputeConfig;

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
    /// An environment variable holds a value that does not parse.
    #[error("invalid environment variable {var}: {message}")]
    Env {
        /// The variable, e.g. `TASKWIRE_MAX_INFLIGHT`.
        var: String,
        /// What is wrong with its value.
        message: String,
    },
    /// A command-line flag holds a value that does not parse.
    #[error("invalid value for --{flag}: {message}")]
    Flag {
        /// The flag without its dashes, e.g. `max-inflight`.
        flag: String,
        /// What is wrong with its value.
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

/// An IP address or a CIDR block (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`),
/// as in the `trusted_proxies` setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpRange {
    addr: IpAddr,
    prefix: u8,
}

/// A `trusted_proxies` entry that is not an address or a CIDR block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an IP address or a CIDR block like \"10.0.0.0/8\"")]
pub struct IpRangeError(String);

impl IpRange {
    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses compare as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpRange {
    type Err = IpRangeError;

    fn from_str(s: &str) -> Result<IpRange, IpRangeError> {
        let bad = || IpRangeError(s.to_string());
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr = IpAddr::from_str(addr.trim())
            .map_err(|_| bad())?
            .to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad())?,
            None => max,
        };
        if prefix > max {
            return Err(bad());
        }
        Ok(IpRange { addr, prefix })
    }
}

impl std::fmt::Display for IpRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// How one kind of setting is written in a file, a flag or a variable, and
/// what it becomes in [`Config`]. The units of a setting live here, so that a
/// duration is `Duration` in code and milliseconds everywhere else.
pub trait Kind {
    /// What the file holds (and flags and variables parse into).
    type Raw: DeserializeOwned + Clone + std::fmt::Debug;
    /// What [`Config`] holds.
    type Value: Clone + std::fmt::Debug;
    /// The unit shown in `--help` and the README ("" for none).
    const UNIT: &'static str = "";
    /// Whether a flag may be repeated and a variable is comma-separated.
    const LIST: bool = false;
    /// Whether the flag alone means `true` (`--demo` as `--demo true`).
    const SWITCH: bool = false;
    /// Parses one flag or variable value.
    fn parse(text: &str) -> Result<Self::Raw, String>;
    /// The raw value as the README shows it.
    fn show(raw: &Self::Raw) -> String;
    /// Turns the raw value into the typed one; `None` means "not set".
    fn value(raw: Option<Self::Raw>, key: &'static str) -> Result<Self::Value, ConfigError>;
    /// The raw value as a number, for lower bounds.
    fn number(_raw: &Self::Raw) -> Option<u128> {
        None
    }
    /// The typed value as a number in the setting's unit, for lower bounds.
    fn value_number(_value: &Self::Value) -> Option<u128> {
        None
    }
}

fn parsed<T: FromStr>(text: &str) -> Result<T, String>
where
    T::Err: Display,
{
    text.trim().parse::<T>().map_err(|e| e.to_string())
}

fn required<T>(raw: Option<T>, key: &'static str) -> Result<T, ConfigError> {
    raw.ok_or_else(|| invalid(key, "must be set"))
}

macro_rules! plain_kind {
    ($($t:ty),*) => {$(
        impl Kind for $t {
            type Raw = $t;
            type Value = $t;
            fn parse(text: &str) -> Result<$t, String> { parsed(text) }
            fn show(raw: &$t) -> String { raw.to_string() }
            fn value(raw: Option<$t>, key: &'static str) -> Result<$t, ConfigError> { required(raw, key) }
        }
    )*};
}
plain_kind!(i32, String, SocketAddr);

impl Kind for bool {
    type Raw = bool;
    type Value = bool;
    const SWITCH: bool = true;
    fn parse(text: &str) -> Result<bool, String> {
        parsed(text)
    }
    fn show(raw: &bool) -> String {
        raw.to_string()
    }
    fn value(raw: Option<bool>, key: &'static str) -> Result<bool, ConfigError> {
        required(raw, key)
    }
}

macro_rules! number_kind {
    ($($t:ty),*) => {$(
        impl Kind for $t {
            type Raw = $t;
            type Value = $t;
            fn parse(text: &str) -> Result<$t, String> { parsed(text) }
            fn show(raw: &$t) -> String { raw.to_string() }
            fn value(raw: Option<$t>, key: &'static str) -> Result<$t, ConfigError> { required(raw, key) }
            fn number(raw: &$t) -> Option<u128> { Some(*raw as u128) }
            fn value_number(v: &$t) -> Option<u128> { Some(*v as u128) }
        }
    )*};
}
number_kind!(usize, u32, u64);

impl Kind for PathBuf {
    type Raw = PathBuf;
    type Value = PathBuf;
    fn parse(text: &str) -> Result<PathBuf, String> {
        Ok(PathBuf::from(text))
    }
    fn show(raw: &PathBuf) -> String {
        raw.display().to_string()
    }
    fn value(raw: Option<PathBuf>, key: &'static str) -> Result<PathBuf, ConfigError> {
        required(raw, key)
    }
}

macro_rules! duration_kind {
    ($(#[$doc:meta])* $name:ident, $unit:literal, $from:ident, $as:ident) => {
        $(#[$doc])*
        #[derive(Debug)]
        pub enum $name {}

        impl Kind for $name {
            type Raw = u64;
            type Value = Duration;
            const UNIT: &'static str = $unit;
            fn parse(text: &str) -> Result<u64, String> {
                parsed(text)
            }
            fn show(raw: &u64) -> String {
                raw.to_string()
            }
            fn value(raw: Option<u64>, key: &'static str) -> Result<Duration, ConfigError> {
                required(raw, key).map(Duration::$from)
            }
            fn number(raw: &u64) -> Option<u128> {
                Some(*raw as u128)
            }
            fn value_number(v: &Duration) -> Option<u128> {
                Some(v.$as())
            }
        }
    };
}

duration_kind!(
    /// A duration written in milliseconds.
    Millis, "ms", from_millis, as_millis
);
duration_kind!(
    /// A duration written in microseconds.
    Micros, "µs", from_micros, as_micros
);

/// A size in bytes.
#[derive(Debug)]
pub enum Bytes {}

impl Kind for Bytes {
    type Raw = usize;
    type Value = usize;
    const UNIT: &'static str = "bytes";
    fn parse(text: &str) -> Result<usize, String> {
        parsed(text)
    }
    fn show(raw: &usize) -> String {
        raw.to_string()
    }
    fn value(raw: Option<usize>, key: &'static str) -> Result<usize, ConfigError> {
        required(raw, key)
    }
    fn number(raw: &usize) -> Option<u128> {
        Some(*raw as u128)
    }
    fn value_number(v: &usize) -> Option<u128> {
        Some(*v as u128)
    }
}

/// A setting that may be left unset (its default then says what that means).
#[derive(Debug)]
pub struct Opt<K>(std::marker::PhantomData<K>);

impl<K: Kind> Kind for Opt<K> {
    type Raw = K::Raw;
    type Value = Option<K::Value>;
    const UNIT: &'static str = K::UNIT;
    const LIST: bool = K::LIST;
    fn parse(text: &str) -> Result<K::Raw, String> {
        K::parse(text)
    }
    fn show(raw: &K::Raw) -> String {
        K::show(raw)
    }
    fn value(raw: Option<K::Raw>, key: &'static str) -> Result<Option<K::Value>, ConfigError> {
        raw.map(|r| K::value(Some(r), key)).transpose()
    }
    fn number(raw: &K::Raw) -> Option<u128> {
        K::number(raw)
    }
    fn value_number(v: &Option<K::Value>) -> Option<u128> {
        v.as_ref().and_then(K::value_number)
    }
}

/// A list of strings: a TOML array, a repeated flag, or a comma-separated variable.
#[derive(Debug)]
pub enum List {}

fn split_list(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl Kind for List {
    type Raw = Vec<String>;
    type Value = Vec<String>;
    const LIST: bool = true;
    fn parse(text: &str) -> Result<Vec<String>, String> {
        Ok(split_list(text))
    }
    fn show(raw: &Vec<String>) -> String {
        raw.join(",")
    }
    fn value(raw: Option<Vec<String>>, _key: &'static str) -> Result<Vec<String>, ConfigError> {
        Ok(raw.unwrap_or_default())
    }
}

/// Client tokens: `[[tokens]]` tables in the file (with per-token limits), or
/// bare secrets from a repeated flag or a comma-separated variable.
#[derive(Debug)]
pub enum Tokens {}

impl Kind for Tokens {
    type Raw = Vec<TokenSettings>;
    type Value = Vec<AuthToken>;
    const LIST: bool = true;
    fn parse(text: &str) -> Result<Vec<TokenSettings>, String> {
        Ok(split_list(text)
            .into_iter()
            .map(|token| TokenSettings {
                token,
                ..TokenSettings::default()
            })
            .collect())
    }
    fn show(raw: &Vec<TokenSettings>) -> String {
        format!("{} token(s)", raw.len())
    }
    fn value(
        raw: Option<Vec<TokenSettings>>,
        _key: &'static str,
    ) -> Result<Vec<AuthToken>, ConfigError> {
        raw.unwrap_or_default()
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
            .collect()
    }
}

/// A list of values that parse from text (such as [`IpRange`]): a TOML array
/// of strings, a repeated flag, or a comma-separated variable.
#[derive(Debug)]
pub struct ParsedList<T>(std::marker::PhantomData<T>);

impl<T> Kind for ParsedList<T>
where
    T: FromStr + Clone + std::fmt::Debug,
    T::Err: Display,
{
    type Raw = Vec<String>;
    type Value = Vec<T>;
    const LIST: bool = true;
    fn parse(text: &str) -> Result<Vec<String>, String> {
        Ok(split_list(text))
    }
    fn show(raw: &Vec<String>) -> String {
        raw.join(",")
    }
    fn value(raw: Option<Vec<String>>, key: &'static str) -> Result<Vec<T>, ConfigError> {
        raw.unwrap_or_default()
            .iter()
            .map(|t| t.parse::<T>().map_err(|e| invalid(key, e.to_string())))
            .collect()
    }
}

/// One setting as `--help`, the README and tools see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The TOML key, e.g. `max_inflight`.
    pub key: &'static str,
    /// The flag without its dashes, e.g. `max-inflight`.
    pub flag: String,
    /// The environment variable, e.g. `TASKWIRE_MAX_INFLIGHT`.
    pub env: String,
    /// The unit ("" for none).
    pub unit: &'static str,
    /// The first line of the setting's documentation.
    pub doc: String,
    /// The default as the README shows it.
    pub default: String,
    /// Whether the flag repeats and the variable is comma-separated.
    pub list: bool,
    /// Whether the flag alone means `true`.
    pub switch: bool,
}

fn doc_line(lines: &[&str]) -> String {
    lines
        .iter()
        .map(|l| l.trim())
        .take_while(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn flag_of(key: &str) -> String {
    key.replace('_', "-")
}

fn env_of(key: &str) -> String {
    format!("TASKWIRE_{}", key.to_ascii_uppercase())
}

fn check_min(key: &'static str, n: Option<u128>, min: u128) -> Result<(), ConfigError> {
    match n {
        Some(n) if n < min => Err(invalid(key, format!("must be at least {min}"))),
        _ => Ok(()),
    }
}

macro_rules! settings {
    ($(
        $(#[doc = $doc:literal])+
        $key:ident => $field:ident : $kind:ty = $default:expr
            $(, shown $shown:literal)?
            $(, min $min:literal)?
            $(, flag $flag:literal)?
            $(, env $env:literal)?
        ;
    )*) => {
        /// Server settings, typed. Every field has a working default and the
        /// defaults suit local use: see docs/SECURITY.md before exposing a
        /// server to the internet. [`Settings`] builds one from a file, the
        /// environment and flags; in code, `Config { field: value,
        /// ..Config::default() }`.
        #[derive(Clone, Debug)]
        pub struct Config {
            $( $(#[doc = $doc])* pub $field: <$kind as Kind>::Value, )*
        }

        /// Every setting, each optional: one layer of the configuration (the
        /// file, the environment or the flags). Field names are the TOML keys.
        #[derive(Clone, Debug, Default, Deserialize)]
        #[serde(deny_unknown_fields)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $key: Option<<$kind as Kind>::Raw>, )*
        }

        impl Settings {
            /// This layer over `lower`: each setting set here wins.
            pub fn or(self, lower: Settings) -> Settings {
                Settings { $( $key: self.$key.or(lower.$key), )* }
            }

            /// Whether this layer sets the setting with this file key.
            fn is_set(&self, key: &str) -> bool {
                match key {
                    $( stringify!($key) => self.$key.is_some(), )*
                    _ => false,
                }
            }

            /// The declared defaults, as a layer.
            pub fn defaults() -> Settings {
                Settings { $( $key: $default, )* }
            }

            /// A layer from text values found by a setting's [`Spec`] (the
            /// environment, flags); `err` names the source of a bad value.
            fn from_texts(
                mut get: impl FnMut(&Spec) -> Option<Vec<String>>,
                err: impl Fn(&Spec, String) -> ConfigError,
            ) -> Result<Settings, ConfigError> {
                let specs = specs();
                let mut specs = specs.iter();
                Ok(Settings { $( $key: {
                    let spec = specs.next().ok_or_else(|| invalid(stringify!($key), "undeclared"))?;
                    match get(spec) {
                        None => None,
                        Some(texts) => Some(parse_texts::<$kind>(&texts).map_err(|m| err(spec, m))?),
                    }
                }, )* })
            }

            /// Fills what is unset with the defaults and validates the result.
            pub fn into_config(self) -> Result<Config, ConfigError> {
                let s = self.or(Settings::defaults());
                let cfg = Config {
                    $( $field: <$kind as Kind>::value(s.$key, stringify!($key))?, )*
                };
                cfg.validate()?;
                Ok(cfg)
            }
        }

        impl Config {
            /// The lower bounds stated in the declarations.
            fn check_declared(&self) -> Result<(), ConfigError> {
                $( $( check_min(stringify!($key), <$kind as Kind>::value_number(&self.$field), $min)?; )? )*
                Ok(())
            }
        }

        /// Every setting, in declaration order: key, flag, variable, unit, doc, default.
        pub fn specs() -> Vec<Spec> {
            vec![ $( Spec {
                key: stringify!($key),
                flag: [$($flag)?].first().map(|f: &&str| f.to_string()).unwrap_or_else(|| flag_of(stringify!($key))),
                env: [$($env)?].first().map(|e: &&str| e.to_string()).unwrap_or_else(|| env_of(stringify!($key))),
                unit: <$kind as Kind>::UNIT,
                doc: doc_line(&[$($doc),*]),
                default: {
                    let d: Option<<$kind as Kind>::Raw> = $default;
                    match d {
                        Some(v) => <$kind as Kind>::show(&v),
                        None => [$($shown)?].first().map(|s: &&str| s.to_string()).unwrap_or_else(|| "none".to_string()),
                    }
                },
                list: <$kind as Kind>::LIST,
                switch: <$kind as Kind>::SWITCH,
            }, )* ]
        }
    };
}

/// A flag's or variable's texts (several for a repeated flag) as one raw value.
fn parse_texts<K: Kind>(texts: &[String]) -> Result<K::Raw, String> {
    if K::LIST {
        K::parse(&texts.join(","))
    } else {
        K::parse(texts.last().map(String::as_str).unwrap_or(""))
    }
}

settings! {
    /// Address to listen on (port 0 picks a free port).
    addr => addr: SocketAddr = "127.0.0.1:7878".parse().ok();
    /// Largest WebSocket message; larger ones close the connection with 1009.
    max_frame_bytes => max_frame_bytes: Bytes = Some(1 << 20), min 1024;
    /// Requests in flight per connection before `-32001 connection_inflight`.
    max_inflight => max_inflight_per_connection: usize = Some(1024), min 1;
    /// Open connections before new upgrades get HTTP 503.
    max_connections => max_connections: usize = Some(10_000), min 1;
    /// Open connections per client address before new upgrades get HTTP 429.
    max_connections_per_ip => max_connections_per_ip: Opt<usize> = None, shown "no limit", min 1;
    /// Connections that are not WebSockets (yet), over all clients: TLS
    /// handshakes, request heads being read, plain HTTP keep-alive connections
    /// (the dashboard, admin, `/admin/events`); beyond it a new TCP connection is
    /// closed at once. Bounds what clients who never finish a request can hold.
    max_http_connections => max_http_connections: usize = Some(1024), min 1;
    /// The same, per client address (IPv6: per /64), so that one address cannot
    /// take them all; a trusted proxy is exempt (it carries many clients).
    max_http_connections_per_ip => max_http_connections_per_ip: usize = Some(64), min 1;
    /// Time for a TLS handshake and for each request head to arrive in full
    /// (also how long an idle keep-alive connection is kept).
    request_head_timeout_ms => request_head_timeout: Millis = Some(10_000), min 1;
    /// Most elements of one batch; a longer batch gets one `-32600` and nothing runs.
    max_batch => max_batch: usize = Some(256), min 1;
    /// WebSocket ping frames per second a client may send; beyond the burst the
    /// connection is closed with 1008.
    ping_rate_per_sec => ping_rate_per_sec: u32 = Some(10), min 1;
    /// Burst of WebSocket ping frames a client may send.
    ping_rate_burst => ping_rate_burst: u32 = Some(20), min 1;
    /// Cap on any task's deadline.
    max_timeout_ms => max_task_timeout: Millis = Some(3_600_000), min 1;
    /// How long in-flight tasks get to finish on shutdown.
    shutdown_grace_ms => shutdown_grace: Millis = Some(5_000);
    /// WebSocket ping period; two unanswered pings close the connection (1001).
    ping_interval_ms => ping_interval: Millis = Some(20_000), min 1;
    /// Capacity of each connection's outbound queue, in messages.
    outbound_queue => outbound_queue: usize = Some(1024), min 1;
    /// Bytes each connection's outbound queue may hold: with the message
    /// count, what bounds the memory a client that does not read can pin
    /// until the write timeout closes it.
    outbound_bytes => outbound_bytes: Bytes = Some(4 << 20);
    /// Bytes of replies queued and batch answers kept over all connections
    /// together: past it, answers wait for room as on a full connection (and a
    /// client that still does not read is closed as a slow consumer), so what
    /// non-reading clients pin in all is bounded whatever their number.
    outbound_bytes_total => outbound_bytes_total: Bytes = Some(1 << 30);
    /// How long a reply may wait for room in the outbound queue, or a write for
    /// the socket, before the client is closed as a slow consumer (1008).
    write_timeout_ms => write_timeout: Millis = Some(10_000), min 1;
    /// Keep the live task table and per-task metrics (off only to measure what they cost).
    observe => observe: bool = Some(true);
    /// Bearer token for `/admin` and `/metrics`; without one they answer loopback peers only.
    admin_token => admin_token: Opt<String> = None, shown "none: loopback only";
    /// Page origins allowed to open `/ws` besides the server's own host (`*`: any).
    allowed_origins => allowed_origins: List = None, shown "none: same host only", flag "allowed-origin";
    /// Refuse upgrades without an `Origin` header, i.e. non-browser clients.
    require_origin => require_origin: bool = Some(false);
    /// Host names (port ignored; `*`: any) accepted in `Host` besides loopback
    /// names and addresses where the server checks it: requests let into
    /// `/admin` and `/metrics` because they come from loopback, and upgrades when
    /// the server listens on loopback (protection against DNS rebinding).
    allowed_hosts => allowed_hosts: List = None, shown "none: loopback names only", flag "allowed-host";
    /// Reverse proxies (addresses or CIDR blocks) whose `X-Forwarded-For` /
    /// `Forwarded` header names the client; from any other peer those headers are ignored.
    trusted_proxies => trusted_proxies: ParsedList<IpRange> = None, shown "none: the TCP peer is the client", flag "trusted-proxy";
    /// Client tokens; when any is set, `/ws` requires one (header, `token`
    /// query parameter or `taskwire_token` cookie). Per-token limits: `[[tokens]]` in the file.
    tokens => auth_tokens: Tokens = None, shown "none: /ws is open", flag "token";
    /// TLS certificate chain (PEM); with `tls_key`, serves `wss://` and `https://`.
    tls_cert => tls_cert: Opt<PathBuf> = None, shown "none: plain ws://";
    /// TLS private key (PEM: PKCS#8, PKCS#1 or SEC1).
    tls_key => tls_key: Opt<PathBuf> = None;
    /// Requests per second per connection; excess gets `-32001 rate_limited`.
    rate_limit_per_sec => rate_limit_per_sec: Opt<u32> = None, shown "no limit", min 1;
    /// Burst of requests per connection.
    rate_limit_burst => rate_limit_burst: Opt<u32> = None, shown "rate_limit_per_sec", min 1;
    /// Compute worker threads.
    workers => workers: Opt<usize> = None, shown "available cores", min 1;
    /// Time slice of CPU tasks.
    slice_us => slice: Micros = Some(2_000), min 100;
    /// CPU time after which a task no longer counts as short: a connection's
    /// short tasks run least attained service first (they finish first), then
    /// its longer ones oldest first (a batch of long tasks streams its results
    /// instead of finishing all together near the end). A huge value keeps
    /// least attained service throughout.
    las_threshold_ms => las_threshold: Millis = Some(10), min 1;
    /// A CPU task burning this much CPU past its slice without a checkpoint
    /// is flagged and its worker replaced (CPU time: contention never flags).
    non_yield_ms => non_yield_after: Millis = Some(100), min 1;
    /// Most CPU tasks admitted and unfinished, over all connections.
    queue_limit => queue_limit: usize = Some(10_000), min 1;
    /// Most CPU tasks admitted and unfinished, per connection.
    connection_cpu_limit => connection_cpu_limit: usize = Some(256), min 1;
    /// Most CPU tasks admitted and unfinished per client address (IPv6 grouped
    /// by /64), over all its connections; more get `-32001 address_limit`. A
    /// quarter of `queue_limit` by default, so one flooding address leaves three
    /// quarters of the slots to everybody else.
    address_cpu_limit => address_cpu_limit: usize = Some(2_560), min 1;
    /// Process memory past which new CPU tasks get `-32001 memory` and the
    /// largest tasks are flagged for the operator (at least 16 MiB).
    memory_budget_bytes => memory_budget_bytes: Opt<Bytes> = None, shown "75% of the machine's (or cgroup's) memory", min 16777216;
    /// Niceness of compute workers (0 leaves it alone), so connection threads
    /// win the CPU when both want it.
    nice => nice: i32 = Some(10);
    /// How long a detached session waits for its client to resume (at most 15
    /// minutes; a client may ask for less); then its tasks are cancelled and its
    /// responses freed.
    session_window_ms => session_window: Millis = Some(120_000), min 1;
    /// Bytes of unacknowledged responses a session keeps; beyond it a detached
    /// session's response is replaced by `-32021`, an attached client is closed (1008).
    session_buffer_bytes => session_buffer_bytes: Bytes = Some(4 << 20), min 1024;
    /// Unacknowledged responses a session keeps (as `session_buffer_bytes`).
    session_buffer_responses => session_buffer_responses: usize = Some(1024), min 1;
    /// Detached sessions per client address (IPv6: per /64); at the bound the
    /// address's oldest detached session ends early.
    sessions_detached_per_ip => sessions_detached_per_ip: usize = Some(256), min 1;
    /// Bytes of responses kept by one address's detached sessions (as
    /// `sessions_detached_per_ip`).
    session_bytes_per_ip => session_bytes_per_ip: Bytes = Some(64 << 20), min 1024;
    /// Detached sessions in all; at the bound the oldest detached session of
    /// the address holding the most ends early.
    sessions_detached => sessions_detached: usize = Some(10_000), min 1;
    /// Bytes of responses kept by all detached sessions (as `sessions_detached`).
    session_bytes_total => session_bytes_total: Bytes = Some(1 << 30), min 1024;
    /// NATS server through which this node joins a cluster
    /// (`nats://HOST:PORT`); without one the node serves alone. Needs the
    /// library's `cluster` feature (on in the `taskwire` binary).
    nats => nats: Opt<String> = None, shown "none: the node serves alone";
    /// This node's name in the cluster: letters, digits, `-` and `_`, unique
    /// among the nodes (task ids elsewhere read `NAME/ID`).
    node => node: Opt<String> = None, shown "hostname-pid";
    /// How long a CPU task waits in the local queue before it may run on a
    /// peer that announced spare workers.
    cluster_offload_ms => cluster_offload: Millis = Some(10), min 1;
    /// How often a node announces itself (its spare workers and queue) to its peers.
    cluster_beat_ms => cluster_beat: Millis = Some(500), min 10;
    /// Silence after which a peer is taken as lost: its tasks are answered
    /// `-32008`, and tasks it sent here are cancelled.
    cluster_dead_ms => cluster_dead_after: Millis = Some(3_000), min 100;
    /// Directory of WebAssembly modules registered at start: every `NAME.wasm`
    /// or `NAME.wat` as task `NAME`, with an optional `NAME.toml` (docs/WASM.md).
    wasm_dir => wasm_dir: Opt<PathBuf> = None, shown "none";
    /// Linear memory one WebAssembly task may have; past it the task is
    /// answered `-32010`. A module's `NAME.toml` may set less. Also the size
    /// of each pooled memory slot (address space reserved per instance slot).
    wasm_memory_limit_bytes => wasm_memory_limit: Bytes = Some(64 << 20), min 65536;
    /// Linear memory of all WebAssembly tasks together; a task whose growth
    /// would pass it is answered `-32010`.
    wasm_memory_budget_bytes => wasm_memory_budget: Bytes = Some(1 << 30), min 65536;
    /// WebAssembly tasks admitted and unfinished at once (the pooling
    /// allocator's instance slots); more get `-32001 wasm_instances`.
    wasm_instances => wasm_instances: usize = Some(256), min 1;
    /// Installed WebAssembly modules at most (the admin API refuses more).
    wasm_max_modules => wasm_max_modules: usize = Some(64), min 1;
    /// Offer the demo tasks `spin`, `runaway` and `crash` (a CPU burner, a task
    /// that never ends, a task that panics), for binaries that offer them: any
    /// client may then burn CPU until stopped; for one's own machine only.
    demo => demo: bool = Some(false);
    /// Log filter, `RUST_LOG` syntax (e.g. `info,taskwire=debug`), for binaries that log.
    log => log: String = Some("info".to_string()), env "RUST_LOG";
}

impl Default for Config {
    fn default() -> Self {
        // The declared defaults are constants; `defaults_are_valid` checks them.
        Settings::default()
            .into_config()
            .unwrap_or_else(|e| panic!("a declared default is invalid: {e}"))
    }
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

    /// The environment layer: every `TASKWIRE_*` variable of a setting (an
    /// empty one counts as unset). A bad value names its variable.
    pub fn from_env() -> Result<Settings, ConfigError> {
        Self::from_lookup(|name| std::env::var_os(name))
    }

    /// The environment layer from any lookup (for tests and embedding).
    pub fn from_lookup(
        mut var: impl FnMut(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Settings, ConfigError> {
        let mut not_unicode = None;
        let layer = Self::from_texts(
            |spec| {
                let v = var(&spec.env)?;
                match v.into_string() {
                    Ok(s) if s.trim().is_empty() => None,
                    Ok(s) => Some(vec![s]),
                    Err(_) => {
                        not_unicode.get_or_insert_with(|| spec.env.clone());
                        None
                    }
                }
            },
            |spec, message| ConfigError::Env {
                var: spec.env.clone(),
                message,
            },
        )?;
        match not_unicode {
            Some(var) => Err(ConfigError::Env {
                var,
                message: "not valid UTF-8".to_string(),
            }),
            None => Ok(layer),
        }
    }
}

/// Where a layer of settings came from, to name it in an error.
#[derive(Clone, Debug)]
enum Origin {
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    Flags,
    Env,
    File(PathBuf),
}

/// The file named by `TASKWIRE_CONFIG`, if set and not empty.
fn config_file_from_env() -> Option<PathBuf> {
    std::env::var_os("TASKWIRE_CONFIG")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Merges `layers` (the highest first) over the defaults and validates the
/// result. A value that parses but cannot be run with is traced to the layer
/// that set it, so that the message names the flag, the variable or the file
/// the operator has to fix (the setting alone would leave them guessing which).
fn merge_layers(layers: Vec<(Settings, Origin)>) -> Result<Config, ConfigError> {
    let merged = layers
        .iter()
        .rev()
        .fold(Settings::default(), |lower, (layer, _)| {
            layer.clone().or(lower)
        });
    merged.into_config().map_err(|e| match e {
        ConfigError::Invalid { setting, reason } => {
            let key = setting.split('.').next().unwrap_or(setting);
            let spec = specs().into_iter().find(|s| s.key == key);
            let from =
                layers
                    .iter()
                    .find(|(layer, _)| layer.is_set(key))
                    .and_then(|(_, origin)| {
                        let spec = spec.as_ref()?;
                        Some(match origin {
                            Origin::Flags => format!("--{}", spec.flag),
                            Origin::Env => spec.env.clone(),
                            Origin::File(path) => path.display().to_string(),
                        })
                    });
            let reason = match from {
                Some(from) => format!("{reason} (set by {from})"),
                None => reason,
            };
            ConfigError::Invalid { setting, reason }
        }
        other => other,
    })
}

/// The layers of the `taskwire` binary without its flags, for a program that
/// parses no command line (or not with clap): `TASKWIRE_*` variables over the
/// TOML file `file` (else the one `TASKWIRE_CONFIG` names, if any) over the
/// defaults, validated. Every error names the variable, the file key or the
/// setting at fault. With clap, flatten [`Flags`] (feature `cli`) instead.
///
/// ```no_run
/// let config = taskwire::config::load(None)?;
/// # Ok::<(), taskwire::config::ConfigError>(())
/// ```
pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
    let mut layers = vec![(Settings::from_env()?, Origin::Env)];
    if let Some(path) = file.map(Path::to_path_buf).or_else(config_file_from_env) {
        layers.push((Settings::load(&path)?, Origin::File(path)));
    }
    merge_layers(layers)
}

/// How clients are let onto `/ws`, as the start-up log tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Authentication {
    /// No check: any client that passes the Origin check may connect.
    None,
    /// The configuration's static tokens (how many; never the tokens).
    Tokens(usize),
    /// A connect hook of the application decides.
    ConnectHook,
}

/// What a server with a given configuration exposes and its main limits, for
/// the start-up log: what an operator must see at a glance before the server
/// faces clients. It holds no secret. [`Config::startup_summary`] makes one.
#[derive(Clone, Debug)]
pub struct StartupSummary {
    /// Who may open `/ws`; an application with a connect hook sets
    /// [`Authentication::ConnectHook`].
    pub authentication: Authentication,
    /// Whether `/admin` and `/metrics` take a bearer token (else loopback peers only).
    pub admin_token: bool,
    /// Whether the server speaks TLS.
    pub tls: bool,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Whether the demo tasks are offered.
    pub demo: bool,
    /// Open connections, in all and per client address.
    pub connections: (usize, Option<usize>),
    /// Requests in flight per connection.
    pub inflight: usize,
    /// CPU tasks admitted: in all, per connection, per client address.
    pub cpu_queue: (usize, usize, usize),
    /// Largest WebSocket message, in bytes.
    pub frame_bytes: usize,
    /// The memory budget in effect, in bytes.
    pub memory_budget: u64,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
}

impl StartupSummary {
    /// One line per topic: authentication, admin access, TLS, limits, demo tasks.
    pub fn lines(&self) -> Vec<String> {
        let auth = match self.authentication {
            Authentication::None => {
                "authentication: none (any client that passes the Origin check opens /ws)"
                    .to_string()
            }
            Authentication::Tokens(n) => format!("authentication: {n} static token(s) on /ws"),
            Authentication::ConnectHook => "authentication: a connect hook on /ws".to_string(),
        };
        let admin = if self.admin_token {
            "admin API and /metrics: bearer token (admin_token), from any address"
        } else {
            "admin API and /metrics: loopback peers only (no admin_token)"
        };
        let tls = if self.tls {
            "TLS: on (wss://, https://)"
        } else {
            "TLS: off (plain ws://, http://)"
        };
        let per_ip = self
            .connections
            .1
            .map_or("no limit".to_string(), |n| n.to_string());
        let limits = format!(
            "limits: connections {} (per address {per_ip}), in flight per connection {}, \
             CPU tasks {} (per connection {}, per address {}), frame {}, memory budget {}",
            self.connections.0,
            self.inflight,
            self.cpu_queue.0,
            self.cpu_queue.1,
            self.cpu_queue.2,
            mib(self.frame_bytes as u64),
            mib(self.memory_budget),
        );
        let demo = if self.demo {
            "demo tasks (spin, runaway, crash): on"
        } else {
            "demo tasks (spin, runaway, crash): off (--demo offers them)"
        };
        vec![
            auth,
            admin.to_string(),
            tls.to_string(),
            limits,
            demo.to_string(),
        ]
    }

    /// What the operator should not leave as it is: the demo tasks offered on
    /// an address that is not loopback.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.demo && !self.addr.ip().is_loopback() {
            out.push(format!(
                "the demo tasks are on and the server listens on {}, not loopback: \
                 any client that reaches it can burn CPU (runaway) and fill the log (crash); \
                 turn off `demo` on a server others can reach",
                self.addr
            ));
        }
        out
    }
}

/// Characters a client token may hold: safe in a header, a query string and a
/// cookie without any escaping.
fn token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | '~')
}

/// The shortest client token accepted: shorter ones can be guessed online.
pub const MIN_TOKEN_LEN: usize = 16;

/// A host name or address as it appears in `Host` (an optional port allowed),
/// or `*`; not an origin or a URL.
fn valid_host(h: &str) -> bool {
    h == "*"
        || (!h.is_empty()
            && h.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':' | '[' | ']')
            }))
}

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
    /// The TLS files, when both are set.
    pub fn tls(&self) -> Option<TlsConfig> {
        Some(TlsConfig {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }

    /// What a server with this configuration exposes and its main limits,
    /// for the start-up log (the `taskwire` binary logs its
    /// [`lines`](StartupSummary::lines) and
    /// [`warnings`](StartupSummary::warnings)).
    pub fn startup_summary(&self) -> StartupSummary {
        StartupSummary {
            authentication: if self.auth_tokens.is_empty() {
                Authentication::None
            } else {
                Authentication::Tokens(self.auth_tokens.len())
            },
            admin_token: self.admin_token.is_some(),
            tls: self.tls().is_some(),
            addr: self.addr,
            demo: self.demo,
            connections: (self.max_connections, self.max_connections_per_ip),
            inflight: self.max_inflight_per_connection,
            cpu_queue: (
                self.queue_limit,
                self.connection_cpu_limit,
                self.address_cpu_limit,
            ),
            frame_bytes: self.max_frame_bytes,
            memory_budget: self.compute().memory_budget,
        }
    }

    /// The server-wide request rate limit, if any.
    pub fn rate_limit(&self) -> Option<RateLimit> {
        let per_second = self.rate_limit_per_sec?;
        Some(RateLimit {
            per_second,
            burst: self.rate_limit_burst.unwrap_or(per_second),
        })
    }

    /// The rate of WebSocket pings a client may send.
    pub fn ping_rate(&self) -> RateLimit {
        RateLimit {
            per_second: self.ping_rate_per_sec,
            burst: self.ping_rate_burst,
        }
    }

    /// The compute pool's part of the settings.
    pub fn compute(&self) -> ComputeConfig {
        let d = ComputeConfig::default();
        let workers = self.workers.unwrap_or(d.workers);
        ComputeConfig {
            workers,
            slice: self.slice,
            non_yield_after: self.non_yield_after,
            max_extra_workers: workers,
            queue_limit: self.queue_limit,
            per_connection_limit: self.connection_cpu_limit,
            address_cpu_limit: self.address_cpu_limit,
            memory_budget: self
                .memory_budget_bytes
                .map_or(d.memory_budget, |b| b as u64),
            las_threshold: self.las_threshold,
            nice: self.nice,
            ..d
        }
    }

    /// Checks every setting; the error names the first one at fault (by its
    /// configuration-file name). [`crate::Server::bind`] calls this.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_declared()?;
        if self.outbound_bytes < self.max_frame_bytes {
            return Err(invalid(
                "outbound_bytes",
                "must be at least max_frame_bytes (a reply as large as a request must fit)",
            ));
        }
        if self.outbound_bytes_total < self.outbound_bytes {
            return Err(invalid(
                "outbound_bytes_total",
                "must be at least outbound_bytes (one connection's queue must fit)",
            ));
        }
        if self.wasm_memory_limit > 4 << 30 {
            return Err(invalid(
                "wasm_memory_limit_bytes",
                "must be at most 4 GiB (a 32-bit WebAssembly memory)",
            ));
        }
        if self.wasm_memory_budget < self.wasm_memory_limit {
            return Err(invalid(
                "wasm_memory_budget_bytes",
                "must be at least wasm_memory_limit_bytes (one task at its limit must fit)",
            ));
        }
        if self.wasm_instances > 100_000 {
            // Each slot reserves a memory's worth of address space up front.
            return Err(invalid("wasm_instances", "must be at most 100000"));
        }
        if self.session_window > std::time::Duration::from_secs(15 * 60) {
            return Err(invalid(
                "session_window_ms",
                "must be at most 900000 (15 minutes)",
            ));
        }
        if let Some(n) = &self.node {
            let ok = !n.is_empty()
                && n.len() <= 64
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if !ok {
                return Err(invalid(
                    "node",
                    "must be 1 to 64 letters, digits, `-` or `_` (it is part of NATS subjects)",
                ));
            }
        }
        if self.nats.as_deref().is_some_and(|u| !u.is_empty()) && !cfg!(feature = "cluster") {
            return Err(invalid(
                "nats",
                "this build has no cluster support (the library's `cluster` feature)",
            ));
        }
        if self.cluster_dead_after <= self.cluster_beat * 2 {
            return Err(invalid(
                "cluster_dead_ms",
                "must be more than twice cluster_beat_ms (one lost beat is not a lost node)",
            ));
        }
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
        for h in &self.allowed_hosts {
            if !valid_host(h) {
                return Err(invalid(
                    "allowed_hosts",
                    format!("{h:?} is not a host name like \"app.example.com\" (or \"*\")"),
                ));
            }
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                return Err(invalid("tls_key", "`tls_cert` is set but not `tls_key`"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert", "`tls_key` is set but not `tls_cert`"))
            }
            _ => {}
        }
        rate(
            self.rate_limit_per_sec,
            self.rate_limit_burst,
            ("rate_limit_per_sec", "rate_limit_burst"),
        )?;
        let positive = |name: &'static str, v: u128| {
            if v == 0 {
                Err(invalid(name, "must be greater than 0"))
            } else {
                Ok(())
            }
        };
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
            if let Some(r) = t.rate_limit {
                positive("tokens.rate_limit_per_sec", r.per_second as u128)?;
                positive("tokens.rate_limit_burst", r.burst as u128)?;
            }
        }
        if !(-20..=19).contains(&self.nice) {
            return Err(invalid("nice", "must be between -20 and 19"));
        }
        Ok(())
    }
}

/// The README's configuration table, derived from the declarations (a test
/// keeps the README equal to it).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| file key | flag | environment | unit | default | what |\n|---|---|---|---|---|---|\n",
    );
    for s in specs() {
        let repeat = if s.list { " (repeat)" } else { "" };
        let comma = if s.list { " (comma-separated)" } else { "" };
        out.push_str(&format!(
            "| `{}` | `--{}`{repeat} | `{}`{comma} | {} | {} | {} |\n",
            s.key,
            s.flag,
            s.env,
            s.unit,
            s.default,
            s.doc.replace('|', "\\|"),
        ));
    }
    out
}

#[cfg(feature = "cli")]
pub use flags::Flags;

#[cfg(feature = "cli")]
mod flags {
    use super::*;
    use clap::{Arg, ArgAction, ArgMatches, Command};

    /// Every setting as a command-line flag, plus `--config FILE`: flatten it
    /// into your own clap command (`#[command(flatten)] settings: Flags`) and
    /// [`Flags::load`] gives the layered, validated [`Config`], exactly as the
    /// `taskwire` binary does.
    ///
    /// ```
    /// use clap::Parser;
    /// #[derive(Parser)]
    /// struct Cli {
    ///     #[command(flatten)]
    ///     settings: taskwire::config::Flags,
    /// }
    /// let cli = Cli::parse_from(["app", "--max-inflight", "8"]);
    /// let cfg = cli.settings.load().unwrap();
    /// assert_eq!(cfg.max_inflight_per_connection, 8);
    /// ```
    #[derive(Clone, Debug, Default)]
    pub struct Flags {
        config: Option<PathBuf>,
        values: Vec<(&'static str, Vec<String>)>,
    }

    impl Flags {
        /// The flags layer alone; a bad value names its flag.
        pub fn settings(&self) -> Result<Settings, ConfigError> {
            Settings::from_texts(
                |spec| {
                    self.values
                        .iter()
                        .find(|(k, _)| *k == spec.key)
                        .map(|(_, v)| v.clone())
                },
                |spec, message| ConfigError::Flag {
                    flag: spec.flag.clone(),
                    message,
                },
            )
        }

        /// The file named by `--config` (or `TASKWIRE_CONFIG`), if any.
        pub fn config_file(&self) -> Option<PathBuf> {
            self.config.clone().or_else(config_file_from_env)
        }

        /// Flags over the environment over the file over the defaults,
        /// validated. Every error names what to fix: the flag, the variable,
        /// the file and key, or the setting and where its value came from.
        pub fn load(&self) -> Result<Config, ConfigError> {
            let mut layers = vec![
                (self.settings()?, Origin::Flags),
                (Settings::from_env()?, Origin::Env),
            ];
            if let Some(path) = self.config_file() {
                layers.push((Settings::load(&path)?, Origin::File(path)));
            }
            merge_layers(layers)
        }
    }

    impl clap::FromArgMatches for Flags {
        fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
            let values = specs()
                .into_iter()
                .filter_map(|s| {
                    let v: Vec<String> = m.get_many::<String>(s.key)?.cloned().collect();
                    Some((s.key, v))
                })
                .collect();
            Ok(Flags {
                config: m.get_one::<String>("config").map(PathBuf::from),
                values,
            })
        }

        fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
            *self = Self::from_arg_matches(m)?;
            Ok(())
        }
    }

    impl clap::Args for Flags {
        fn augment_args(cmd: Command) -> Command {
            let mut cmd = cmd.arg(
                Arg::new("config")
                    .long("config")
                    .value_name("FILE")
                    .help("A TOML file with any of the settings below (same names, snake_case) [env: TASKWIRE_CONFIG]"),
            );
            for s in specs() {
                let unit = if s.unit.is_empty() {
                    String::new()
                } else {
                    format!(", in {}", s.unit)
                };
                let value_name = if s.unit.is_empty() {
                    "VALUE".to_string()
                } else {
                    s.unit.to_ascii_uppercase()
                };
                let mut arg = Arg::new(s.key)
                    .long(s.flag)
                    .value_name(value_name)
                    .allow_negative_numbers(true)
                    .action(if s.list {
                        ArgAction::Append
                    } else {
                        ArgAction::Set
                    })
                    .help(format!(
                        "{}{unit} [default: {}] [env: {}]",
                        s.doc, s.default, s.env
                    ));
                if s.switch {
                    // `--demo` alone switches it on; `--demo false` still
                    // overrides a `true` from the file or the environment.
                    arg = arg
                        .value_name("BOOL")
                        .num_args(0..=1)
                        .default_missing_value("true");
                }
                cmd = cmd.arg(arg);
            }
            cmd
        }

        fn augment_args_for_update(cmd: Command) -> Command {
            Self::augment_args(cmd)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Settings::default().into_config().unwrap();
        let c = Config::default();
        assert_eq!(c.max_inflight_per_connection, 1024);
        assert_eq!(c.ping_interval, Duration::from_secs(20));
        assert_eq!(c.slice, Duration::from_micros(2000));
    }

    #[test]
    fn every_setting_is_declared_once_with_distinct_names() {
        let specs = specs();
        let mut keys = std::collections::HashSet::new();
        let mut flags = std::collections::HashSet::new();
        let mut envs = std::collections::HashSet::new();
        for s in &specs {
            assert!(keys.insert(s.key), "{} twice", s.key);
            assert!(flags.insert(s.flag.clone()), "--{} twice", s.flag);
            assert!(envs.insert(s.env.clone()), "{} twice", s.env);
            assert!(!s.doc.is_empty(), "{} has no doc", s.key);
        }
    }

    #[test]
    fn readme_table_matches_the_declarations() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
        let readme = std::fs::read_to_string(&path).unwrap();
        let start = "<!-- settings: generated from crates/taskwire/src/config.rs -->\n";
        let end = "<!-- /settings -->";
        let from = readme.find(start).expect("README has the settings marker") + start.len();
        let to = readme[from..].find(end).expect("README has the end marker") + from;
        let table = markdown_table();
        // `TASKWIRE_BLESS=1 cargo test -p taskwire --lib readme` rewrites it.
        if std::env::var_os("TASKWIRE_BLESS").is_some() && readme[from..to] != table {
            let updated = format!("{}{table}{}", &readme[..from], &readme[to..]);
            std::fs::write(&path, updated).unwrap();
            return;
        }
        assert_eq!(
            &readme[from..to],
            table,
            "the README's configuration table is stale; replace it with:\n{table}"
        );
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
    fn environment_layer_names_the_variable() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| std::ffi::OsString::from(v))
            }
        };
        let s = Settings::from_lookup(vars(&[
            ("TASKWIRE_MAX_INFLIGHT", "12"),
            (
                "TASKWIRE_ALLOWED_ORIGINS",
                "https://a.example, https://b.example",
            ),
            ("TASKWIRE_ADMIN_TOKEN", ""),
            ("RUST_LOG", "debug"),
        ]))
        .unwrap();
        assert_eq!(s.max_inflight, Some(12));
        assert_eq!(s.allowed_origins.as_ref().map(Vec::len), Some(2));
        assert_eq!(s.admin_token, None, "an empty variable is unset");
        assert_eq!(s.log.as_deref(), Some("debug"));
        let e = Settings::from_lookup(vars(&[("TASKWIRE_MAX_INFLIGHT", "many")])).unwrap_err();
        assert!(e.to_string().contains("TASKWIRE_MAX_INFLIGHT"), "{e}");
    }

    #[test]
    fn an_invalid_value_names_the_layer_that_set_it() {
        let env = Settings::from_lookup(|name| {
            (name == "TASKWIRE_MAX_BATCH").then(|| std::ffi::OsString::from("0"))
        })
        .unwrap();
        let file = Settings::from_toml("max_batch = 5\nqueue_limit = 0\n").unwrap();
        let e = merge_layers(vec![
            (env.clone(), Origin::Env),
            (file.clone(), Origin::File("/etc/t.toml".into())),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("`max_batch`"), "{e}");
        assert!(e.contains("TASKWIRE_MAX_BATCH"), "{e}");
        let flags = Settings {
            max_batch: Some(3),
            ..Settings::default()
        };
        let e = merge_layers(vec![
            (flags, Origin::Flags),
            (env, Origin::Env),
            (file, Origin::File("/etc/t.toml".into())),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("`queue_limit`"), "{e}");
        assert!(e.contains("/etc/t.toml"), "{e}");
    }

    #[test]
    fn startup_summary_tells_exposure_without_secrets() {
        let cfg = Settings::from_toml(
            "addr = \"0.0.0.0:0\"\ndemo = true\nadmin_token = \"admin-secret-0123456789\"\n\
             [[tokens]]\ntoken = \"client-secret-0123456789\"\n",
        )
        .and_then(Settings::into_config)
        .unwrap();
        let s = cfg.startup_summary();
        let text = format!("{:?}{}{}", s, s.lines().join("\n"), s.warnings().join("\n"));
        assert!(!text.contains("secret"), "{text}");
        assert!(text.contains("1 static token"), "{text}");
        assert!(text.contains("bearer token"), "{text}");
        assert!(text.contains("TLS: off"), "{text}");
        assert_eq!(s.warnings().len(), 1, "demo on a public address");
        let local = Config::default().startup_summary();
        assert!(local.warnings().is_empty());
        assert!(local.lines().join("\n").contains("loopback peers only"));
        assert!(local.lines().join("\n").contains("authentication: none"));
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
            ("max_frame_bytes = 10", "max_frame_bytes"),
            ("max_batch = 0", "max_batch"),
            ("outbound_bytes_total = 1024", "outbound_bytes_total"),
            ("ping_rate_per_sec = 0", "ping_rate_per_sec"),
            ("address_cpu_limit = 0", "address_cpu_limit"),
            ("memory_budget_bytes = 4", "memory_budget_bytes"),
            ("max_http_connections = 0", "max_http_connections"),
            (
                "max_http_connections_per_ip = 0",
                "max_http_connections_per_ip",
            ),
            ("request_head_timeout_ms = 0", "request_head_timeout_ms"),
            ("allowed_hosts = [\"https://a.example\"]", "allowed_hosts"),
            ("trusted_proxies = [\"10.0.0.0/33\"]", "trusted_proxies"),
            ("trusted_proxies = [\"proxy.example\"]", "trusted_proxies"),
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
    fn a_config_built_in_code_is_checked_too() {
        let cfg = Config {
            max_inflight_per_connection: 0,
            ..Config::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_inflight"));
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

    #[cfg(feature = "cli")]
    #[test]
    fn flags_parse_repeat_and_name_themselves() {
        use clap::Parser;
        #[derive(Parser, Debug)]
        struct Cli {
            #[command(flatten)]
            settings: Flags,
        }
        let cli = Cli::try_parse_from([
            "t",
            "--max-inflight",
            "7",
            "--allowed-origin",
            "https://a.example",
            "--allowed-origin",
            "https://b.example,https://c.example",
            "--nice",
            "-5",
            "--slice-us",
            "500",
        ])
        .unwrap();
        let s = cli.settings.settings().unwrap();
        assert_eq!(s.max_inflight, Some(7));
        assert_eq!(s.allowed_origins.map(|o| o.len()), Some(3));
        assert_eq!(s.nice, Some(-5));
        assert_eq!(s.slice_us, Some(500));
        let cli = Cli::try_parse_from(["t", "--demo", "--require-origin", "false"]).unwrap();
        let s = cli.settings.settings().unwrap();
        assert_eq!((s.demo, s.require_origin), (Some(true), Some(false)));
        let cli = Cli::try_parse_from(["t", "--max-inflight", "many"]).unwrap();
        let e = cli.settings.settings().unwrap_err().to_string();
        assert!(e.contains("--max-inflight"), "{e}");
    }
}
