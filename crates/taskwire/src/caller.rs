//! Who is calling: the connect hook ([`ConnectHook`]) that sees a WebSocket
//! upgrade request before it is accepted and either refuses it ([`Refusal`])
//! or names the caller ([`Caller`]: an identity, typed extensions, limits of
//! its own), and the static tokens of the configuration as one such hook
//! ([`TokenAuth`]).
//!
//! A hook's answer reaches every task of the connection through
//! [`Ctx::caller`](crate::Ctx::caller) and
//! [`Ctx::extension`](crate::Ctx::extension), and the admin API lists it as
//! the connection's and its tasks' `caller`.

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use axum::http::{header, Extensions, HeaderMap, StatusCode, Uri};

use crate::config::{AuthToken, RateLimit};
use crate::limit::Slot;
use crate::observe::RefusalReason;
use crate::task::CallerInfo;

/// The longest identity kept: a longer one is cut (at a character boundary),
/// so that a hook echoing a client's cookie cannot make log lines and admin
/// rows as long as it likes.
pub const MAX_CALLER_ID: usize = 256;

/// The longest refusal message sent: a refusal is a short status line for a
/// browser that only learns that the upgrade failed.
const MAX_REFUSAL_MESSAGE: usize = 256;

/// The cookie a browser page can use to carry its token (a browser cannot set
/// headers on a WebSocket).
pub(crate) const TOKEN_COOKIE: &str = "taskwire_token";

/// The upgrade request as a connect hook sees it: headers (cookies among
/// them), the request target (its query) and the client's address.
#[derive(Debug)]
pub struct ConnectRequest {
    peer: SocketAddr,
    headers: HeaderMap,
    uri: Uri,
}

impl ConnectRequest {
    /// A request as the server builds it; public so that a hook can be
    /// unit-tested without a server.
    pub fn new(peer: SocketAddr, headers: HeaderMap, uri: Uri) -> ConnectRequest {
        ConnectRequest { peer, headers, uri }
    }

    /// The client's address: the TCP peer, or the client a trusted proxy
    /// names (`trusted_proxies`), as every other check of the server sees it.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Every header of the upgrade request.
    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The request target (path and query).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The first value of a header, if it is text.
    pub fn header(&self, name: impl header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A cookie's value (its first occurrence), quotes removed; not decoded.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        cookies(&self.headers)
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }

    /// A query parameter's value (its first occurrence), percent-decoded.
    pub fn query(&self, name: &str) -> Option<Cow<'_, str>> {
        form_urlencoded::parse(self.uri.query()?.as_bytes())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The token of an `Authorization: Bearer` header.
    pub fn bearer(&self) -> Option<&str> {
        self.headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .find_map(|v| v.to_str().ok()?.strip_prefix("Bearer "))
            .map(str::trim)
    }
}

/// Every `name=value` pair of the `Cookie` headers, quotes removed.
fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .map(|(n, v)| (n.trim(), v.trim().trim_matches('"')))
}

/// What a connect hook says about an accepted connection: who is calling
/// (an identity for logs, the admin API and [`Ctx::caller`](crate::Ctx::caller)),
/// typed extensions every task of the connection can read
/// ([`Ctx::extension`](crate::Ctx::extension)), and optionally limits of its
/// own and guards held while the connection is open.
///
/// ```
/// use taskwire::Caller;
///
/// #[derive(Clone)]
/// struct Plan { max_jobs: usize }
///
/// let caller = Caller::new("user-42").with(Plan { max_jobs: 3 }).max_inflight(16);
/// assert_eq!(caller.id(), Some("user-42"));
/// ```
#[derive(Default)]
pub struct Caller {
    id: Option<String>,
    extensions: Extensions,
    max_inflight: Option<usize>,
    rate_limit: Option<RateLimit>,
    held: Vec<Box<dyn Any + Send>>,
}

impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("id", &self.id)
            .field("extensions", &self.extensions.len())
            .field("max_inflight", &self.max_inflight)
            .field("rate_limit", &self.rate_limit)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Caller {
    /// A caller known by `id` (a user id, a subject). At most
    /// [`MAX_CALLER_ID`] bytes are kept.
    pub fn new(id: impl Into<String>) -> Caller {
        Caller {
            id: Some(id.into()),
            ..Caller::default()
        }
    }

    /// A caller without an identity (extensions and limits may still be set).
    pub fn anonymous() -> Caller {
        Caller::default()
    }

    /// The identity, if any.
    pub fn id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// Attaches a typed value, read by tasks as
    /// [`ctx.extension::<T>()`](crate::Ctx::extension); one per type.
    pub fn with<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Caller {
        self.extensions.insert(value);
        self
    }

    /// The extensions attached so far.
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    /// The extensions, to change.
    pub fn extensions_mut(&mut self) -> &mut Extensions {
        &mut self.extensions
    }

    /// Requests in flight on this connection at most, replacing the server's
    /// `max_inflight` (as a token's own limit does).
    pub fn max_inflight(mut self, n: usize) -> Caller {
        self.max_inflight = Some(n);
        self
    }

    /// This connection's request rate, replacing the server's rate limit.
    pub fn rate_limit(mut self, rate: RateLimit) -> Caller {
        self.rate_limit = Some(rate);
        self
    }

    /// Keeps `guard` until the connection closes, then drops it: a slot of
    /// a per-user connection count, a lease. Tasks never see it.
    pub fn hold(mut self, guard: impl Send + 'static) -> Caller {
        self.held.push(Box::new(guard));
        self
    }

    /// Splits the answer: what tasks share (`None` when there is nothing to
    /// share, so an anonymous connection costs no allocation), the limits,
    /// and what the connection holds until it closes.
    pub(crate) fn into_parts(self) -> (Option<Arc<CallerInfo>>, CallerLimits, Held) {
        let id = self.id.map(|mut id| {
            if id.len() > MAX_CALLER_ID {
                let mut end = MAX_CALLER_ID;
                while !id.is_char_boundary(end) {
                    end -= 1;
                }
                id.truncate(end);
            }
            id.into_boxed_str()
        });
        let info = (id.is_some() || !self.extensions.is_empty()).then(|| {
            Arc::new(CallerInfo {
                id,
                extensions: self.extensions,
            })
        });
        let limits = CallerLimits {
            max_inflight: self.max_inflight,
            rate: self.rate_limit,
        };
        (
            info,
            limits,
            Held {
                _guards: self.held.into_boxed_slice(),
            },
        )
    }
}

/// Limits a caller brings, replacing the server's for its connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CallerLimits {
    pub max_inflight: Option<usize>,
    pub rate: Option<RateLimit>,
}

/// Guards a caller holds until its connection closes. A boxed slice, not a
/// `Vec`: it lives as long as the connection, and empty it allocates nothing.
pub(crate) struct Held {
    _guards: Box<[Box<dyn Any + Send>]>,
}

/// Why a connect hook refused an upgrade: an HTTP status and a short message,
/// the answer the client gets instead of the upgrade (a browser sees only
/// that the WebSocket failed to open).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    status: StatusCode,
    message: Cow<'static, str>,
    reason: RefusalReason,
}

impl Refusal {
    /// A refusal with this status and message. A status that is not an error
    /// (outside 400–599) is sent as 403; a message is cut to 256 bytes.
    pub fn new(status: StatusCode, message: impl Into<Cow<'static, str>>) -> Refusal {
        let status = if status.is_client_error() || status.is_server_error() {
            status
        } else {
            StatusCode::FORBIDDEN
        };
        Refusal {
            status,
            message: message.into(),
            reason: RefusalReason::ConnectHook,
        }
    }

    /// 401: no valid credential (sent with `WWW-Authenticate: Bearer`).
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(StatusCode::UNAUTHORIZED, message)
    }

    /// 403: a valid credential that may not connect.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Refusal {
        Refusal::new(StatusCode::FORBIDDEN, message)
    }

    /// The status sent.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The message sent.
    pub fn message(&self) -> &str {
        let m: &str = &self.message;
        if m.len() <= MAX_REFUSAL_MESSAGE {
            return m;
        }
        let mut end = MAX_REFUSAL_MESSAGE;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        &m[..end]
    }

    /// The `reason` label it is counted under.
    pub(crate) fn reason(&self) -> RefusalReason {
        self.reason
    }

    pub(crate) fn counted_as(mut self, reason: RefusalReason) -> Refusal {
        self.reason = reason;
        self
    }
}

/// The future a boxed connect hook returns.
pub(crate) type ConnectFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Caller, Refusal>> + Send + 'a>>;

