//! JSON-RPC 2.0 framing for taskwire protocol v1.
//!
//! Pure: no sockets, no tasks. The connection hands this module the text of a
//! frame and gets back parsed requests or the error object to answer with; it
//! hands it ids and results and gets back the exact text to send.

use std::fmt::Write as _;
use std::sync::Arc;

use serde::de::Deserializer;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The JSON-RPC error codes of protocol v1.
pub mod codes {
    /// The frame is not JSON.
    pub const PARSE_ERROR: i32 = -32700;
    /// Not a JSON-RPC 2.0 request, a binary frame, a duplicate in-flight id or an empty batch.
    pub const INVALID_REQUEST: i32 = -32600;
    /// No task has this name.
    pub const METHOD_NOT_FOUND: i32 = -32601;
    /// The params do not fit the task.
    pub const INVALID_PARAMS: i32 = -32602;
    /// The server failed in a way the client cannot fix.
    pub const INTERNAL_ERROR: i32 = -32603;
    /// Cancelled by `$/cancelRequest` or because the connection closed.
    pub const CANCELLED: i32 = -32800;
    /// Admission control refused the task; nothing ran.
    pub const OVERLOADED: i32 = -32001;
    /// The task's deadline passed.
    pub const DEADLINE_EXCEEDED: i32 = -32002;
    /// The task panicked.
    pub const CRASHED: i32 = -32003;
    /// An operator killed the task.
    pub const KILLED: i32 = -32004;
    /// The server is shutting down and the task did not finish.
    pub const SHUTTING_DOWN: i32 = -32005;
    /// The cluster node running the task was lost; the task may have run in
    /// part. `data` is `{"node": ...}`.
    pub const NODE_LOST: i32 = -32008;
    /// A WebAssembly task passed its memory limit. `data` is `{"limitBytes": n}`.
    pub const MEMORY_LIMIT: i32 = -32010;
    /// A WebAssembly task trapped (unreachable, out-of-bounds access, stack
    /// overflow, ...); the trap is in the message.
    pub const TRAPPED: i32 = -32011;
    /// No such session: its token is unknown, expired, already spent, or was
    /// presented with other credentials than the session was opened with.
    pub const NO_SUCH_SESSION: i32 = -32020;
    /// The result was dropped because the session's buffer was full while the
    /// client was away; the task did run. `data` is `{"bytes": n}`.
    pub const RESULT_DROPPED: i32 = -32021;
}

/// Method name of the cancellation notification.
pub const CANCEL_METHOD: &str = "$/cancelRequest";
/// Method name of progress notifications.
pub const PROGRESS_METHOD: &str = "$/progress";
/// Method name of the discovery request.
pub const DISCOVER_METHOD: &str = "rpc.discover";
/// The WebSocket subprotocol the server offers.
pub const SUBPROTOCOL: &str = "taskwire.v1";

/// A request id: a string or an integer, as the protocol allows.
///
/// Integers are kept as `i128` so that every id a client can send as a JSON
/// integer (the whole `i64` and `u64` ranges) comes back exactly as sent.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Id {
    /// An integer id.
    Int(i128),
    /// A string id.
    Str(Arc<str>),
}

impl Id {
    /// Parses an id from its JSON text; `None` when it is not a string or an integer.
    pub fn from_json(raw: &str) -> Option<Id> {
        let raw = raw.trim();
        if raw.starts_with('"') {
            return serde_json::from_str::<String>(raw)
                .ok()
                .map(|s| Id::Str(s.into()));
        }
        // Only plain integers: `1.0`, `1e3` and friends are not ids.
        if raw
            .bytes()
            .enumerate()
            .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
        {
            return raw.parse::<i128>().ok().map(Id::Int);
        }
        None
    }

    /// Appends the id's JSON text to `out`.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Id::Int(n) => {
                let _ = write!(out, "{n}");
            }
            Id::Str(s) => {
                // Serializing a str into a String cannot fail.
                if let Ok(text) = serde_json::to_string(&**s) {
                    out.push_str(&text);
                }
            }
        }
    }

    /// The id as a JSON value (for the admin API).
    pub fn to_value(&self) -> Value {
        match self {
            Id::Int(n) => i64::try_from(*n)
                .map(Value::from)
                .or_else(|_| u64::try_from(*n).map(Value::from))
                .unwrap_or(Value::Null),
            Id::Str(s) => Value::String(s.to_string()),
        }
    }
}

impl std::fmt::Display for Id {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Id::Int(n) => write!(f, "{n}"),
            Id::Str(s) => write!(f, "{s:?}"),
        }
    }
}

