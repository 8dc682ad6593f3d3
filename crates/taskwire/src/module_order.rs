//! The module order in `lib.rs`'s map, enforced: every file under `src/` may
//! name (`use crate::X`, `crate::X::`) only modules listed before its own.
//! Test code (from the first `#[cfg(test)]` of a file on) and comments are not
//! read: a unit test may use a higher module without making a circle.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The lowest first; the same order as the table in `lib.rs`.
const ORDER: &[&str] = &[
    "alloc", "sync", "limit", "protocol", "compute", "task", "registry", "builtin", "config",
    "error", "wasm", "observe", "caller", "session", "cluster", "app", "conn", "http",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("src/ is readable")
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The module a file belongs to: its first path component under `src/`.
fn module_of(rel: &Path) -> String {
    let first = rel.components().next().expect("a path under src/");
    let name = first.as_os_str().to_string_lossy();
    name.trim_end_matches(".rs").to_string()
}

/// The names following `crate::` in production code, and the crate-root
/// re-exports (`crate::Ctx`) resolved to the module that defines them.
fn referenced(text: &str, reexports: &[(String, String)]) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let mut names = vec![];
            if let Some(group) = rest.strip_prefix('{') {
                // `use crate::{a, b::c};`: each first segment.
                let end = group.find('}').unwrap_or(group.len());
                names.extend(group[..end].split(',').map(|s| s.trim().to_string()));
            } else {
                names.push(rest.to_string());
            }
            for n in names {
                let ident: String = n
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if ident.is_empty() {
                    continue;
                }
                match reexports.iter().find(|(item, _)| *item == ident) {
                    Some((_, module)) => out.insert(module.clone()),
                    None => out.insert(ident),
                };
            }
        }
    }
    out
}

/// `pub use module::{A, B};` lines of lib.rs: item -> module.
fn root_reexports(lib: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    for line in lib.lines() {
        let Some(rest) = line.trim().strip_prefix("pub use ") else {
            continue;
        };
        let rest = rest.trim_end_matches(';');
        let Some((module, items)) = rest.split_once("::") else {
            continue;
        };
        let items = items.trim_start_matches('{').trim_end_matches('}');
        for item in items.split(',') {
            let item = item.trim().rsplit("::").next().unwrap_or("").to_string();
            out.push((item, module.to_string()));
        }
    }
    out
}

#[test]
fn module_order() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    let reexports = root_reexports(&lib);
    let mut files = vec![];
    rust_files(&src, &mut files);
    let mut wrong = vec![];
    let mut seen = BTreeSet::new();
    for f in &files {
        let rel = f.strip_prefix(&src).expect("under src/");
        let module = module_of(rel);
        if module == "lib" || module == "module_order" {
            continue;
        }
        let rank = ORDER
            .iter()
            .position(|m| *m == module)
            .unwrap_or_else(|| panic!("{} is not in the module order", rel.display()));
        seen.insert(module.clone());
        let text = std::fs::read_to_string(f).expect("a readable source file");
        for used in referenced(&text, &reexports) {
            if used == module {
                continue;
            }
            let Some(used_rank) = ORDER.iter().position(|m| *m == used) else {
                wrong.push(format!(
                    "{}: crate::{used} is not in the module order",
                    rel.display()
                ));
                continue;
            };
            if used_rank > rank {
                wrong.push(format!(
                    "{} ({module}) uses crate::{used}, which comes after it",
                    rel.display()
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "module order broken:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        seen.len(),
        ORDER.len(),
        "a module in ORDER has no file: {seen:?}"
    );
}

#[test]
fn a_reference_upward_is_seen() {
    let found = referenced(
        "use crate::http::Server;\nlet x = crate::Ctx::detached(\"t\");",
        &[("Ctx".into(), "task".into())],
    );
    assert!(
        found.contains("http") && found.contains("task"),
        "{found:?}"
    );
    let grouped = referenced("use crate::{conn, app::App};", &[]);
    assert!(
        grouped.contains("conn") && grouped.contains("app"),
        "{grouped:?}"
    );
    let test_only = referenced(
        "fn f() {}\n#[cfg(test)]\nmod tests { use crate::http; }",
        &[],
    );
    assert!(test_only.is_empty(), "{test_only:?}");
}
