//! `taskwire top` against a TLS server, both the binary run as processes: it
//! verifies the certificate by default, trusts a given CA file, and accepts a
//! self-signed certificate only with `--insecure`. Only 127.0.0.1 is contacted.

mod common;

use common::{text, top, Proc};

use std::path::Path;

fn serve_tls(cert: &Path, key: &Path) -> Proc {
    let (cert, key) = (
        cert.to_str().expect("a UTF-8 path"),
        key.to_str().expect("a UTF-8 path"),
    );
    Proc::start(&["--tls-cert", cert, "--tls-key", key])
}

#[test]
fn top_reads_a_tls_server() {
    // An IP address in the certificate: the client connects to 127.0.0.1 and
    // checks the name it dialled, with no resolver in between.
    let ck = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()])
        .expect("a test certificate");
    let dir = std::env::temp_dir().join(format!("taskwire-top-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).expect("write the certificate");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write the key");
    let server = serve_tls(&cert, &key);
    let https = format!("https://127.0.0.1:{}", server.addr.port());
    let wss = format!("wss://127.0.0.1:{}/ws", server.addr.port());
    let cert_arg = cert.to_str().expect("a UTF-8 path");

    // Trusting the certificate itself, by either of the server's URLs.
    for url in [&https, &wss] {
        let out = top(&["--url", url, "--ca-file", cert_arg]);
        assert!(out.status.success(), "{}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("connections") && stdout.contains("TASK"),
            "{}",
            text(&out)
        );
    }

    // The default verifies: a self-signed certificate is refused...
    let out = top(&["--url", &https]);
    assert!(!out.status.success(), "{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("certificate") || stderr.contains("issuer"),
        "{}",
        text(&out)
    );

    // ...unless told to accept anything.
    let out = top(&["--url", &wss, "--insecure"]);
    assert!(out.status.success(), "{}", text(&out));

    // A CA file without a certificate is an error that names the flag.
    let out = top(&["--url", &https, "--ca-file", key.to_str().expect("UTF-8")]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--ca-file"),
        "{}",
        text(&out)
    );

    drop(server);
    let _ = std::fs::remove_dir_all(dir);
}