/// A JSON-RPC error object.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ErrorObject {
    /// One of [`codes`].
    pub code: i32,
    /// A short human-readable description.
    pub message: String,
    /// Structured details, where the protocol names some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
}

impl ErrorObject {
    /// An error with no `data`.
    pub fn new(code: i32, message: impl Into<String>) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: None,
        }
    }

    /// An error with `data`.
    pub fn with_data(code: i32, message: impl Into<String>, data: Value) -> Self {
        ErrorObject {
            code,
            message: message.into(),
            data: Some(data),
        }
    }

    /// `-32700`: the frame is not JSON.
    pub fn parse_error(detail: impl std::fmt::Display) -> Self {
        Self::new(codes::PARSE_ERROR, format!("parse error: {detail}"))
    }

    /// `-32600` with a reason.
    pub fn invalid_request(reason: impl std::fmt::Display) -> Self {
        Self::new(codes::INVALID_REQUEST, format!("invalid request: {reason}"))
    }

    /// `-32601` naming the method.
    pub fn method_not_found(method: &str) -> Self {
        Self::with_data(
            codes::METHOD_NOT_FOUND,
            format!("method not found: {method}"),
            serde_json::json!({ "method": method }),
        )
    }

    /// `-32602` with the reason (which names the field).
    pub fn invalid_params(reason: impl std::fmt::Display) -> Self {
        Self::new(codes::INVALID_PARAMS, format!("invalid params: {reason}"))
    }

    /// `-32001`: admission control refused the task.
    pub fn overloaded(reason: &str, retry_after_ms: u64) -> Self {
        Self::with_data(
            codes::OVERLOADED,
            format!("overloaded: {reason}"),
            serde_json::json!({ "retryAfterMs": retry_after_ms, "reason": reason }),
        )
    }
}

/// The `_meta` member of a request's params: reserved for the protocol.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// The JSON text of `progressToken` (a string or an integer), if the client opted in.
    pub progress_token: Option<Box<RawValue>>,
    /// The requested deadline in milliseconds.
    pub timeout_ms: Option<u64>,
}

/// The params of a request with `_meta` taken out, ready for a task to deserialize.
#[derive(Debug)]
pub enum Params<'a> {
    /// No params (or `null`): the task sees `{}`.
    None,
    /// The params object exactly as received (it had no `_meta`).
    Raw(&'a RawValue),
    /// The params object after `_meta` was removed.
    Value(Map<String, Value>),
}

impl Params<'_> {
    /// Deserializes the params into a task's own type.
    pub fn deserialize<T: serde::de::DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        match self {
            Params::None => serde_json::from_str("{}"),
            Params::Raw(raw) => serde_json::from_str(raw.get()),
            Params::Value(map) => serde_json::from_value(Value::Object(map)),
        }
    }
}

/// One request (or notification) after validation.
#[derive(Debug)]
pub struct Request<'a> {
    /// `None` for a notification.
    pub id: Option<Id>,
    /// The task to run.
    pub method: String,
    /// The task's params.
    pub params: Params<'a>,
    /// The protocol's own part of the params.
    pub meta: Meta,
}

/// Why an element of a frame is not a request we can run, with the id to answer to.
#[derive(Debug)]
pub struct Rejected {
    /// The request's id, when it could be read (`None` answers with id `null`).
    pub id: Option<Id>,
    /// Whether the element was a notification (no `id` member): then nothing is sent.
    pub notification: bool,
    /// The error to answer with.
    pub error: ErrorObject,
}

/// What one text frame holds.
#[derive(Debug)]
pub enum Frame<'a> {
    /// A single request or notification.
    Single(Result<Request<'a>, Rejected>),
    /// A non-empty batch.
    Batch(Vec<Result<Request<'a>, Rejected>>),
    /// The whole frame is answered with one error (id `null`): not JSON, or an empty batch.
    Invalid(ErrorObject),
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default)]
    jsonrpc: Option<&'a RawValue>,
    // `deserialize_with` so that `"id": null` is told apart from no `id` at all.
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// Parses one text frame.
pub fn parse_frame(text: &str) -> Frame<'_> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        return match serde_json::from_str::<Vec<&RawValue>>(text) {
            Ok(items) if items.is_empty() => {
                Frame::Invalid(ErrorObject::invalid_request("empty batch"))
            }
            Ok(items) => Frame::Batch(items.into_iter().map(parse_element).collect()),
            Err(e) => Frame::Invalid(ErrorObject::parse_error(e)),
        };
    }
    match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) => Frame::Single(parse_element(raw)),
        Err(e) => Frame::Invalid(ErrorObject::parse_error(e)),
    }
}

