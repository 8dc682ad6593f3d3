//! Coverage-guided fuzzing of the session frames: the params of
//! `$/session.open`, `$/session.ack` and `$/session.resume` (arbitrary tokens
//! and counts), as a client sends them inside a request. Parsing must never
//! panic; a token that parses must render back to the same text; a refused
//! frame's error must render to JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskwire::fuzz_internals::frames;
use taskwire::protocol::{error_text, parse_frame, Frame, Params};

fn check_params(params: &Params<'_>) {
    if let Err(e) = frames::parse_open(params) {
        let out = error_text(None, &e);
        assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
    }
    let _ = frames::parse_ack(params);
    match frames::parse_resume(params) {
        Ok(Some(r)) => {
            let t = frames::token_text(r.session, &r.secret);
            assert_eq!(frames::split_token(&t), Some((r.session, r.secret)));
        }
        Ok(None) => {}
        Err(e) => {
            let out = error_text(None, &e);
            assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The text as a token on its own.
    if let Some((id, secret)) = frames::split_token(text) {
        assert_eq!(frames::token_text(id, &secret), text);
    }
    // The text as a whole frame: every request's params go through the
    // session parsers, whatever its method.
    match parse_frame(text) {
        Frame::Single(Ok(r)) => check_params(&r.params),
        Frame::Batch(items) => items.iter().flatten().for_each(|r| check_params(&r.params)),
        _ => {}
    }
    // And as bare params (the corpus seeds are session requests' params).
    if let Ok(raw) = serde_json::from_str::<&serde_json::value::RawValue>(text) {
        check_params(&Params::Raw(raw));
    }
});
