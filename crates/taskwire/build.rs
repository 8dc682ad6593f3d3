//! Embeds the files of `web/` (the JavaScript client and the dashboard), so
//! that the binary serves them with no files beside it.

use std::fmt::Write as _;
use std::path::Path;

fn main() {
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../web");
    println!("cargo:rerun-if-changed={}", web.display());
    let mut entries = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&web) {
        for e in dir.flatten() {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
                continue;
            };
            let mime = match path.extension().and_then(|x| x.to_str()) {
                Some("html") => "text/html; charset=utf-8",
                Some("js") | Some("mjs") => "text/javascript; charset=utf-8",
                Some("css") => "text/css; charset=utf-8",
                Some("ts") => "text/plain; charset=utf-8",
                Some("svg") => "image/svg+xml",
                _ => continue,
            };
            println!("cargo:rerun-if-changed={}", path.display());
            entries.push((name, mime, path));
        }
    }
    entries.sort();
    let mut out = String::from("/// (file name, content type, body) of every file in `web/`.\npub static FILES: &[(&str, &str, &str)] = &[\n");
    for (name, mime, path) in entries {
        let _ = writeln!(
            out,
            "    ({name:?}, {mime:?}, include_str!({:?})),",
            path.display().to_string()
        );
    }
    out.push_str("];\n");
    let dest =
        Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("web_files.rs");
    std::fs::write(dest, out).expect("write web_files.rs");
}
