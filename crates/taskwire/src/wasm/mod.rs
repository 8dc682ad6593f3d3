//! The WebAssembly lane: modules installed at run time, each one a task whose
//! guest code needs no checkpoints to be sliced, stopped and held to a memory
//! limit.
//!
//! # The life of a wasm task
//!
//! 1. **Install** ([`Lane::install`], from `--wasm-dir` at start or the admin
//!    API at run time): the bytes (binary or text) are compiled off the
//!    connection threads, checked (a `run` export, imports the lane provides)
//!    and swapped into the table under one lock. A running task holds an
//!    `Arc` to the code it started on, so a replaced module finishes on its old
//!    code; compiled code is shared by modules with the same sha256.
//! 2. **Admit**: the module's call takes an instance slot (`wasm_instances`,
//!    else `-32001 wasm_instances`) before the pool's own admission; the slot
//!    is held until the task's future is dropped, so instantiation never finds
//!    the pooling allocator full.
//! 3. **Run**: on the compute pool, as a future like any CPU task. The
//!    pool's epoch ticker advances the engine's epoch too; at every tick the
//!    guest's deadline callback stops it if the task was told to stop
//!    (cancel, deadline, kill, disconnect, shutdown) and yields the worker if
//!    the slice is used up ([`crate::compute::should_yield`], the checkpoint's
//!    own test).
//! 4. **Answer**: `run` returning gives the result the guest set (or `null`);
//!    a memory limit passed gives `-32010`, a trap `-32011`. Dropping the
//!    store frees the instance's slot, its memory and its budget share.
//!
//! `runtime.rs` holds everything that names wasmtime (only with the `wasm`
//! feature; without it [`Lane::install`] refuses every module); this file
//! holds the table, the names, `NAME.toml` and `rpc.discover`.

#[cfg(feature = "wasm")]
mod host;
#[cfg(feature = "wasm")]
mod runtime;
#[cfg(not(feature = "wasm"))]
#[path = "runtime_off.rs"]
mod runtime;

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::Config;
use crate::registry::{Registry, TaskDef};
use crate::sync::lock;

#[cfg(feature = "wasm")]
pub use runtime::BenchModule;
pub(crate) use runtime::Runtime;

/// Largest module the lane accepts (binary or text).
pub(crate) const MAX_MODULE_BYTES: usize = 16 << 20;
/// Compiles running at once (admin installs); more are refused as busy, so
/// that uploads cannot queue up unbounded compile work.
const MAX_COMPILES: usize = 2;

/// The lane's limits, from [`Config`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    pub memory_limit: u64,
    pub memory_budget: u64,
    pub instances: usize,
    pub max_modules: usize,
}

impl Limits {
    fn from_config(cfg: &Config) -> Limits {
        Limits {
            memory_limit: cfg.wasm_memory_limit as u64,
            memory_budget: cfg.wasm_memory_budget as u64,
            instances: cfg.wasm_instances,
            max_modules: cfg.wasm_max_modules,
        }
    }
}

/// What `NAME.toml` (or the admin API's query) may say about a module.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModuleSpec {
    /// One line for `rpc.discover`.
    pub summary: Option<String>,
    /// This module's tasks' memory limit (at most `wasm_memory_limit_bytes`).
    pub memory_limit_bytes: Option<u64>,
    /// The JSON Schema of the params, as a TOML table.
    pub params: Option<toml::Value>,
}

impl ModuleSpec {
    /// Parses `NAME.toml`.
    pub(crate) fn from_toml(text: &str) -> Result<ModuleSpec, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    fn schema(&self) -> Result<Value, String> {
        match &self.params {
            None => Ok(serde_json::json!({ "type": "object" })),
            Some(t) => serde_json::to_value(t).map_err(|e| format!("params: {e}")),
        }
    }
}

