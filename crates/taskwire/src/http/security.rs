//! What is checked before a WebSocket upgrade (origin; the tokens are the
//! connect hook `caller::TokenAuth`, whose helpers the admin API shares from
//! here), what guards the HTTP doors around it (Host, cross-site requests,
//! the client address behind a trusted proxy) and the per-connection request
//! rate. Pure functions and small counters, no I/O, so each rule has a unit
//! test. The connection counts themselves are the crate's counting slots
//! (`limit.rs`).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use axum::http::{header, HeaderMap, Uri};

pub(crate) use crate::caller::{bearer_or_query_tokens, same};
use crate::config::IpRange;

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

/// Loopback, counting an IPv4-mapped IPv6 loopback (`::ffff:127.0.0.1`, what a
/// dual-stack listener on `[::]` sees for a local IPv4 client) as loopback too.
pub(crate) fn is_loopback(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether `ip` is one of the trusted proxies.
pub(crate) fn trusted(ip: IpAddr, proxies: &[IpRange]) -> bool {
    proxies.iter().any(|p| p.contains(ip))
}

/// One hop of `X-Forwarded-For` or a `Forwarded` `for=` value: an address,
/// with or without a port (`192.0.2.1`, `"192.0.2.1:80"`, `"[2001:db8::1]:80"`).
/// `unknown` and obfuscated names (`_hidden`) are not addresses.
fn parse_hop(v: &str) -> Option<SocketAddr> {
    let v = v.trim().trim_matches('"');
    if let Ok(ip) = IpAddr::from_str(v) {
        return Some(SocketAddr::new(ip.to_canonical(), 0));
    }
    if let Some(inner) = v.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return IpAddr::from_str(inner)
            .ok()
            .map(|ip| SocketAddr::new(ip.to_canonical(), 0));
    }
    SocketAddr::from_str(v)
        .ok()
        .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
}

/// The client behind a proxy. Only when the TCP peer is a trusted proxy is a
/// forwarding header read, and then the right-most hop that is not itself a
/// trusted proxy is the client: every hop to its left was written by the
/// client (or by proxies we do not trust) and could be forged. A hop that is no
/// address (`unknown`) stops the walk: the proxy that wrote it is the client as
/// far as we can tell. `X-Forwarded-For` is read when present (what most
/// proxies set), else `Forwarded`; the proxy must overwrite or strip the one it
/// does not set (docs/SECURITY.md).
pub(crate) fn client_addr(
    peer: SocketAddr,
    headers: &HeaderMap,
    proxies: &[IpRange],
) -> SocketAddr {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    if !trusted(peer.ip(), proxies) {
        return peer;
    }
    let mut hops: Vec<&str> = Vec::new();
    let xff = headers.get_all("x-forwarded-for");
    if xff.iter().next().is_some() {
        for v in xff {
            let Ok(v) = v.to_str() else { return peer };
            hops.extend(v.split(','));
        }
    } else {
        for v in headers.get_all(header::FORWARDED) {
            let Ok(v) = v.to_str() else { return peer };
            for element in v.split(',') {
                let hop = element.split(';').find_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    k.trim().eq_ignore_ascii_case("for").then_some(v)
                });
                // An element without `for=` still is a hop we cannot place.
                hops.push(hop.unwrap_or("unknown"));
            }
        }
    }
    let mut client = peer;
    for hop in hops.iter().rev() {
        match parse_hop(hop) {
            Some(a) if trusted(a.ip(), proxies) => client = a,
            Some(a) => return a,
            None => return client,
        }
    }
    client
}

