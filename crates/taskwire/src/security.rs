//! What is checked before a WebSocket upgrade (origin, token, connection
//! counts) and the per-connection request rate. Pure functions and small
//! counters, no I/O, so each rule has a unit test.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::{header, HeaderMap};

use crate::config::{AuthToken, RateLimit};

/// The cookie a browser page can use to carry its token (a browser cannot set
/// headers on a WebSocket).
pub const TOKEN_COOKIE: &str = "taskwire_token";

/// Compares without an early exit, so response timing does not leak how much
/// of a guessed token was right.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Lower-cases and drops the scheme's default port, so that `https://A.com:443`
/// and a `Host: a.com` compare equal.
fn normalize_authority(scheme: &str, authority: &str) -> String {
    let a = authority.to_ascii_lowercase();
    let default = match scheme {
        "http" | "ws" => ":80",
        "https" | "wss" => ":443",
        _ => "",
    };
    match a.strip_suffix(default) {
        Some(s) if !default.is_empty() => s.to_string(),
        _ => a,
    }
}

/// The cross-site WebSocket hijacking check. A browser always sends `Origin`
/// on a WebSocket upgrade, so a page on another site is refused unless its
/// origin is listed; a request without `Origin` comes from a non-browser
/// client (which could forge any header anyway) and passes unless `require`.
pub(crate) fn origin_allowed(
    origin: Option<&str>,
    host: Option<&str>,
    allowed: &[String],
    require: bool,
) -> bool {
    let Some(origin) = origin else {
        return !require;
    };
    if allowed
        .iter()
        .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    {
        return true;
    }
    // The default: a page served by this very host (the dashboard, or an app
    // behind the same reverse proxy).
    let (Some((scheme, authority)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    let scheme = scheme.to_ascii_lowercase();
    let host_scheme = if matches!(scheme.as_str(), "https" | "wss") {
        "https"
    } else {
        "http"
    };
    normalize_authority(&scheme, authority) == normalize_authority(host_scheme, host)
}

/// The tokens a request presents explicitly: `Authorization: Bearer` and the
/// `token` query parameter. The admin API takes only these: a cookie is sent
/// by the browser on its own, which would let another site's form act with it.
pub(crate) fn bearer_or_query_tokens<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
) -> Vec<&'a str> {
    let mut out = Vec::new();
    for v in headers.get_all(header::AUTHORIZATION) {
        if let Some(t) = v.to_str().ok().and_then(|v| v.strip_prefix("Bearer ")) {
            out.push(t.trim());
        }
    }
    if let Some(q) = query {
        out.extend(q.split('&').filter_map(|kv| kv.strip_prefix("token=")));
    }
    out
}

/// Every token a request presents: `Authorization: Bearer`, the `token` query
/// parameter, the `taskwire_token` cookie. Each is checked, so a stale cookie
/// does not hide a valid header.
pub(crate) fn presented_tokens<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Vec<&'a str> {
    let mut out = bearer_or_query_tokens(headers, query);
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for c in v.split(';') {
            if let Some((name, value)) = c.trim().split_once('=') {
                if name == TOKEN_COOKIE {
                    out.push(value.trim_matches('"'));
                }
            }
        }
    }
    out
}

/// The index of the configured token that one of `presented` matches.
pub(crate) fn find_token(tokens: &[AuthToken], presented: &[&str]) -> Option<usize> {
    // Compare against every configured token, without stopping at the first
    // match, so timing says nothing about which token (or how many) exist.
    let mut found = None;
    for p in presented {
        for (i, t) in tokens.iter().enumerate() {
            if same(p, &t.token) && found.is_none() {
                found = Some(i);
            }
        }
    }
    found
}

/// Open connections per client IP address, released when the slot drops.
#[derive(Default)]
pub(crate) struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection counted against its IP address.
pub(crate) struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl PerIp {
    pub fn acquire(table: &Arc<PerIp>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut m = table.counts.lock().ok()?;
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(IpSlot {
            table: table.clone(),
            ip,
        })
    }

    /// Addresses with at least one open connection (the table forgets the rest).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.counts.lock().map(|m| m.len()).unwrap_or(0)
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.counts.lock() {
            if let Some(n) = m.get_mut(&self.ip) {
                *n -= 1;
                if *n == 0 {
                    // Keep the table as small as the set of connected addresses.
                    m.remove(&self.ip);
                }
            }
        }
    }
}