/// One installed module as the admin API lists it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct ModuleInfo {
    pub name: String,
    /// Hex sha256 of the bytes as given (text or binary).
    pub sha256: String,
    /// Size of those bytes.
    pub size: usize,
    /// When it was installed, milliseconds since the Unix epoch.
    pub installed_at_ms: u64,
    /// Its tasks' memory limit.
    pub memory_limit_bytes: u64,
    pub summary: String,
    /// Tasks of this module admitted and not yet finished (any version).
    pub running: usize,
}

/// A module as the nodes of a cluster compare their tables: for each name
/// the newest install or removal wins, its time first, then its hash.
#[cfg_attr(not(feature = "cluster"), allow(dead_code))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ModuleAd {
    pub name: String,
    pub sha256: String,
    /// When an operator installed it (on whichever node), ms since the Unix
    /// epoch; a node that installs it from a peer keeps this time.
    pub at_ms: u64,
}

/// Removals a lane remembers, so that a node that missed one does not bring
/// the module back; the oldest are forgotten past this.
const MAX_REMOVALS: usize = 256;

/// Why a module was not installed (the admin API's answer names it).
#[derive(Debug, thiserror::Error)]
pub(crate) enum InstallError {
    /// Not a usable task name.
    #[error(
        "invalid module name {0:?}: use 1 to 64 of A-Z a-z 0-9 _ - . (not starting with rpc.)"
    )]
    BadName(String),
    /// A built-in or native task has that name.
    #[error("{0:?} is a built-in or native task: a module cannot replace it")]
    Clash(String),
    /// `wasm_max_modules` are installed.
    #[error("{0} modules are installed, the most allowed (wasm_max_modules)")]
    TooMany(usize),
    /// Larger than [`MAX_MODULE_BYTES`].
    #[error("the module is larger than {MAX_MODULE_BYTES} bytes")]
    TooLarge,
    /// Compiles at their limit.
    #[error("other modules are being compiled; try again")]
    Busy,
    /// Not valid WebAssembly, or not a valid task.
    #[error("{0}")]
    Invalid(String),
    /// The lane cannot run (built without the `wasm` feature, or the engine
    /// could not start).
    #[error("{0}")]
    Unavailable(String),
}

/// How a module's task describes itself in `rpc.discover`.
pub(crate) struct About {
    pub name: Arc<str>,
    pub summary: Arc<str>,
    /// The JSON Schema of its params.
    pub schema: Value,
}

/// One installed module: what the table and `rpc.discover` show.
pub(crate) struct Installed {
    pub info: ModuleInfo,
    pub def: TaskDef,
    code: runtime::Code,
    /// The module as installed: what another node is sent to install the
    /// same code (bounded: `wasm_max_modules` modules of at most 16 MiB).
    bytes: Arc<[u8]>,
    spec: ModuleSpec,
    schema: Value,
    /// Tasks of this name admitted (shared by every version).
    running: Arc<AtomicUsize>,
}