/// The host part of a `Host` header or URI authority, lower-cased, without its
/// port, brackets or a trailing dot.
fn host_name(host: &str) -> String {
    let h = host.trim();
    let name = if let Some(rest) = h.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default()
    } else {
        match h.rsplit_once(':') {
            Some((n, port)) if port.chars().all(|c| c.is_ascii_digit()) => n,
            _ => h,
        }
    };
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The DNS rebinding check: a request that is let in because it comes from (or
/// is made to) this machine must also name this machine, or a host the
/// operator listed; a page on `evil.example` whose name was re-pointed to
/// 127.0.0.1 sends `Host: evil.example`. Loopback names are `localhost` and
/// `*.localhost` (RFC 6761: they never leave the machine) and loopback
/// addresses, with any port.
pub(crate) fn host_allowed(host: Option<&str>, allowed: &[String]) -> bool {
    let Some(host) = host else {
        return false;
    };
    let name = host_name(host);
    if name == "localhost" || name.ends_with(".localhost") {
        return true;
    }
    if IpAddr::from_str(&name).is_ok_and(is_loopback) {
        return true;
    }
    allowed.iter().any(|a| a == "*" || host_name(a) == name)
}

/// The cross-site request forgery check for state-changing admin requests
/// (POST, PUT, DELETE). A browser marks a request a page on another site made
/// with `Sec-Fetch-Site` (modern browsers) and `Origin` (every browser, on a
/// POST); either telling of another site refuses it. A request with neither
/// comes from a non-browser client, which passes here (it still needs the
/// token, or a loopback address, to get in at all). `*` in `allowed_origins`
/// (meant for `/ws`) is not honoured here: it would turn this check off.
pub(crate) fn same_site_request(headers: &HeaderMap, allowed_origins: &[String]) -> bool {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        // `same-site` is another origin of the same site, such as another
        // port on localhost: another application, not ours.
        if !matches!(site.trim(), "same-origin" | "none") {
            return false;
        }
    }
    match text(header::ORIGIN.as_str()) {
        None => true,
        Some(origin) => {
            let listed: Vec<String> = allowed_origins
                .iter()
                .filter(|o| o.as_str() != "*")
                .cloned()
                .collect();
            origin_allowed(Some(origin), text(header::HOST.as_str()), &listed, false)
        }
    }
}

