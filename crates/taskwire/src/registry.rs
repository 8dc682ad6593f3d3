//! Task names to task definitions, and the description `rpc.discover` returns.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::protocol::{ErrorObject, Params};
use crate::task::{Ctx, TaskError, TaskKind, TaskOutput};

pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = TaskOutput> + Send + 'static>>;
type Erased = dyn Fn(Ctx, Params<'_>) -> Result<TaskFuture, ErrorObject> + Send + Sync;

/// One registered task.
#[derive(Clone)]
pub struct TaskDef {
    pub(crate) name: Arc<str>,
    pub(crate) kind: TaskKind,
    pub(crate) summary: &'static str,
    pub(crate) schema: Value,
    pub(crate) call: Arc<Erased>,
}

impl std::fmt::Debug for TaskDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskDef")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .finish()
    }
}

impl TaskDef {
    /// A task whose params are not a Rust type: the WebAssembly lane's
    /// modules, which take any JSON and are registered at run time.
    pub(crate) fn erased<F>(
        name: Arc<str>,
        kind: TaskKind,
        summary: &'static str,
        schema: Value,
        call: F,
    ) -> TaskDef
    where
        F: Fn(Ctx, Params<'_>) -> Result<TaskFuture, ErrorObject> + Send + Sync + 'static,
    {
        TaskDef {
            name,
            kind,
            summary,
            schema,
            call: Arc::new(call),
        }
    }

    /// The method name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// I/O or CPU.
    pub fn kind(&self) -> TaskKind {
        self.kind
    }
    /// The one-line summary.
    pub fn summary(&self) -> &str {
        self.summary
    }
    /// The JSON Schema of the params.
    pub fn params_schema(&self) -> &Value {
        &self.schema
    }
}

/// The tasks a server offers, by method name.
///
/// ```
/// use schemars::JsonSchema;
/// use serde::Deserialize;
/// use taskwire::{Ctx, Registry, TaskError};
///
/// #[derive(Deserialize, JsonSchema)]
/// struct Add { a: i64, b: i64 }
///
/// let mut registry = Registry::new();
/// registry.io("add", "Adds two integers", |_ctx: Ctx, p: Add| async move {
///     Ok::<_, TaskError>(p.a + p.b)
/// });
/// assert!(registry.get("add").is_some());
/// ```
#[derive(Clone, Debug, Default)]
pub struct Registry {
    tasks: HashMap<Arc<str>, TaskDef>,
}

impl Registry {
    /// A registry with no tasks (the built-ins are added by
    /// [`crate::builtin::register`]).
    pub fn new() -> Self {
        Registry::default()
    }

    /// Registers an I/O task: it runs on Tokio's threads and must not burn CPU.
    ///
    /// The connection's reader polls a new I/O task once in place, so that an
    /// instant task is answered without a spawn; a task that is not ready then
    /// continues on a Tokio task of its own. Either way each poll must return
    /// quickly: a blocking call in an I/O task stalls the threads that serve
    /// connections (use a CPU task, or `tokio::task::spawn_blocking`, instead).
    ///
    /// # Panics
    /// If the name is taken or reserved (`rpc.*`, `$/*`): a programming error,
    /// caught when the server is built.
    pub fn io<P, O, F, Fut>(&mut self, name: &str, summary: &'static str, f: F) -> &mut Self
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        self.register(name, TaskKind::Io, summary, f)
    }

    /// Registers a CPU task: it runs on the compute pool and must call
    /// [`Ctx::checkpoint`] in its loops.
    ///
    /// # Panics
    /// As [`Registry::io`].
    pub fn cpu<P, O, F, Fut>(&mut self, name: &str, summary: &'static str, f: F) -> &mut Self
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        self.register(name, TaskKind::Cpu, summary, f)
    }

    fn register<P, O, F, Fut>(
        &mut self,
        name: &str,
        kind: TaskKind,
        summary: &'static str,
        f: F,
    ) -> &mut Self
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        assert!(
            !name.starts_with("rpc.") && !name.starts_with("$/") && !name.is_empty(),
            "task name {name:?} is reserved by the protocol"
        );
        assert!(
            !self.tasks.contains_key(name),
            "task {name:?} is registered twice"
        );
        let schema = serde_json::to_value(schemars::schema_for!(P)).unwrap_or(Value::Null);
        let call = move |ctx: Ctx, params: Params<'_>| -> Result<TaskFuture, ErrorObject> {
            let p: P = params.deserialize().map_err(ErrorObject::invalid_params)?;
            let fut = f(ctx, p);
            Ok(Box::pin(async move {
                let out = fut.await?;
                serde_json::value::to_raw_value(&out)
                    .map_err(|e| TaskError::Internal(format!("result is not JSON: {e}")))
            }) as TaskFuture)
        };
        let name: Arc<str> = name.into();
        self.tasks.insert(
            name.clone(),
            TaskDef {
                name,
                kind,
                summary,
                schema,
                call: Arc::new(call),
            },
        );
        self
    }

    /// The task registered under `name`.
    pub fn get(&self, name: &str) -> Option<&TaskDef> {
        self.tasks.get(name)
    }

    /// Every task, sorted by name.
    pub fn tasks(&self) -> Vec<&TaskDef> {
        let mut v: Vec<&TaskDef> = self.tasks.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The OpenRPC-style description that `rpc.discover` returns.
    pub fn discover(&self) -> Value {
        let methods: Vec<Value> = self
            .tasks()
            .into_iter()
            .map(|t| {
                serde_json::json!({
                    "name": &*t.name,
                    "summary": t.summary,
                    "kind": t.kind.as_str(),
                    "paramsSchema": t.schema,
                    "paramStructure": "by-name",
                    "params": [{ "name": "params", "required": false, "schema": t.schema }],
                    "result": { "name": "result", "schema": {} },
                })
            })
            .collect();
        serde_json::json!({
            "openrpc": "1.3.2",
            "info": { "title": "taskwire", "version": env!("CARGO_PKG_VERSION") },
            "methods": methods,
        })
    }
}