/// The lane: the module table, and the engine started on the first install.
pub(crate) struct Lane {
    limits: Limits,
    native: HashSet<String>,
    native_methods: Vec<Value>,
    runtime: OnceLock<Result<Runtime, String>>,
    modules: Mutex<BTreeMap<Arc<str>, Arc<Installed>>>,
    /// Names removed, and when (ms since the Unix epoch): at most
    /// [`MAX_REMOVALS`].
    removed: Mutex<BTreeMap<Arc<str>, u64>>,
    /// `rpc.discover` with the modules, rebuilt after a change.
    discover: Mutex<Option<Arc<RawValue>>>,
    compiles: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("limits", &self.limits)
            .field("modules", &lock(&self.modules).len())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with("rpc.")
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Lane {
    /// A lane with no modules; the engine starts on the first install, so a
    /// server without modules reserves no address space for them.
    pub(crate) fn new(cfg: &Config, registry: &Registry) -> Lane {
        let native_methods = match registry.discover().get_mut("methods").map(Value::take) {
            Some(Value::Array(v)) => v,
            _ => vec![],
        };
        Lane {
            limits: Limits::from_config(cfg),
            native: registry
                .tasks()
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
            native_methods,
            runtime: OnceLock::new(),
            modules: Mutex::new(BTreeMap::new()),
            removed: Mutex::new(BTreeMap::new()),
            discover: Mutex::new(None),
            compiles: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn runtime(&self) -> Result<&Runtime, InstallError> {
        self.runtime
            .get_or_init(|| Runtime::new(self.limits))
            .as_ref()
            .map_err(|e| InstallError::Unavailable(e.clone()))
    }

    /// The installed module of this name.
    pub(crate) fn get(&self, name: &str) -> Option<Arc<Installed>> {
        let m = lock(&self.modules);
        if m.is_empty() {
            return None;
        }
        m.get(name).cloned()
    }

    /// Compiles and installs (or replaces) a module. Blocking: seconds for a
    /// large module; call it off the connection threads. `spec` `None` keeps
    /// a replaced module's spec.
    pub(crate) fn install(
        &self,
        name: &str,
        bytes: &[u8],
        spec: Option<ModuleSpec>,
    ) -> Result<ModuleInfo, InstallError> {
        self.install_at(name, bytes, spec, unix_ms())
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// Installs a module a peer has, as the peer has it: the same bytes
    /// (checked against `ad.sha256`), spec and install time.
    pub(crate) fn install_synced(
        &self,
        ad: &ModuleAd,
        bytes: &[u8],
        spec: ModuleSpec,
    ) -> Result<ModuleInfo, InstallError> {
        if !runtime::sha256_hex(bytes).eq_ignore_ascii_case(&ad.sha256) {
            return Err(InstallError::Invalid(
                "the bytes do not have the announced SHA-256".into(),
            ));
        }
        if !self.wants(ad) {
            // A newer install or removal came first.
            return Err(InstallError::Invalid(format!(
                "{} is outdated here",
                ad.name
            )));
        }
        self.install_at(&ad.name, bytes, Some(spec), ad.at_ms)
    }

    fn install_at(
        &self,
        name: &str,
        bytes: &[u8],
        spec: Option<ModuleSpec>,
        at_ms: u64,
    ) -> Result<ModuleInfo, InstallError> {
        if !valid_name(name) {
            return Err(InstallError::BadName(name.to_string()));
        }
        if self.native.contains(name) {
            return Err(InstallError::Clash(name.to_string()));
        }
        if bytes.len() > MAX_MODULE_BYTES {
            return Err(InstallError::TooLarge);
        }
        let _compile =
            crate::limit::Slot::acquire(&self.compiles, MAX_COMPILES).ok_or(InstallError::Busy)?;
        let previous = lock(&self.modules).get(name).cloned();
        let spec = match (spec, &previous) {
            (Some(s), _) => s,
            (None, Some(p)) => p.spec.clone(),
            (None, None) => ModuleSpec::default(),
        };
        let memory_limit = spec.memory_limit_bytes.unwrap_or(self.limits.memory_limit);
        if memory_limit > self.limits.memory_limit || memory_limit < 65536 {
            return Err(InstallError::Invalid(format!(
                "memory_limit_bytes must be between 65536 and wasm_memory_limit_bytes ({})",
                self.limits.memory_limit
            )));
        }
        let schema = spec.schema().map_err(InstallError::Invalid)?;
        let runtime = self.runtime()?;
        self.check_room(name)?;
        let sha256 = runtime::sha256_hex(bytes);
        // Compiled code is shared with any installed module of the same bytes.
        let code = lock(&self.modules)
            .values()
            .find(|m| m.info.sha256 == sha256)
            .map(|m| m.code.clone());
        let running = previous
            .as_ref()
            .map(|p| p.running.clone())
            .unwrap_or_default();
        let name_arc: Arc<str> = name.into();
        let summary = spec
            .summary
            .clone()
            .unwrap_or_else(|| "a WebAssembly module".to_string());
        let about = About {
            name: name_arc.clone(),
            summary: summary.as_str().into(),
            schema: schema.clone(),
        };
        let (def, code) = runtime
            .task(about, bytes, code, memory_limit, running.clone())
            .map_err(InstallError::Invalid)?;
        let info = ModuleInfo {
            name: name.to_string(),
            sha256,
            size: bytes.len(),
            installed_at_ms: at_ms,
            memory_limit_bytes: memory_limit,
            summary,
            running: 0,
        };
        let installed = Arc::new(Installed {
            info: info.clone(),
            def,
            code,
            bytes: bytes.into(),
            spec,
            schema,
            running,
        });
        self.check_room(name)?;
        // The swap: new calls get the new code from here on; running tasks
        // keep theirs. (Checked again above: another install may have taken
        // the last place while this one compiled; a rare race that lets one
        // module past the limit for the length of a compile is harmless.)
        lock(&self.modules).insert(name_arc, installed);
        lock(&self.removed).remove(name);
        *lock(&self.discover) = None;
        tracing::info!(module = name, sha256 = %info.sha256, size = info.size, "wasm module installed");
        Ok(info)
    }

    /// Whether `name` may be installed: it replaces a module, or there is room.
    fn check_room(&self, name: &str) -> Result<(), InstallError> {
        let m = lock(&self.modules);
        if !m.contains_key(name) && m.len() >= self.limits.max_modules {
            return Err(InstallError::TooMany(self.limits.max_modules));
        }
        Ok(())
    }

    /// Removes a module; its running tasks finish on its code.
    pub(crate) fn remove(&self, name: &str) -> bool {
        self.remove_at(name, unix_ms(), false)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// Removes a module a peer removed at `at_ms`, unless it was installed
    /// here after that; the removal is remembered either way.
    pub(crate) fn remove_synced(&self, name: &str, at_ms: u64) -> bool {
        self.remove_at(name, at_ms, true)
    }

    fn remove_at(&self, name: &str, at_ms: u64, only_older: bool) -> bool {
        let removed = {
            let mut m = lock(&self.modules);
            match m.get(name) {
                Some(i) if only_older && i.info.installed_at_ms >= at_ms => false,
                Some(_) => m.remove(name).is_some(),
                None => false,
            }
        };
        if removed || only_older {
            let mut r = lock(&self.removed);
            let e = r.entry(Arc::from(name)).or_insert(at_ms);
            *e = (*e).max(at_ms);
            if r.len() > MAX_REMOVALS {
                if let Some(oldest) = r.iter().min_by_key(|(_, at)| **at).map(|(n, _)| n.clone()) {
                    r.remove(&oldest);
                }
            }
        }
        if removed {
            *lock(&self.discover) = None;
            tracing::info!(module = name, "wasm module removed");
        }
        removed
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// Whether a peer's module is newer than what this node has of its name
    /// (the module, or its removal).
    pub(crate) fn wants(&self, ad: &ModuleAd) -> bool {
        if lock(&self.removed)
            .get(ad.name.as_str())
            .is_some_and(|at| *at >= ad.at_ms)
        {
            return false;
        }
        match lock(&self.modules).get(ad.name.as_str()) {
            None => true,
            Some(m) if m.info.sha256 == ad.sha256 => false,
            Some(m) => {
                (m.info.installed_at_ms, m.info.sha256.as_str()) < (ad.at_ms, ad.sha256.as_str())
            }
        }
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// The modules and the removals this node knows, for a peer to compare.
    pub(crate) fn ads(&self) -> (Vec<ModuleAd>, Vec<(String, u64)>) {
        let modules = lock(&self.modules)
            .values()
            .map(|m| ModuleAd {
                name: m.info.name.clone(),
                sha256: m.info.sha256.clone(),
                at_ms: m.info.installed_at_ms,
            })
            .collect();
        let removed = lock(&self.removed)
            .iter()
            .map(|(n, at)| (n.to_string(), *at))
            .collect();
        (modules, removed)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// A digest of the table (names and hashes): equal on two nodes that
    /// run the same code under the same names; 0 with no module.
    pub(crate) fn digest(&self) -> u64 {
        let m = lock(&self.modules);
        if m.is_empty() {
            return 0;
        }
        let mut text = String::new();
        for i in m.values() {
            text.push_str(&i.info.name);
            text.push('=');
            text.push_str(&i.info.sha256);
            text.push('\n');
        }
        drop(m);
        let hex = runtime::sha256_hex(text.as_bytes());
        u64::from_str_radix(hex.get(..16).unwrap_or("1"), 16).unwrap_or(1)
    }

    #[cfg_attr(not(feature = "cluster"), allow(dead_code))]
    /// What a peer needs to install the module with these bytes: its spec
    /// and bytes.
    pub(crate) fn for_peer(&self, sha256: &str) -> Option<(ModuleSpec, Arc<[u8]>)> {
        lock(&self.modules)
            .values()
            .find(|m| m.info.sha256.eq_ignore_ascii_case(sha256))
            .map(|m| (m.spec.clone(), m.bytes.clone()))
    }

    /// The bytes and description of an installed module whose bytes have
    /// this SHA-256 (lowercase hex, as [`ModuleInfo::sha256`]): how a node
    /// that heard of a module by its hash gets the code to install it under
    /// the same name, so that the same name runs the same code everywhere.
    pub(crate) fn by_sha256(&self, sha256: &str) -> Option<(ModuleInfo, Arc<[u8]>)> {
        lock(&self.modules)
            .values()
            .find(|m| m.info.sha256.eq_ignore_ascii_case(sha256))
            .map(|m| (m.info.clone(), m.bytes.clone()))
    }

    /// Every installed module, by name.
    pub(crate) fn list(&self) -> Vec<ModuleInfo> {
        lock(&self.modules)
            .values()
            .map(|m| ModuleInfo {
                running: m.running.load(Ordering::Relaxed),
                ..m.info.clone()
            })
            .collect()
    }

    /// Registers every `DIR/NAME.wasm` and `DIR/NAME.wat`, with its
    /// `DIR/NAME.toml` if there is one. The first failure names its file.
    pub(crate) fn load_dir(&self, dir: &Path) -> Result<Vec<ModuleInfo>, String> {
        let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "wasm" || x == "wat"))
            .collect();
        files.sort();
        let mut out = vec![];
        for path in files {
            let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
            let name = path
                .file_stem()
                .and_then(|s| s.to_str())
                .ok_or_else(|| fail(&"not a UTF-8 name"))?;
            let bytes = std::fs::read(&path).map_err(|e| fail(&e))?;
            let toml_path = path.with_extension("toml");
            let spec = match std::fs::read_to_string(&toml_path) {
                Ok(text) => ModuleSpec::from_toml(&text)
                    .map_err(|e| format!("{}: {e}", toml_path.display()))?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => ModuleSpec::default(),
                Err(e) => return Err(format!("{}: {e}", toml_path.display())),
            };
            out.push(
                self.install(name, &bytes, Some(spec))
                    .map_err(|e| fail(&e))?,
            );
        }
        Ok(out)
    }

    /// `rpc.discover` with the modules listed (kind `wasm`), or `None` when
    /// none is installed (the native description stands as it is).
    pub(crate) fn discover(&self) -> Option<Arc<RawValue>> {
        let mut cached = lock(&self.discover);
        if let Some(d) = &*cached {
            return Some(d.clone());
        }
        let modules: Vec<Arc<Installed>> = lock(&self.modules).values().cloned().collect();
        if modules.is_empty() {
            return None;
        }
        let mut methods = self.native_methods.clone();
        methods.extend(modules.iter().map(|m| {
            serde_json::json!({
                "name": m.info.name,
                "summary": m.info.summary,
                "kind": "wasm",
                "paramsSchema": m.schema,
                "paramStructure": "by-name",
                "params": [{ "name": "params", "required": false, "schema": m.schema }],
                "result": { "name": "result", "schema": {} },
                "memoryLimitBytes": m.info.memory_limit_bytes,
                "sha256": m.info.sha256,
            })
        }));
        methods.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        let doc = serde_json::json!({
            "openrpc": "1.3.2",
            "info": { "title": "taskwire", "version": env!("CARGO_PKG_VERSION") },
            "methods": methods,
        });
        let raw: Arc<RawValue> = serde_json::value::to_raw_value(&doc).ok()?.into();
        *cached = Some(raw.clone());
        Some(raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(valid_name("hash_chain"));
        assert!(valid_name("v2.fix-1"));
        for bad in ["", "rpc.x", "$/ping", "a b", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_spec_parses_and_refuses_unknown_keys() {
        let s = ModuleSpec::from_toml(
            "summary = \"s\"\nmemory_limit_bytes = 1048576\n[params]\ntype = \"object\"\n",
        )
        .unwrap();
        assert_eq!(s.memory_limit_bytes, Some(1 << 20));
        assert_eq!(s.schema().unwrap()["type"], "object");
        assert!(ModuleSpec::from_toml("memory = 1").is_err());
    }

    #[cfg(feature = "wasm")]
    #[test]
    fn two_tables_converge_on_the_newest_install_or_removal() {
        let (a, b) = (
            Lane::new(&Config::default(), &Registry::new()),
            Lane::new(&Config::default(), &Registry::new()),
        );
        let v1 = br#"(module (func (export "run")))"#;
        let v2 = br#"(module (func (export "run") nop))"#;
        a.install("m", v1, None).unwrap();
        let ad1 = a.ads().0.remove(0);
        assert!(b.wants(&ad1));
        assert!(
            b.install_synced(&ad1, v2, ModuleSpec::default()).is_err(),
            "bytes checked"
        );
        b.install_synced(&ad1, v1, ModuleSpec::default()).unwrap();
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), 0);
        assert_eq!(b.ads().0, vec![ad1.clone()], "the install time travels");
        // A newer version replaces it; the older one is not wanted back.
        std::thread::sleep(std::time::Duration::from_millis(2));
        a.install("m", v2, None).unwrap();
        let ad2 = a.ads().0.remove(0);
        assert!(b.wants(&ad2));
        b.install_synced(&ad2, v2, ModuleSpec::default()).unwrap();
        assert!(!b.wants(&ad1) && !a.wants(&ad1));
        assert_eq!(a.digest(), b.digest());
        // A removal wins over the install before it, and is remembered.
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(a.remove("m"));
        let (mods, removed) = a.ads();
        assert!(mods.is_empty());
        let (name, at) = removed[0].clone();
        assert!(b.remove_synced(&name, at));
        assert!(!b.wants(&ad2), "a removed module does not come back");
        assert_eq!(b.digest(), 0);
        // ... unless it is installed again, later.
        std::thread::sleep(std::time::Duration::from_millis(2));
        a.install("m", v1, None).unwrap();
        assert!(b.wants(&a.ads().0[0]));
        assert!(a.for_peer(&ad1.sha256).is_some());
    }

    #[cfg(feature = "wasm")]
    #[test]
    fn a_module_is_found_by_its_sha256() {
        let lane = Lane::new(&Config::default(), &Registry::new());
        let wat = br#"(module (func (export "run")))"#;
        let info = lane.install("empty", wat, None).unwrap();
        assert_eq!(info.sha256.len(), 64);
        let (found, bytes) = lane.by_sha256(&info.sha256.to_uppercase()).unwrap();
        assert_eq!(found.name, "empty");
        assert_eq!(&bytes[..], &wat[..]);
        assert!(lane.by_sha256(&"0".repeat(64)).is_none());
        assert!(lane.remove("empty"));
        assert!(lane.by_sha256(&info.sha256).is_none());
    }
}
