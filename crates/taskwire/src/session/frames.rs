//! The params of the session methods and the token's text form: pure parsing,
//! no state, so that it can be fuzzed on its own.

use serde::Deserialize;

use crate::protocol::{ErrorObject, Params};

/// `$/session.open`.
pub const OPEN_METHOD: &str = "$/session.open";
/// `$/session.ack`.
pub const ACK_METHOD: &str = "$/session.ack";
/// `$/session.resume`.
pub const RESUME_METHOD: &str = "$/session.resume";

/// Bytes of randomness in a token's secret (256 bits; the protocol asks for
/// at least 128).
pub const SECRET_BYTES: usize = 32;

/// The longest token text accepted: a session id (at most 20 digits), a dot and
/// the secret in hex. Anything longer is refused before it is decoded.
pub const MAX_TOKEN_BYTES: usize = 20 + 1 + 2 * SECRET_BYTES;

/// The params of `$/session.open`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OpenParams {
    /// A shorter window than the server's, if asked for.
    pub window_ms: Option<u64>,
}

/// The params of `$/session.resume`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeParams {
    /// The session id named by the token.
    pub session: u64,
    /// The token's secret.
    pub secret: [u8; SECRET_BYTES],
    /// Numbered responses the client has received.
    pub seq: u64,
}

fn params_text<'a>(params: &'a Params<'_>) -> &'a str {
    match params {
        Params::None => "{}",
        Params::Raw(raw) => raw.get(),
        Params::Owned(raw) => raw.get(),
        // By position, as any request may: serde maps an array onto the
        // struct's fields in order.
        Params::Array(raw) => raw.get(),
    }
}

/// Parses `$/session.open`'s params: `{}` or `{"windowMs": n}` with `n > 0`.
pub fn parse_open(params: &Params<'_>) -> Result<OpenParams, ErrorObject> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        #[serde(default)]
        window_ms: Option<u64>,
    }
    let raw: Raw = serde_json::from_str(params_text(params))
        .map_err(|e| ErrorObject::invalid_params(format!("windowMs: {e}")))?;
    if raw.window_ms == Some(0) {
        return Err(ErrorObject::invalid_params("windowMs must be > 0"));
    }
    Ok(OpenParams {
        window_ms: raw.window_ms,
    })
}

/// Parses `$/session.ack`'s params: `{"seq": n}`; `None` when malformed (a
/// notification has nobody to tell).
pub fn parse_ack(params: &Params<'_>) -> Option<u64> {
    #[derive(Deserialize)]
    struct Raw {
        seq: u64,
    }
    serde_json::from_str::<Raw>(params_text(params))
        .ok()
        .map(|r| r.seq)
}

/// Parses `$/session.resume`'s params: `{"token": "...", "seq": n}`. A token
/// that cannot be a token is `Ok(None)`: it is answered as an unknown session
/// (`-32020`), not as bad params, so nothing tells a guess from a stale token.
pub fn parse_resume(params: &Params<'_>) -> Result<Option<ResumeParams>, ErrorObject> {
    #[derive(Deserialize)]
    struct Raw<'a> {
        #[serde(borrow)]
        token: std::borrow::Cow<'a, str>,
        #[serde(default)]
        seq: u64,
    }
    let raw: Raw<'_> = serde_json::from_str(params_text(params))
        .map_err(|e| ErrorObject::invalid_params(format!("token, seq: {e}")))?;
    Ok(
        split_token(&raw.token).map(|(session, secret)| ResumeParams {
            session,
            secret,
            seq: raw.seq,
        }),
    )
}

/// The token's text: the session id, a dot, the secret in lower-case hex.
pub fn token_text(session: u64, secret: &[u8; SECRET_BYTES]) -> String {
    let mut out = String::with_capacity(MAX_TOKEN_BYTES);
    out.push_str(&session.to_string());
    out.push('.');
    for b in secret {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Splits a token into its session id and secret; `None` if it is not one.
pub fn split_token(token: &str) -> Option<(u64, [u8; SECRET_BYTES])> {
    if token.len() > MAX_TOKEN_BYTES {
        return None;
    }
    let (id, hex) = token.split_once('.')?;
    // One spelling per token (no leading zeros): a token that parses is the
    // very text the server made.
    if id.is_empty()
        || !id.bytes().all(|b| b.is_ascii_digit())
        || (id.len() > 1 && id.starts_with('0'))
    {
        return None;
    }
    let id = id.parse::<u64>().ok()?;
    let hex = hex.as_bytes();
    if hex.len() != 2 * SECRET_BYTES {
        return None;
    }
    let mut secret = [0u8; SECRET_BYTES];
    for (i, out) in secret.iter_mut().enumerate() {
        let hi = nibble(*hex.get(2 * i)?)?;
        let lo = nibble(*hex.get(2 * i + 1)?)?;
        *out = (hi << 4) | lo;
    }
    Some((id, secret))
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_string()).unwrap()
    }

    #[test]
    fn a_token_round_trips_and_nothing_else_parses() {
        let secret = [0xabu8; SECRET_BYTES];
        let t = token_text(42, &secret);
        assert_eq!(split_token(&t), Some((42, secret)));
        assert!(t.len() <= MAX_TOKEN_BYTES);
        for bad in [
            "",
            ".",
            "42.",
            "x.ab",
            "42.AB",
            &t[..t.len() - 1],
            &format!("{t}0"),
            &format!("0{t}"),
        ] {
            assert_eq!(split_token(bad), None, "{bad}");
        }
        assert_eq!(
            split_token(&token_text(u64::MAX, &secret)).map(|x| x.0),
            Some(u64::MAX)
        );
    }

    #[test]
    fn params_are_checked() {
        assert_eq!(parse_open(&Params::None), Ok(OpenParams::default()));
        let p = raw(r#"{"windowMs":500}"#);
        assert_eq!(parse_open(&Params::Raw(&p)).unwrap().window_ms, Some(500));
        for bad in [
            r#"{"windowMs":0}"#,
            r#"{"windowMs":-1}"#,
            r#"{"windowMs":"5"}"#,
            "[0]",
        ] {
            let p = raw(bad);
            assert!(parse_open(&Params::Raw(&p)).is_err(), "{bad}");
        }
        let p = raw(r#"{"seq":5}"#);
        assert_eq!(parse_ack(&Params::Raw(&p)), Some(5));
        let p = raw(r#"{"seq":-5}"#);
        assert_eq!(parse_ack(&Params::Raw(&p)), None);
        let p = raw(r#"{"token":"nope","seq":1}"#);
        assert_eq!(parse_resume(&Params::Raw(&p)), Ok(None));
        let p = raw(r#"{"seq":1}"#);
        assert!(parse_resume(&Params::Raw(&p)).is_err());
    }
}