fn parse_element(raw: &RawValue) -> Result<Request<'_>, Rejected> {
    let reject = |id, notification, error| Rejected {
        id,
        notification,
        error,
    };
    if !raw.get().trim_start().starts_with('{') {
        return Err(reject(
            None,
            false,
            ErrorObject::invalid_request("expected a JSON object"),
        ));
    }
    let req: RawRequest<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        reject(
            None,
            false,
            ErrorObject::invalid_request(format_args!("malformed request object: {e}")),
        )
    })?;
    let notification = req.id.is_none();
    let id = match req.id {
        None => None,
        Some(raw_id) => match Id::from_json(raw_id.get()) {
            Some(id) => Some(id),
            None => {
                return Err(reject(
                    None,
                    false,
                    ErrorObject::invalid_request("`id` must be a string or an integer"),
                ))
            }
        },
    };
    if req.jsonrpc.map(|v| v.get().trim()) != Some("\"2.0\"") {
        return Err(reject(
            id,
            notification,
            ErrorObject::invalid_request("`jsonrpc` must be \"2.0\""),
        ));
    }
    let method = match req
        .method
        .and_then(|m| serde_json::from_str::<String>(m.get()).ok())
    {
        Some(m) => m,
        None => {
            return Err(reject(
                id,
                notification,
                ErrorObject::invalid_request("`method` must be a string"),
            ))
        }
    };
    let (params, meta) =
        split_params(req.params).map_err(|error| reject(id.clone(), notification, error))?;
    Ok(Request {
        id,
        method,
        params,
        meta,
    })
}

fn split_params(raw: Option<&RawValue>) -> Result<(Params<'_>, Meta), ErrorObject> {
    let Some(raw) = raw else {
        return Ok((Params::None, Meta::default()));
    };
    let text = raw.get().trim_start();
    if text.starts_with("null") {
        return Ok((Params::None, Meta::default()));
    }
    if !text.starts_with('{') {
        return Err(ErrorObject::invalid_params("params must be an object"));
    }
    // Fast path: most requests carry no `_meta`, and their params go to the
    // task untouched, without building a `Value` tree.
    if !text.contains("\"_meta\"") {
        return Ok((Params::Raw(raw), Meta::default()));
    }
    let mut map: Map<String, Value> =
        serde_json::from_str(text).map_err(ErrorObject::invalid_params)?;
    let meta = match map.remove("_meta") {
        None => Meta::default(),
        Some(v) => parse_meta(v)?,
    };
    Ok((Params::Value(map), meta))
}

fn parse_meta(v: Value) -> Result<Meta, ErrorObject> {
    let Value::Object(m) = v else {
        return Err(ErrorObject::invalid_params("`_meta` must be an object"));
    };
    let mut meta = Meta::default();
    if let Some(tok) = m.get("progressToken") {
        let ok = tok.is_string() || tok.is_i64() || tok.is_u64();
        if !ok {
            return Err(ErrorObject::invalid_params(
                "`_meta.progressToken` must be a string or an integer",
            ));
        }
        meta.progress_token = serde_json::value::to_raw_value(tok).ok();
    }
    if let Some(t) = m.get("timeoutMs") {
        match t.as_u64() {
            Some(ms) if ms > 0 => meta.timeout_ms = Some(ms),
            _ => {
                return Err(ErrorObject::invalid_params(
                    "`_meta.timeoutMs` must be an integer > 0",
                ))
            }
        }
    }
    Ok(meta)
}

