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
use serde_json::Value;

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
/// Method name of the protocol's heartbeat request, answered `{}` by the connection.
pub const PING_METHOD: &str = "$/ping";
/// Longest string id or progress token, in bytes: an id is kept for as long as
/// its request runs and echoed in its answer, so it must not be a payload.
pub const MAX_ID_BYTES: usize = 256;
/// Most elements of a batch unless configured otherwise (`max_batch`).
pub const DEFAULT_MAX_BATCH: usize = 256;
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
    /// Parses an id from its JSON text; `None` when it is not a string of at
    /// most [`MAX_ID_BYTES`] bytes or an integer in the `i64` or `u64` range.
    pub fn from_json(raw: &str) -> Option<Id> {
        let raw = raw.trim();
        if raw.starts_with('"') {
            return short_string(raw).map(|s| Id::Str(s.into()));
        }
        // Only plain integers: `1.0`, `1e3` and friends are not ids. The length
        // check first, so that a megabyte of digits is not scanned.
        if raw.len() <= 20
            && raw
                .bytes()
                .enumerate()
                .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'-'))
        {
            let n = raw.parse::<i128>().ok()?;
            let in_range = n >= i128::from(i64::MIN) && n <= i128::from(u64::MAX);
            return in_range.then_some(Id::Int(n));
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

/// Decodes a JSON string of at most [`MAX_ID_BYTES`] bytes (once decoded).
fn short_string(raw: &str) -> Option<String> {
    // Escapes only ever shrink a string, so a short raw text needs no second
    // look, and a raw text over six times the limit (`\u0000` per byte) can
    // be refused without decoding it.
    if raw.len() > MAX_ID_BYTES * 6 + 2 {
        return None;
    }
    let s = serde_json::from_str::<String>(raw).ok()?;
    (s.len() <= MAX_ID_BYTES).then_some(s)
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

    /// `-32601` naming the method (cut to [`MAX_ID_BYTES`] bytes: the answer
    /// to a made-up name is no larger than the answer to a short one).
    pub fn method_not_found(method: &str) -> Self {
        let method = cut(method, MAX_ID_BYTES);
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

/// `s` cut to at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Most characters of client text in one log line.
pub const LOG_TEXT_CHARS: usize = 200;

/// Client text made safe for a log line: control characters, newlines and
/// quotes escaped (so a client cannot forge a line), cut to
/// [`LOG_TEXT_CHARS`] characters with `…` (so a megabyte of text is not a
/// megabyte of log).
///
/// ```
/// let line = taskwire::protocol::log_text("ok\nFORGED 2026 INFO admin logged in");
/// assert!(!line.contains('\n'));
/// assert!(taskwire::protocol::log_text(&"x".repeat(10_000)).chars().count() <= 201);
/// ```
pub fn log_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(LOG_TEXT_CHARS) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == LOG_TEXT_CHARS {
            out.push('…');
            break;
        }
        out.extend(c.escape_debug());
    }
    out
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
    /// The params object after `_meta` was removed, as JSON text.
    Owned(Box<RawValue>),
    /// Params by position: the array exactly as received. A task whose
    /// params are a struct sees it mapped onto its fields by
    /// [`Params::into_named`]; any other task sees the array itself.
    Array(&'a RawValue),
}

/// One field of a task's params, in declaration order: where a params array
/// puts its elements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamField {
    /// The field's name in the params object.
    pub name: String,
    /// Whether the task needs it (it has no default).
    pub required: bool,
}

impl<'a> Params<'a> {
    /// Deserializes the params into a task's own type.
    pub fn deserialize<T: serde::de::DeserializeOwned>(self) -> Result<T, serde_json::Error> {
        match self {
            Params::None => serde_json::from_str("{}"),
            Params::Raw(raw) | Params::Array(raw) => serde_json::from_str(raw.get()),
            Params::Owned(raw) => serde_json::from_str(raw.get()),
        }
    }

    /// Params by position turned into the params object: element `i` becomes
    /// the member named `fields[i].name`. Other params are returned as they
    /// are.
    ///
    /// More elements than fields, or fewer than the required fields, are a
    /// `-32602` that names the field. A `null` in the place of a field that
    /// is not required leaves it out (so that the field gets its default):
    /// a positional client has no other way to skip a field before the
    /// last. The elements are copied as text, never parsed into numbers, so
    /// every value reaches the task exactly as sent.
    ///
    /// ```
    /// use taskwire::protocol::{parse_frame, Frame, ParamField};
    /// let fields = [
    ///     ParamField { name: "seed".into(), required: true },
    ///     ParamField { name: "rounds".into(), required: true },
    /// ];
    /// let text = r#"{"jsonrpc":"2.0","id":1,"method":"hash_chain","params":[1, 10]}"#;
    /// let Frame::Single(Ok(req)) = parse_frame(text) else { unreachable!() };
    /// let named: serde_json::Value = req.params.into_named(&fields).unwrap().deserialize().unwrap();
    /// assert_eq!(named, serde_json::json!({"seed": 1, "rounds": 10}));
    /// ```
    pub fn into_named(self, fields: &[ParamField]) -> Result<Params<'a>, ErrorObject> {
        let Params::Array(raw) = self else {
            return Ok(self);
        };
        let mut de = serde_json::Deserializer::from_str(raw.get());
        // One more than the fields, to tell "too many" apart; the rest of a
        // long array is counted, never kept.
        let (items, n) = serde::Deserializer::deserialize_seq(
            &mut de,
            BoundedSeq {
                max: fields.len() + 1,
            },
        )
        .map_err(ErrorObject::invalid_params)?;
        if n > fields.len() {
            let names: Vec<&str> = fields.iter().map(|f| f.name.as_str()).collect();
            return Err(ErrorObject::invalid_params(format_args!(
                "{n} params by position, but this task takes at most {} ({})",
                fields.len(),
                names.join(", ")
            )));
        }
        if let Some((i, missing)) = fields.iter().enumerate().skip(n).find(|(_, f)| f.required) {
            return Err(ErrorObject::invalid_params(format_args!(
                "missing field `{}` (position {i} of the params array)",
                missing.name
            )));
        }
        let mut out = String::with_capacity(raw.get().len() + 16 * n + 2);
        out.push('{');
        for (field, value) in fields.iter().zip(items) {
            if !field.required && value.get().trim() == "null" {
                continue;
            }
            if out.len() > 1 {
                out.push(',');
            }
            out.push_str(&serde_json::to_string(&field.name).map_err(ErrorObject::invalid_params)?);
            out.push(':');
            out.push_str(value.get());
        }
        out.push('}');
        let named = RawValue::from_string(out).map_err(ErrorObject::invalid_params)?;
        Ok(Params::Owned(named))
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
    /// Whether the element was a well-formed notification (`jsonrpc` "2.0", a
    /// string `method`, no `id`) whose params are wrong: then nothing is sent.
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

/// Parses one text frame, with batches of at most [`DEFAULT_MAX_BATCH`] elements.
pub fn parse_frame(text: &str) -> Frame<'_> {
    parse_frame_limited(text, DEFAULT_MAX_BATCH)
}

/// Parses one text frame. A batch of more than `max_batch` elements is one
/// `-32600` (id `null`): its elements are counted, not kept, so a frame full
/// of tiny elements costs no memory per element.
pub fn parse_frame_limited(text: &str, max_batch: usize) -> Frame<'_> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let mut de = serde_json::Deserializer::from_str(text);
        let parsed = serde::Deserializer::deserialize_seq(&mut de, BoundedSeq { max: max_batch })
            .and_then(|v| de.end().map(|()| v));
        return match parsed {
            Ok((_, 0)) => Frame::Invalid(ErrorObject::invalid_request("empty batch")),
            Ok((_, n)) if n > max_batch => Frame::Invalid(ErrorObject::invalid_request(
                format_args!("a batch holds at most {max_batch} elements"),
            )),
            Ok((items, _)) => Frame::Batch(items.into_iter().map(parse_element).collect()),
            Err(e) => Frame::Invalid(ErrorObject::parse_error(e)),
        };
    }
    match serde_json::from_str::<&RawValue>(text) {
        Ok(raw) => Frame::Single(parse_element(raw)),
        Err(e) => Frame::Invalid(ErrorObject::parse_error(e)),
    }
}