/// Decides, before a WebSocket upgrade is accepted, whether it may connect
/// and who is calling: Phoenix's `connect/3`, as a trait.
///
/// It runs in the request's own task (never in the accept loop), after the
/// Host and Origin checks and before the connection counts (per address,
/// in all), bounded by `request_head_timeout` (past it the upgrade is refused
/// 503); a hook that panics refuses with 500. Implement it on a type:
///
/// ```
/// use taskwire::{Caller, ConnectHook, ConnectRequest, Refusal};
///
/// struct SessionCookie;
///
/// impl ConnectHook for SessionCookie {
///     async fn connect(&self, req: &ConnectRequest) -> Result<Caller, Refusal> {
///         match req.cookie("session") {
///             Some(user) => Ok(Caller::new(user)),
///             None => Err(Refusal::unauthorized("log in first")),
///         }
///     }
/// }
/// ```
///
/// or pass an `async fn(&ConnectRequest) -> Result<Caller, Refusal>`, or a
/// closure whose future borrows nothing from the request (a closure's future
/// cannot name the request's lifetime), so it copies out what it needs first:
/// `|req: &ConnectRequest| { let user = req.header("x-user").map(str::to_owned);
/// async move { … } }`.
pub trait ConnectHook: Send + Sync + 'static {
    /// Refuses the upgrade, or names its caller.
    fn connect(&self, req: &ConnectRequest)
        -> impl Future<Output = Result<Caller, Refusal>> + Send;
}