/// The host a request names: its `Host` header, or the authority of an
/// absolute-form request target.
pub(crate) fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caller::{find_token, presented_tokens};
    use crate::config::AuthToken;
    use crate::limit::address_group;
    use std::time::{Duration, Instant};

    use crate::limit::{LogLimiter, TokenBucket};
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
        let mut b = TokenBucket::new(10, 3, t0);
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

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn loopback_and_address_groups() {
        assert!(is_loopback(ip("127.0.0.1")));
        assert!(is_loopback(ip("127.9.8.7")));
        assert!(is_loopback(ip("::1")));
        assert!(is_loopback(ip("::ffff:127.0.0.1")));
        assert!(!is_loopback(ip("::ffff:10.0.0.1")));
        assert!(!is_loopback(ip("0.0.0.0")));
        assert_eq!(address_group(ip("192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(address_group(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(
            address_group(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(
            address_group(ip("2001:db8:1:2::1")),
            address_group(ip("2001:db8:1:3::1"))
        );
    }

    #[test]
    fn ip_ranges() {
        let r: IpRange = "10.1.0.0/16".parse().unwrap();
        assert!(r.contains(ip("10.1.200.3")));
        assert!(r.contains(ip("::ffff:10.1.0.1")));
        assert!(!r.contains(ip("10.2.0.1")));
        assert!(!r.contains(ip("::1")));
        let one: IpRange = "127.0.0.1".parse().unwrap();
        assert!(one.contains(ip("127.0.0.1")));
        assert!(!one.contains(ip("127.0.0.2")));
        let all: IpRange = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("198.51.100.1")));
        let v6: IpRange = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains(ip("2001:db8:ffff::1")));
        assert!(!v6.contains(ip("2001:db9::1")));
        assert_eq!(v6.to_string(), "2001:db8::/32");
        for bad in ["10.0.0.0/33", "::/129", "proxy.example", "10.0.0.0/x", ""] {
            assert!(bad.parse::<IpRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn client_address_behind_trusted_proxies() {
        let proxies: Vec<IpRange> =
            vec!["127.0.0.1".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let stranger: SocketAddr = "192.0.2.9:5000".parse().unwrap();
        let with = |name: &'static str, v: &'static str| {
            let mut h = HeaderMap::new();
            h.append(name, HeaderValue::from_static(v));
            h
        };
        // No header, or an untrusted peer: the peer.
        assert_eq!(client_addr(peer, &HeaderMap::new(), &proxies), peer);
        let xff = with("x-forwarded-for", "203.0.113.5");
        assert_eq!(client_addr(stranger, &xff, &proxies), stranger);
        assert_eq!(client_addr(peer, &xff, &[]), peer);
        // Trusted: the right-most hop that is not a proxy; forged hops to its left are ignored.
        let got = client_addr(
            peer,
            &with("x-forwarded-for", "6.6.6.6, 203.0.113.5, 10.1.1.1"),
            &proxies,
        );
        assert_eq!(got.ip(), ip("203.0.113.5"));
        // Forwarded, with quoting, ports and IPv6.
        let got = client_addr(
            peer,
            &with(
                "forwarded",
                "for=6.6.6.6, for=\"[2001:db8::7]:4711\";proto=https, for=10.0.0.2",
            ),
            &proxies,
        );
        assert_eq!(got.ip(), ip("2001:db8::7"));
        assert_eq!(got.port(), 4711);
        // A hop that is no address: the proxy that wrote it.
        let got = client_addr(
            peer,
            &with("x-forwarded-for", "6.6.6.6, unknown, 10.0.0.3"),
            &proxies,
        );
        assert_eq!(got.ip(), ip("10.0.0.3"));
        // All hops are proxies: the left-most of them.
        let got = client_addr(
            peer,
            &with("x-forwarded-for", "10.0.0.4, 10.0.0.5"),
            &proxies,
        );
        assert_eq!(got.ip(), ip("10.0.0.4"));
        // Garbage never panics and never yields an attacker's choice.
        let got = client_addr(peer, &with("x-forwarded-for", ",,[::1"), &proxies);
        assert_eq!(got, peer);
        // A v4-mapped peer counts as its IPv4 address.
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        assert_eq!(client_addr(mapped, &xff, &proxies).ip(), ip("203.0.113.5"));
    }

    #[test]
    fn host_rules() {
        let none: &[String] = &[];
        for h in [
            "localhost",
            "LOCALHOST:7878",
            "localhost.",
            "app.localhost:80",
            "127.0.0.1",
            "127.0.0.2:7878",
            "[::1]:7878",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(host_allowed(Some(h), none), "{h}");
        }
        for h in [
            "evil.example",
            "evil.example:7878",
            "localhost.evil.example",
            "10.0.0.1",
            "[::2]",
            "127.0.0.1.evil.example",
            "",
        ] {
            assert!(!host_allowed(Some(h), none), "{h}");
        }
        assert!(!host_allowed(None, none));
        let listed = vec!["Tasks.Example.com".to_string()];
        assert!(host_allowed(Some("tasks.example.com:8443"), &listed));
        assert!(!host_allowed(Some("other.example.com"), &listed));
        assert!(host_allowed(Some("anything"), &["*".to_string()]));
    }

    #[test]
    fn cross_site_rules() {
        let mk = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            h
        };
        let none: &[String] = &[];
        // curl, scripts: no Origin, no Sec-Fetch-Site.
        assert!(same_site_request(&mk(&[("host", "127.0.0.1:7878")]), none));
        // The dashboard itself.
        let own = mk(&[
            ("host", "127.0.0.1:7878"),
            ("origin", "http://127.0.0.1:7878"),
            ("sec-fetch-site", "same-origin"),
        ]);
        assert!(same_site_request(&own, none));
        // A form on another site, with or without Sec-Fetch-Site.
        let form = mk(&[
            ("host", "127.0.0.1:7878"),
            ("origin", "http://evil.example"),
        ]);
        assert!(!same_site_request(&form, none));
        let fetch = mk(&[("host", "127.0.0.1:7878"), ("sec-fetch-site", "cross-site")]);
        assert!(!same_site_request(&fetch, none));
        let sibling = mk(&[("host", "localhost:7878"), ("sec-fetch-site", "same-site")]);
        assert!(!same_site_request(&sibling, none));
        let null = mk(&[("host", "127.0.0.1:7878"), ("origin", "null")]);
        assert!(!same_site_request(&null, none));
        // Listed origins pass; `*` (meant for /ws) does not open admin.
        let app = vec!["http://evil.example".to_string()];
        assert!(same_site_request(&form, &app));
        assert!(!same_site_request(&form, &["*".to_string()]));
    }

    #[test]
    fn log_limiter_lets_one_line_a_period_through() {
        let l = LogLimiter::new(Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(l.allow(t0), Some(0));
        for i in 1..=5 {
            assert_eq!(l.allow(t0 + Duration::from_millis(i * 100)), None);
        }
        assert_eq!(l.allow(t0 + Duration::from_millis(1000)), Some(5));
        assert_eq!(l.allow(t0 + Duration::from_millis(1001)), None);
        assert_eq!(l.allow(t0 + Duration::from_secs(5)), Some(1));
    }
}