/// Keeps the first `max` elements of an array and only counts the rest.
struct BoundedSeq {
    max: usize,
}

impl<'de> serde::de::Visitor<'de> for BoundedSeq {
    type Value = (Vec<&'de RawValue>, usize);

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON array")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        let mut n = 0usize;
        loop {
            let more = if n < self.max {
                match seq.next_element::<&'de RawValue>()? {
                    Some(v) => {
                        items.push(v);
                        true
                    }
                    None => false,
                }
            } else {
                seq.next_element::<serde::de::IgnoredAny>()?.is_some()
            };
            if !more {
                return Ok((items, n));
            }
            n += 1;
        }
    }
}

fn parse_element(raw: &RawValue) -> Result<Request<'_>, Rejected> {
    // Only a well-formed notification (`jsonrpc` "2.0", a string `method`, no
    // `id`) may go unanswered; anything else is answered, with id `null` when
    // it has no usable id, as JSON-RPC 2.0's own examples do.
    let reject = |id, notification, error| Rejected {
        id,
        notification,
        error,
    };
    if !raw.get().trim_start().starts_with('{') {
        return Err(reject(
            None,
            false,
            ErrorObject::invalid_request("not an object"),
        ));
    }
    let req: RawRequest<'_> = serde_json::from_str(raw.get()).map_err(|e| {
        reject(
            None,
            false,
            ErrorObject::invalid_request(format_args!("malformed request object: {e}")),
        )
    })?;
    let id = match req.id {
        None => None,
        Some(raw_id) => match Id::from_json(raw_id.get()) {
            Some(id) => Some(id),
            None => {
                return Err(reject(
                    None,
                    false,
                    // Short: it may be answered once per element of a batch.
                    ErrorObject::invalid_request("bad id"),
                ));
            }
        },
    };
    if req.jsonrpc.map(|v| v.get().trim()) != Some("\"2.0\"") {
        return Err(reject(
            id,
            false,
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
                false,
                ErrorObject::invalid_request("`method` must be a string"),
            ))
        }
    };
    let notification = id.is_none();
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
    if text.starts_with('[') {
        // By position: `_meta` exists only in the object form, so there is
        // nothing to take out.
        return Ok((Params::Array(raw), Meta::default()));
    }
    if !text.starts_with('{') {
        return Err(ErrorObject::invalid_params(
            "params must be an object or an array",
        ));
    }
    // Fast path: most requests carry no `_meta`, and their params go to the
    // task untouched, without building a `Value` tree.
    if !text.contains("\"_meta\"") {
        return Ok((Params::Raw(raw), Meta::default()));
    }
    // Without `_meta`, the params are rebuilt as text from borrowed members:
    // never a `Value` tree, which costs many times the text it holds.
    let members = serde_json::from_str::<Members<'_>>(text)
        .map_err(ErrorObject::invalid_params)?
        .0;
    let mut meta = Meta::default();
    let mut out = String::with_capacity(text.len());
    out.push('{');
    for (key, value) in members {
        if key == "_meta" {
            meta = parse_meta(value)?;
            continue;
        }
        if out.len() > 1 {
            out.push(',');
        }
        out.push_str(&serde_json::to_string(&key).map_err(ErrorObject::invalid_params)?);
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    let params = RawValue::from_string(out).map_err(ErrorObject::invalid_params)?;
    Ok((Params::Owned(params), meta))
}

