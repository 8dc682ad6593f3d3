//! What the tests that run `taskwire serve` as a process share: reading the
//! one `listening on ADDR` line from its stdout, and keeping its stderr (the
//! log) readable while it runs.

// Each test file uses what it needs of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, ChildStdout};
use std::sync::{Arc, Mutex};

/// Reads the server's first line, `listening on ADDR`, and returns the
/// address with the rest of its stdout.
pub fn listening_addr(child: &mut Child) -> (SocketAddr, BufReader<ChildStdout>) {
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (addr, stdout)
}

/// Collects everything the server writes to stderr, on a thread of its own so
/// that the pipe never fills and blocks the server.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut l) = sink.lock() {
                l.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    log
}