/// A function usable as a [`ConnectHook`]: any
/// `Fn(&ConnectRequest) -> impl Future<Output = Result<Caller, Refusal>>`
/// whose future may borrow the request. Implemented for you; it exists
/// because a closure's future type cannot name the request's lifetime.
pub trait ConnectFn<'a>: Send + Sync + 'static {
    /// The future the function returns.
    type Future: Future<Output = Result<Caller, Refusal>> + Send + 'a;
    /// Calls the function.
    fn call(&self, req: &'a ConnectRequest) -> Self::Future;
}

impl<'a, F, Fut> ConnectFn<'a> for F
where
    F: Fn(&'a ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Caller, Refusal>> + Send + 'a,
{
    type Future = Fut;
    fn call(&self, req: &'a ConnectRequest) -> Fut {
        self(req)
    }
}

impl<F> ConnectHook for F
where
    F: for<'a> ConnectFn<'a>,
{
    fn connect(
        &self,
        req: &ConnectRequest,
    ) -> impl Future<Output = Result<Caller, Refusal>> + Send {
        self.call(req)
    }
}

/// A [`ConnectHook`] held by the server: the trait's future, boxed.
pub(crate) trait DynConnectHook: Send + Sync {
    fn connect_boxed<'a>(&'a self, req: &'a ConnectRequest) -> ConnectFuture<'a>;
}

impl<H: ConnectHook> DynConnectHook for H {
    fn connect_boxed<'a>(&'a self, req: &'a ConnectRequest) -> ConnectFuture<'a> {
        Box::pin(self.connect(req))
    }
}

/// The `tokens` setting as a connect hook: an upgrade must present one of the
/// configured tokens (`Authorization: Bearer`, `?token=`, or the
/// `taskwire_token` cookie), else 401; each token's own limits (connections,
/// in flight, rate) apply to its connections. The caller it names is
/// `token#<n>`, `n` the token's position in the configuration, from 0: never
/// the secret itself.
///
/// The server installs it when `tokens` are configured and no other hook is
/// set. A hook of your own can hold one and call it first:
/// `let caller = self.tokens.connect(req).await?;`.
pub struct TokenAuth {
    tokens: Vec<AuthToken>,
    /// Open connections per token, by index.
    open: Vec<Arc<AtomicUsize>>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `AuthToken`'s Debug redacts the secrets.
        f.debug_struct("TokenAuth")
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl TokenAuth {
    /// Accepts these tokens (the `tokens` setting: `Config::auth_tokens`).
    pub fn new(tokens: Vec<AuthToken>) -> TokenAuth {
        let open = tokens.iter().map(|_| Arc::default()).collect();
        TokenAuth { tokens, open }
    }

    /// The check itself; synchronous, so the hook's future is ready at once.
    fn check(&self, req: &ConnectRequest) -> Result<Caller, Refusal> {
        let presented = presented_tokens(&req.headers, req.uri.query());
        let Some(i) = find_token(&self.tokens, &presented) else {
            return Err(Refusal::unauthorized("a valid token is required")
                .counted_as(RefusalReason::Unauthorized));
        };
        let mut caller = Caller::new(format!("token#{i}"));
        let (Some(t), Some(open)) = (self.tokens.get(i), self.open.get(i)) else {
            return Ok(caller);
        };
        if let Some(max) = t.max_connections {
            let Some(slot) = Slot::acquire(open, max) else {
                return Err(Refusal::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too many connections with this token",
                )
                .counted_as(RefusalReason::ConnectionsPerToken));
            };
            caller = caller.hold(slot);
        }
        caller.max_inflight = t.max_inflight;
        caller.rate_limit = t.rate_limit;
        Ok(caller)
    }
}

impl ConnectHook for TokenAuth {
    fn connect(
        &self,
        req: &ConnectRequest,
    ) -> impl Future<Output = Result<Caller, Refusal>> + Send {
        std::future::ready(self.check(req))
    }
}

/// Compares without an early exit, so response timing does not leak how much
/// of a guessed token was right.
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
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
    out.extend(
        cookies(headers)
            .filter(|(n, _)| *n == TOKEN_COOKIE)
            .map(|(_, v)| v),
    );
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

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn req(headers: &[(&'static str, &'static str)], uri: &'static str) -> ConnectRequest {
        let mut h = HeaderMap::new();
        for (k, v) in headers {
            h.append(*k, HeaderValue::from_static(v));
        }
        let peer = SocketAddr::from(([127, 0, 0, 1], 4000));
        ConnectRequest::new(peer, h, Uri::from_static(uri))
    }

    fn token(t: &str, max_connections: Option<usize>) -> AuthToken {
        AuthToken {
            token: t.into(),
            max_connections,
            max_inflight: Some(7),
            rate_limit: None,
        }
    }

    #[test]
    fn request_parts() {
        let r = req(
            &[
                ("cookie", "a=1; session=\"u1\""),
                ("cookie", "session=u2"),
                ("authorization", "Bearer  xyz "),
                ("x-user", "bob"),
            ],
            "/ws?name=J%C3%BCrgen+K&empty=&name=second",
        );
        assert_eq!(r.cookie("session"), Some("u1"));
        assert_eq!(r.cookie("a"), Some("1"));
        assert_eq!(r.cookie("missing"), None);
        assert_eq!(r.query("name").as_deref(), Some("Jürgen K"));
        assert_eq!(r.query("empty").as_deref(), Some(""));
        assert_eq!(r.query("nope"), None);
        assert_eq!(r.bearer(), Some("xyz"));
        assert_eq!(r.header("x-user"), Some("bob"));
        assert_eq!(req(&[], "/ws").query("a"), None);
    }

    #[test]
    fn token_auth_names_the_token_and_counts_its_connections() {
        let auth = TokenAuth::new(vec![
            token("aaaaaaaaaaaaaaaa", None),
            token("bbbbbbbbbbbbbbbb", Some(1)),
        ]);
        let none = auth.check(&req(&[], "/ws")).unwrap_err();
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(none.reason(), RefusalReason::Unauthorized);
        let first = auth
            .check(&req(
                &[("cookie", "taskwire_token=aaaaaaaaaaaaaaaa")],
                "/ws",
            ))
            .unwrap();
        assert_eq!(first.id(), Some("token#0"));
        assert_eq!(first.max_inflight, Some(7));
        let second = auth.check(&req(&[], "/ws?token=bbbbbbbbbbbbbbbb")).unwrap();
        assert_eq!(second.id(), Some("token#1"));
        let full = auth
            .check(&req(&[], "/ws?token=bbbbbbbbbbbbbbbb"))
            .unwrap_err();
        assert_eq!(full.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(full.reason(), RefusalReason::ConnectionsPerToken);
        // The slot goes back when the connection's guards drop.
        let (_, _, held) = second.into_parts();
        drop(held);
        assert!(auth.check(&req(&[], "/ws?token=bbbbbbbbbbbbbbbb")).is_ok());
    }

    #[test]
    fn long_identities_and_messages_are_cut_and_statuses_are_errors() {
        let long = "é".repeat(MAX_CALLER_ID);
        let (info, _, _) = Caller::new(long).into_parts();
        let id = info.unwrap().id.clone().unwrap();
        assert!(id.len() <= MAX_CALLER_ID && id.len() >= MAX_CALLER_ID - 1);
        let r = Refusal::new(StatusCode::OK, "ü".repeat(300));
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert!(r.message().len() <= MAX_REFUSAL_MESSAGE);
        // Nothing to share: no allocation for the tasks.
        assert!(Caller::anonymous().into_parts().0.is_none());
        let (info, _, _) = Caller::anonymous().with(5u8).into_parts();
        assert_eq!(info.unwrap().extensions.get::<u8>(), Some(&5));
    }
}