/// One connection counted against a token's `max_connections`.
pub(crate) struct CountSlot(Arc<AtomicUsize>);

impl CountSlot {
    pub fn acquire(count: &Arc<AtomicUsize>, max: usize) -> Option<CountSlot> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(CountSlot(count.clone()))
    }
}

impl Drop for CountSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A token bucket: `burst` tokens, refilled at `per_second`. Owned by one
/// connection's reader, so it needs no atomics; time is passed in, so the
/// tests need no clock.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(limit: RateLimit, now: Instant) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(limit.per_second.max(1)),
            burst: f64::from(limit.burst.max(1)),
            tokens: f64::from(limit.burst.max(1)),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn origin_rules() {
        let none: &[String] = &[];
        // No Origin: a non-browser client.
        assert!(origin_allowed(None, Some("a.com"), none, false));
        assert!(!origin_allowed(None, Some("a.com"), none, true));
        // Same host, with default ports and case folded.
        assert!(origin_allowed(
            Some("http://127.0.0.1:7878"),
            Some("127.0.0.1:7878"),
            none,
            false
        ));
        assert!(origin_allowed(
            Some("https://A.com"),
            Some("a.com:443"),
            none,
            false
        ));
        assert!(origin_allowed(
            Some("http://a.com:80"),
            Some("a.com"),
            none,
            false
        ));
        // Another site, another port, a sandboxed page.
        assert!(!origin_allowed(
            Some("http://evil.com"),
            Some("a.com"),
            none,
            false
        ));
        assert!(!origin_allowed(
            Some("http://a.com:8080"),
            Some("a.com"),
            none,
            false
        ));
        assert!(!origin_allowed(Some("null"), Some("a.com"), none, false));
        assert!(!origin_allowed(Some("http://a.com"), None, none, false));
        // The allowlist.
        let list = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(
            Some("https://APP.example.com"),
            Some("a.com"),
            &list,
            false
        ));
        assert!(!origin_allowed(
            Some("http://app.example.com"),
            Some("a.com"),
            &list,
            false
        ));
        let any = vec!["*".to_string()];
        assert!(origin_allowed(
            Some("http://x.org"),
            Some("a.com"),
            &any,
            true
        ));
    }

    #[test]
    fn tokens_from_header_query_and_cookie() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer aaa"),
        );
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("x=1; taskwire_token=ccc; y=2"),
        );
        let got = presented_tokens(&h, Some("a=1&token=bbb"));
        assert_eq!(got, vec!["aaa", "bbb", "ccc"]);
        let tokens = vec![AuthToken {
            token: "ccc".into(),
            max_connections: None,
            max_inflight: None,
            rate_limit: None,
        }];
        assert_eq!(find_token(&tokens, &got), Some(0));
        assert_eq!(find_token(&tokens, &["aaa"]), None);
        assert_eq!(find_token(&tokens, &[]), None);
    }

    #[test]
    fn bucket_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(
            RateLimit {
                per_second: 10,
                burst: 3,
            },
            t0,
        );
        for _ in 0..3 {
            assert!(b.take(t0).is_ok());
        }
        let wait = b.take(t0).unwrap_err();
        assert!(wait > Duration::from_millis(99) && wait <= Duration::from_millis(100));
        // 100 ms later: exactly one more.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.take(t1).is_ok());
        assert!(b.take(t1).is_err());
        // A long quiet period refills to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(b.take(t2).is_ok());
        }
        assert!(b.take(t2).is_err());
        // A clock that goes backwards adds nothing.
        assert!(b.take(t0).is_err());
    }

    #[test]
    fn slots_count_and_release() {
        let t = Arc::new(PerIp::default());
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let a = PerIp::acquire(&t, ip, 2).unwrap();
        let b = PerIp::acquire(&t, ip, 2).unwrap();
        assert!(PerIp::acquire(&t, ip, 2).is_none());
        assert!(PerIp::acquire(&t, "10.0.0.2".parse().unwrap(), 2).is_some());
        drop(a);
        let c = PerIp::acquire(&t, ip, 2).unwrap();
        drop((b, c));
        assert_eq!(t.len(), 0);

        let n = Arc::new(AtomicUsize::new(0));
        let s = CountSlot::acquire(&n, 1).unwrap();
        assert!(CountSlot::acquire(&n, 1).is_none());
        drop(s);
        assert!(CountSlot::acquire(&n, 1).is_some());
    }
}