/// The members of a JSON object, values borrowed.
struct Members<'a>(Vec<(String, &'a RawValue)>);

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Members<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut members = Vec::new();
                while let Some(entry) = map.next_entry::<String, &'de RawValue>()? {
                    members.push(entry);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(V)
    }
}

/// The protocol's members of `_meta`; any other member is ignored.
#[derive(Deserialize)]
struct RawMeta<'a> {
    #[serde(borrow, default, rename = "progressToken")]
    progress_token: Option<&'a RawValue>,
    #[serde(borrow, default, rename = "timeoutMs")]
    timeout_ms: Option<&'a RawValue>,
}

fn parse_meta(v: &RawValue) -> Result<Meta, ErrorObject> {
    if !v.get().trim_start().starts_with('{') {
        return Err(ErrorObject::invalid_params("`_meta` must be an object"));
    }
    let m: RawMeta<'_> = serde_json::from_str(v.get()).map_err(ErrorObject::invalid_params)?;
    let mut meta = Meta::default();
    if let Some(tok) = m.progress_token {
        // The token is echoed in every progress notification: a short string
        // or an integer, never a payload.
        let t = tok.get().trim();
        let ok = if t.starts_with('"') {
            short_string(t).is_some()
        } else {
            matches!(Id::from_json(t), Some(Id::Int(_)))
        };
        if !ok {
            return Err(ErrorObject::invalid_params(
                "`_meta.progressToken` must be a string of at most 256 bytes or an integer",
            ));
        }
        meta.progress_token = RawValue::from_string(t.to_string()).ok();
    }
    if let Some(t) = m.timeout_ms {
        match t.get().trim().parse::<u64>() {
            Ok(ms) if ms > 0 => meta.timeout_ms = Some(ms),
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

/// The id a `$/cancelRequest` names, if its params are well-formed
/// (`{"id": ..}` or `[id]`).
pub fn cancel_target(params: Params<'_>) -> Option<Id> {
    #[derive(Deserialize)]
    struct CancelParams<'a> {
        #[serde(borrow)]
        id: &'a RawValue,
    }
    let field = [ParamField {
        name: "id".into(),
        required: true,
    }];
    match params.into_named(&field).ok()? {
        Params::None => None,
        Params::Raw(raw) | Params::Array(raw) => {
            serde_json::from_str::<CancelParams<'_>>(raw.get())
                .ok()
                .and_then(|p| Id::from_json(p.id.get()))
        }
        Params::Owned(raw) => serde_json::from_str::<CancelParams<'_>>(raw.get())
            .ok()
            .and_then(|p| Id::from_json(p.id.get())),
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
            Params::Owned(raw) => assert_eq!(raw.get(), r#"{"below":10}"#),
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
        let e = single(r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":"x"}"#).unwrap_err();
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
    fn what_is_not_a_request_is_answered_with_id_null() {
        for text in [r#"{"foo":"boo"}"#, "{}", r#"{"method":"echo"}"#] {
            let e = single(text).unwrap_err();
            assert_eq!((e.id, e.notification), (None, false), "{text}");
            assert_eq!(e.error.code, codes::INVALID_REQUEST);
        }
        // A well-formed notification with bad params still gets nothing.
        let e = single(r#"{"jsonrpc":"2.0","method":"echo","params":5}"#).unwrap_err();
        assert!(e.notification);
        match parse_frame("[{}]") {
            Frame::Batch(items) => assert!(matches!(&items[0], Err(r) if !r.notification)),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ids_and_tokens_are_short() {
        let ok = format!("\"{}\"", "a".repeat(MAX_ID_BYTES));
        assert!(Id::from_json(&ok).is_some());
        let long = format!("\"{}\"", "a".repeat(MAX_ID_BYTES + 1));
        assert_eq!(Id::from_json(&long), None);
        // Escapes count once decoded.
        let escaped = format!("\"{}\"", "\\u0041".repeat(MAX_ID_BYTES));
        assert!(Id::from_json(&escaped).is_some());
        assert!(Id::from_json("-9223372036854775808").is_some());
        assert_eq!(Id::from_json("-9223372036854775809"), None);
        assert_eq!(Id::from_json("18446744073709551616"), None);
        assert_eq!(Id::from_json(&"9".repeat(1000)), None);
        let text = format!(r#"{{"jsonrpc":"2.0","id":{long},"method":"echo"}}"#);
        let e = single(&text).unwrap_err();
        assert_eq!((e.id, e.error.code), (None, codes::INVALID_REQUEST));
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"echo","params":{{"_meta":{{"progressToken":{long}}}}}}}"#
        );
        let e = single(&text).unwrap_err();
        assert_eq!(
            (e.id, e.error.code),
            (Some(Id::Int(1)), codes::INVALID_PARAMS)
        );
        let text =
            r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"_meta":{"progressToken":[1]}}}"#;
        assert_eq!(single(text).unwrap_err().error.code, codes::INVALID_PARAMS);
    }

    #[test]
    fn long_batches_are_counted_not_kept() {
        let elems = ["1"; 10].join(",");
        match parse_frame_limited(&format!("[{elems}]"), 10) {
            Frame::Batch(items) => assert_eq!(items.len(), 10),
            other => panic!("{other:?}"),
        }
        match parse_frame_limited(&format!("[{elems},1]"), 10) {
            Frame::Invalid(e) => assert_eq!(e.code, codes::INVALID_REQUEST),
            other => panic!("{other:?}"),
        }
        // Not JSON after the limit is still a parse error.
        match parse_frame_limited(&format!("[{elems},1,"), 10) {
            Frame::Invalid(e) => assert_eq!(e.code, codes::PARSE_ERROR),
            other => panic!("{other:?}"),
        }
        match parse_frame_limited("[1] x", 10) {
            Frame::Invalid(e) => assert_eq!(e.code, codes::PARSE_ERROR),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            ErrorObject::method_not_found(&"m".repeat(10_000))
                .message
                .len(),
            "method not found: ".len() + MAX_ID_BYTES
        );
    }

    #[test]
    fn cancel_params() {
        let r =
            single(r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"x"}}"#).unwrap();
        assert_eq!(cancel_target(r.params), Some(Id::Str("x".into())));
        let r = single(r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":[7]}"#).unwrap();
        assert_eq!(cancel_target(r.params), Some(Id::Int(7)));
    }

    fn field(name: &str, required: bool) -> ParamField {
        ParamField {
            name: name.into(),
            required,
        }
    }

    fn named(params: &str, fields: &[ParamField]) -> Result<String, ErrorObject> {
        let text = format!(r#"{{"jsonrpc":"2.0","id":1,"method":"m","params":{params}}}"#);
        let r = single(&text).map_err(|r| r.error)?;
        match r.params.into_named(fields)? {
            Params::Owned(raw) => Ok(raw.get().to_string()),
            Params::Raw(raw) | Params::Array(raw) => Ok(raw.get().to_string()),
            Params::None => Ok(String::new()),
        }
    }

    #[test]
    fn params_by_position_map_onto_fields_in_order() {
        let fields = [
            field("zeta", true),
            field("alpha", true),
            field("opt", false),
        ];
        assert_eq!(
            named("[1, [2, 3]]", &fields).unwrap(),
            r#"{"zeta":1,"alpha":[2, 3]}"#
        );
        // Numbers are copied as text, never rounded through f64.
        assert_eq!(
            named(
                "[123456789012345678901234567890, 1.0000000000000000001, 7]",
                &fields
            )
            .unwrap(),
            r#"{"zeta":123456789012345678901234567890,"alpha":1.0000000000000000001,"opt":7}"#
        );
        // `null` skips a field that is not required, and only such a field.
        assert_eq!(
            named("[null, 2, null]", &fields).unwrap(),
            r#"{"zeta":null,"alpha":2}"#
        );
        // The object form goes through untouched.
        assert_eq!(named(r#"{"b":1}"#, &fields).unwrap(), r#"{"b":1}"#);
        // `_meta` is a value like any other in the array form.
        assert_eq!(
            named(r#"[{"_meta":{"timeoutMs":0}}, 1]"#, &fields).unwrap(),
            r#"{"zeta":{"_meta":{"timeoutMs":0}},"alpha":1}"#
        );
        assert_eq!(named("[]", &[]).unwrap(), "{}");
    }

    #[test]
    fn params_by_position_name_the_field_they_miss() {
        let fields = [
            field("zeta", true),
            field("alpha", true),
            field("opt", false),
        ];
        let e = named("[1]", &fields).unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
        assert!(e.message.contains("`alpha`"), "{}", e.message);
        let e = named("[1, 2, 3, 4]", &fields).unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
        assert!(e.message.contains("zeta, alpha, opt"), "{}", e.message);
        // A long array is counted, not kept, and still refused.
        let long = format!("[{}]", ["0"; 100_000].join(","));
        let e = named(&long, &fields).unwrap_err();
        assert!(
            e.message.starts_with("invalid params: 100000 params"),
            "{}",
            e.message
        );
        let e = named("[1]", &[]).unwrap_err();
        assert_eq!(e.code, codes::INVALID_PARAMS);
    }
}
