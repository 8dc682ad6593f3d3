//! Coverage-guided fuzzing of the protocol parser: any text a client can send
//! in a frame. The parser must never panic, and what it accepts must render
//! back to JSON (the id of every answer it would produce).
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskwire::protocol::{error_text, parse_frame, Frame};

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8 by the WebSocket layer; anything else never reaches the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let check = |r: &Result<taskwire::protocol::Request<'_>, taskwire::protocol::Rejected>| {
        if let Err(rej) = r {
            let out = error_text(rej.id.as_ref(), &rej.error);
            assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
        }
    };
    match parse_frame(text) {
        Frame::Invalid(err) => {
            let out = error_text(None, &err);
            assert!(serde_json::from_str::<serde_json::Value>(&out).is_ok(), "{out}");
        }
        Frame::Single(r) => check(&r),
        Frame::Batch(items) => items.iter().for_each(check),
    }
});