/// The text of a success response.
pub fn success_text(id: &Id, result: &RawValue) -> String {
    let mut out = String::with_capacity(40 + result.get().len());
    out.push_str(r#"{"jsonrpc":"2.0","id":"#);
    id.write_json(&mut out);
    out.push_str(r#","result":"#);
    out.push_str(result.get());
    out.push('}');
    out
}

/// The text of an error response (`id` `None` is sent as `null`).
pub fn error_text(id: Option<&Id>, error: &ErrorObject) -> String {
    let mut out = String::with_capacity(96);
    out.push_str(r#"{"jsonrpc":"2.0","id":"#);
    match id {
        Some(id) => id.write_json(&mut out),
        None => out.push_str("null"),
    }
    out.push_str(r#","error":"#);
    match serde_json::to_string(error) {
        Ok(e) => out.push_str(&e),
        Err(_) => out.push_str(r#"{"code":-32603,"message":"internal error"}"#),
    }
    out.push('}');
    out
}

/// The text of a `$/progress` notification.
pub fn progress_text(token: &RawValue, value: &RawValue) -> String {
    let mut out = String::with_capacity(64 + value.get().len());
    out.push_str(r#"{"jsonrpc":"2.0","method":"$/progress","params":{"token":"#);
    out.push_str(token.get());
    out.push_str(r#","value":"#);
    out.push_str(value.get());
    out.push_str("}}");
    out
}

/// The id a `$/cancelRequest` names, if its params are well-formed.
pub fn cancel_target(params: Params<'_>) -> Option<Id> {
    #[derive(Deserialize)]
    struct CancelParams<'a> {
        #[serde(borrow)]
        id: &'a RawValue,
    }
    match params {
        Params::None => None,
        Params::Raw(raw) => serde_json::from_str::<CancelParams<'_>>(raw.get())
            .ok()
            .and_then(|p| Id::from_json(p.id.get())),
        Params::Value(map) => map
            .get("id")
            .and_then(|v| serde_json::to_string(v).ok())
            .and_then(|t| Id::from_json(&t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> Result<Request<'_>, Rejected> {
        match parse_frame(text) {
            Frame::Single(r) => r,
            other => panic!("expected a single request, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_request_with_meta() {
        let r = single(
            r#"{"jsonrpc":"2.0","id":7,"method":"count_primes","params":{"below":10,"_meta":{"progressToken":"p7","timeoutMs":30000}}}"#,
        )
        .unwrap();
        assert_eq!(r.id, Some(Id::Int(7)));
        assert_eq!(r.method, "count_primes");
        assert_eq!(r.meta.timeout_ms, Some(30000));
        assert_eq!(r.meta.progress_token.unwrap().get(), "\"p7\"");
        match r.params {
            Params::Value(m) => {
                assert!(m.contains_key("below"));
                assert!(!m.contains_key("_meta"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_round_trip() {
        for text in ["7", "-3", "\"a\\\"b\"", "18446744073709551615"] {
            let id = Id::from_json(text).unwrap();
            let mut out = String::new();
            id.write_json(&mut out);
            assert_eq!(out, text);
        }
        assert_eq!(Id::from_json("1.5"), None);
        assert_eq!(Id::from_json("null"), None);
        assert_eq!(Id::from_json("{}"), None);
    }

    #[test]
    fn rejects_what_is_not_a_request() {
        assert!(matches!(parse_frame("{nope"), Frame::Invalid(e) if e.code == codes::PARSE_ERROR));
        assert!(
            matches!(parse_frame(" [] "), Frame::Invalid(e) if e.code == codes::INVALID_REQUEST)
        );
        let e = single(r#"{"id":1,"method":"echo"}"#).unwrap_err();
        assert_eq!(
            (e.id, e.error.code),
            (Some(Id::Int(1)), codes::INVALID_REQUEST)
        );
        let e = single(r#"{"jsonrpc":"2.0","id":null,"method":"echo"}"#).unwrap_err();
        assert_eq!((e.id, e.notification), (None, false));
        let e = single(r#"{"jsonrpc":"2.0","id":1,"method":5}"#).unwrap_err();
        assert_eq!(e.error.code, codes::INVALID_REQUEST);
        let e = single(r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":[1]}"#).unwrap_err();
        assert_eq!(e.error.code, codes::INVALID_PARAMS);
        let e = single(r#"5"#).unwrap_err();
        assert_eq!(e.error.code, codes::INVALID_REQUEST);
        let e = single(
            r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"_meta":{"timeoutMs":0}}}"#,
        )
        .unwrap_err();
        assert_eq!(e.error.code, codes::INVALID_PARAMS);
    }

    #[test]
    fn batches_keep_every_element() {
        match parse_frame(
            r#"[{"jsonrpc":"2.0","id":1,"method":"a"}, 3, {"jsonrpc":"2.0","method":"b"}]"#,
        ) {
            Frame::Batch(items) => {
                assert_eq!(items.len(), 3);
                assert!(items[0].is_ok());
                assert!(items[1].is_err());
                assert!(items[2].as_ref().map(|r| r.id.is_none()).unwrap_or(false));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn texts_are_valid_json() {
        let id = Id::Str("x".into());
        let ok = success_text(&id, &RawValue::from_string("{\"a\":1}".into()).unwrap());
        let v: Value = serde_json::from_str(&ok).unwrap();
        assert_eq!(v["result"]["a"], 1);
        let err = error_text(None, &ErrorObject::method_not_found("nope"));
        let v: Value = serde_json::from_str(&err).unwrap();
        assert_eq!(v["id"], Value::Null);
        assert_eq!(v["error"]["data"]["method"], "nope");
    }

    #[test]
    fn cancel_params() {
        let r =
            single(r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"x"}}"#).unwrap();
        assert_eq!(cancel_target(r.params), Some(Id::Str("x".into())));
    }
}
