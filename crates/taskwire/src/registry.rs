//! Task names to task definitions, and the description `rpc.discover` returns.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use axum::http::Extensions;
use schemars::generate::SchemaSettings;
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::protocol::{ErrorObject, ParamField, Params};
use crate::task::{Ctx, TaskError, TaskKind, TaskOutput};

/// Why a task could not be registered. Each is a programming error, caught
/// when the registry is built, before a server starts.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The name is empty.
    #[error("a task name must not be empty")]
    EmptyName,
    /// The name belongs to the protocol (`rpc.*`, `$/*`).
    #[error("task name {0:?} is reserved by the protocol (`rpc.*` and `$/*` are)")]
    Reserved(String),
    /// A task is already registered under this name.
    #[error("task {0:?} is registered twice")]
    Duplicate(String),
    /// No task is registered under this name (to mark it idempotent).
    #[error("no task {0:?} is registered")]
    Unknown(String),
    /// The params can never be sent: JSON-RPC params are an object or an
    /// array, and this type's schema allows neither (a number, a string,
    /// `()`), or it is a struct whose schema lists no properties, so its
    /// fields have no order for params by position.
    #[error("task {name:?}: its params must be a JSON object with named fields, or an array, but their schema is {schema}")]
    ParamsNotObject {
        /// The task.
        name: String,
        /// The params' JSON Schema, as text.
        schema: String,
    },
}

/// How a task's params take an array.
#[derive(Clone, Debug)]
enum Shape {
    /// A struct: element `i` is field `i`, in declaration order.
    Fields(Arc<[ParamField]>),
    /// An object without fixed fields (a map, a flattened struct): no
    /// positional form.
    ByName,
    /// Anything else that accepts an array (`Value`, a `Vec`, a tuple): the
    /// array reaches the task as it is.
    Whole,
}

pub(crate) type TaskFuture = Pin<Box<dyn Future<Output = TaskOutput> + Send + 'static>>;
type Erased = dyn Fn(Ctx, Params<'_>) -> Result<TaskFuture, ErrorObject> + Send + Sync;

/// One registered task.
#[derive(Clone)]
pub struct TaskDef {
    pub(crate) name: Arc<str>,
    pub(crate) kind: TaskKind,
    pub(crate) summary: Arc<str>,
    pub(crate) schema: Value,
    pub(crate) result_schema: Value,
    pub(crate) params: Value,
    pub(crate) param_structure: &'static str,
    pub(crate) call: Arc<Erased>,
    /// Whether running it twice is harmless ([`Registry::idempotent`]).
    pub(crate) idempotent: bool,
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
        summary: Arc<str>,
        schema: Value,
        call: F,
    ) -> TaskDef
    where
        F: Fn(Ctx, Params<'_>) -> Result<TaskFuture, ErrorObject> + Send + Sync + 'static,
    {
        // The guest reads its params as JSON text, an object or an array
        // alike, and may answer any JSON.
        let (params, param_structure) = describe_params(&Shape::Whole, &schema);
        TaskDef {
            name,
            kind,
            summary,
            schema,
            result_schema: Value::Bool(true),
            params,
            param_structure,
            call: Arc::new(call),
            // A module's code may have effects: never run twice.
            idempotent: false,
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
        &self.summary
    }
    /// Whether it was marked idempotent ([`Registry::idempotent`]).
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }
    /// The JSON Schema of the params.
    pub fn params_schema(&self) -> &Value {
        &self.schema
    }
    /// The JSON Schema of the result.
    pub fn result_schema(&self) -> &Value {
        &self.result_schema
    }
}

/// The tasks a server offers, by method name.
///
/// ```
/// use schemars::JsonSchema;
/// use serde::Deserialize;
/// use taskwire::{Ctx, RegisterError, Registry, TaskError};
///
/// #[derive(Deserialize, JsonSchema)]
/// struct Add { a: i64, b: i64 }
///
/// let mut registry = Registry::new();
/// registry.io("add", "Adds two integers", |_ctx: Ctx, p: Add| async move {
///     Ok::<_, TaskError>(p.a + p.b)
/// })?;
/// assert!(registry.get("add").is_some());
/// let again = registry.io("add", "Again", |_ctx: Ctx, p: Add| async move {
///     Ok::<_, TaskError>(p.a)
/// });
/// assert_eq!(again.unwrap_err(), RegisterError::Duplicate("add".into()));
/// # Ok::<(), RegisterError>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct Registry {
    tasks: HashMap<Arc<str>, TaskDef>,
    /// Shared state by type, each value an `Arc<S>` ([`Registry::with_state`]).
    states: Extensions,
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
    /// The params' and the result's JSON Schemas are what `rpc.discover`
    /// shows (a result of `serde_json::Value` is described as "anything").
    ///
    /// # Errors
    /// A name that is empty, taken or reserved (`rpc.*`, `$/*`), or params
    /// that no request could carry: see [`RegisterError`].
    pub fn io<P, O, F, Fut>(
        &mut self,
        name: impl Into<String>,
        summary: impl Into<String>,
        f: F,
    ) -> Result<&mut Self, RegisterError>
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + JsonSchema + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        self.register(name.into(), TaskKind::Io, summary.into(), f)
    }

    /// Registers a CPU task: it runs on the compute pool and must call
    /// [`Ctx::checkpoint`] in its loops.
    ///
    /// # Errors
    /// As [`Registry::io`].
    pub fn cpu<P, O, F, Fut>(
        &mut self,
        name: impl Into<String>,
        summary: impl Into<String>,
        f: F,
    ) -> Result<&mut Self, RegisterError>
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + JsonSchema + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        self.register(name.into(), TaskKind::Cpu, summary.into(), f)
    }

    fn register<P, O, F, Fut>(
        &mut self,
        name: String,
        kind: TaskKind,
        summary: String,
        f: F,
    ) -> Result<&mut Self, RegisterError>
    where
        P: DeserializeOwned + JsonSchema + Send + 'static,
        O: Serialize + JsonSchema + 'static,
        F: Fn(Ctx, P) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    {
        if name.is_empty() {
            return Err(RegisterError::EmptyName);
        }
        if name.starts_with("rpc.") || name.starts_with("$/") {
            return Err(RegisterError::Reserved(name));
        }
        if self.tasks.contains_key(name.as_str()) {
            return Err(RegisterError::Duplicate(name));
        }
        let schema = schema_of::<P>();
        let result_schema = schema_of::<O>();
        let shape = shape_of::<P>(&name, &schema)?;
        let (params, param_structure) = describe_params(&shape, &schema);
        let call = move |ctx: Ctx, params: Params<'_>| -> Result<TaskFuture, ErrorObject> {
            let params = match &shape {
                Shape::Fields(fields) => params.into_named(fields)?,
                Shape::ByName if matches!(params, Params::Array(_)) => {
                    return Err(ErrorObject::invalid_params(
                        "this task takes its params by name: send an object",
                    ))
                }
                Shape::ByName | Shape::Whole => params,
            };
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
                summary: summary.into(),
                schema,
                result_schema,
                params,
                param_structure,
                call: Arc::new(call),
                idempotent: false,
            },
        );
        Ok(self)
    }

    /// Marks the task `name` as idempotent: running it twice is harmless.
    /// In a cluster, such a task whose node was lost is run once more (on
    /// another node or here) instead of being answered `-32008`; no other
    /// task is ever re-run.
    ///
    /// ```
    /// # fn main() -> Result<(), taskwire::RegisterError> {
    /// let mut registry = taskwire::Registry::new();
    /// taskwire::builtin::register(&mut registry)?;
    /// registry.idempotent("count_primes")?;
    /// # Ok(()) }
    /// ```
    pub fn idempotent(&mut self, name: &str) -> Result<&mut Self, RegisterError> {
        match self.tasks.get_mut(name) {
            Some(def) => {
                def.idempotent = true;
                Ok(self)
            }
            None => Err(RegisterError::Unknown(name.to_string())),
        }
    }

    /// Shares `state` with every task, as [`Ctx::state::<S>()`](Ctx::state):
    /// one value per type, behind an `Arc`, instead of a clone captured in
    /// each task's closure. Use interior mutability (atomics, a `Mutex`) to
    /// change it.
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    /// use taskwire::{Ctx, Registry, TaskError};
    ///
    /// #[derive(Default)]
    /// struct Hits(AtomicU64);
    ///
    /// let mut registry = Registry::new();
    /// registry.with_state(Hits::default());
    /// registry.io("hit", "Counts calls", |ctx: Ctx, _: ()| async move {
    ///     Ok::<_, TaskError>(ctx.state::<Hits>()?.0.fetch_add(1, Ordering::Relaxed) + 1)
    /// });
    /// ```
    ///
    /// # Panics
    /// If a state of this type is already set: a programming error, caught
    /// when the server is built.
    pub fn with_state<S: Send + Sync + 'static>(&mut self, state: S) -> &mut Self {
        assert!(
            self.states.get::<Arc<S>>().is_none(),
            "shared state of type {} is set twice",
            std::any::type_name::<S>()
        );
        self.states.insert(Arc::new(state));
        self
    }

    /// The shared state, `None` when there is none (tasks then skip a
    /// reference count).
    pub(crate) fn states(&self) -> Option<Arc<Extensions>> {
        (!self.states.is_empty()).then(|| Arc::new(self.states.clone()))
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
                    "summary": &*t.summary,
                    "kind": t.kind.as_str(),
                    "paramsSchema": t.schema,
                    "paramStructure": t.param_structure,
                    "params": t.params,
                    "result": { "name": "result", "schema": t.result_schema },
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

/// A type's JSON Schema with every subschema inlined (no `$defs`), so that
/// each field's schema in `rpc.discover` stands on its own. Only a recursive
/// type keeps a `$ref`.
fn schema_of<T: JsonSchema>() -> Value {
    let generator = SchemaSettings::default()
        .with(|s| s.inline_subschemas = true)
        .into_generator();
    let mut schema = generator.into_root_schema_for::<T>().to_value();
    // Every schema here is 2020-12 (docs/PROTOCOL.md says so once); the
    // marker repeated in each method's params and result is noise.
    if let Some(o) = schema.as_object_mut() {
        o.remove("$schema");
    }
    schema
}

/// Whether a schema admits a value of JSON type `ty`: `true`, `{}` or a
/// schema without `type` admits anything.
fn admits(schema: &Value, ty: &str) -> bool {
    match schema {
        Value::Bool(b) => *b,
        Value::Object(o) => match o.get("type") {
            None => true,
            Some(Value::String(t)) => t == ty,
            Some(Value::Array(ts)) => ts.iter().any(|t| t == ty),
            Some(_) => false,
        },
        _ => false,
    }
}

fn shape_of<P: DeserializeOwned>(name: &str, schema: &Value) -> Result<Shape, RegisterError> {
    let not_object = || RegisterError::ParamsNotObject {
        name: name.to_string(),
        schema: schema.to_string(),
    };
    let Some(fields) = probe::struct_fields::<P>() else {
        if admits(schema, "array") {
            return Ok(Shape::Whole);
        }
        if admits(schema, "object") {
            return Ok(Shape::ByName);
        }
        return Err(not_object());
    };
    // serde gives the fields in declaration order (`Map` in the schema
    // would sort them unless serde_json's `preserve_order` were on); the
    // schema gives which are required and what each holds.
    let Some(properties) = schema.get("properties").and_then(Value::as_object) else {
        return if fields.is_empty() && admits(schema, "object") {
            Ok(Shape::Fields(Arc::from([])))
        } else {
            Err(not_object())
        };
    };
    let required: Vec<&str> = schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    // serde lists aliases among the fields; the schema does not.
    let mut ordered: Vec<ParamField> = fields
        .iter()
        .filter(|f| properties.contains_key(**f))
        .map(|f| ParamField {
            name: (*f).to_string(),
            required: required.contains(f),
        })
        .collect();
    // A property serde does not name (a schema written by hand) still gets
    // a place, after the declared ones.
    for key in properties.keys() {
        if !ordered.iter().any(|f| f.name == *key) {
            ordered.push(ParamField {
                name: key.clone(),
                required: required.contains(&key.as_str()),
            });
        }
    }
    Ok(Shape::Fields(ordered.into()))
}

/// The `params` descriptors and the `paramStructure` of `rpc.discover`.
fn describe_params(shape: &Shape, schema: &Value) -> (Value, &'static str) {
    match shape {
        Shape::Fields(fields) => {
            let params = fields
                .iter()
                .map(|f| {
                    let field_schema = schema
                        .get("properties")
                        .and_then(|p| p.get(&f.name))
                        .cloned()
                        .unwrap_or(Value::Bool(true));
                    serde_json::json!({
                        "name": f.name,
                        "required": f.required,
                        "schema": field_schema,
                    })
                })
                .collect();
            (Value::Array(params), "either")
        }
        // One descriptor for the whole params: no fields to list.
        Shape::ByName => (
            serde_json::json!([{ "name": "params", "required": false, "schema": schema }]),
            "by-name",
        ),
        Shape::Whole => (
            serde_json::json!([{ "name": "params", "required": false, "schema": schema }]),
            "either",
        ),
    }
}

/// Reads a params type's field names, in declaration order, from its own
/// `Deserialize`: serde's derive hands `deserialize_struct` the list of
/// fields as declared (after `rename`). Nothing is deserialized.
mod probe {
    use serde::de::{Deserializer, Visitor};

    type Fields = &'static [&'static str];

    /// The probe's only outcome: the fields, or not a struct.
    #[derive(Debug)]
    pub(super) struct Found(Option<Fields>);

    impl std::fmt::Display for Found {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("probe")
        }
    }

    impl std::error::Error for Found {}

    impl serde::de::Error for Found {
        fn custom<T: std::fmt::Display>(_msg: T) -> Self {
            Found(None)
        }
    }

    struct Probe;

    impl<'de> Deserializer<'de> for Probe {
        type Error = Found;

        fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Found> {
            Err(Found(None))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: Fields,
            _visitor: V,
        ) -> Result<V::Value, Found> {
            Err(Found(Some(fields)))
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            visitor: V,
        ) -> Result<V::Value, Found> {
            visitor.visit_newtype_struct(self)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }

    /// The fields of `P` if it deserializes as a struct.
    pub(super) fn struct_fields<P: serde::de::DeserializeOwned>() -> Option<Fields> {
        match P::deserialize(Probe) {
            Err(Found(fields)) => fields,
            Ok(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use schemars::JsonSchema;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, JsonSchema)]
    #[allow(dead_code)]
    struct Unordered {
        zeta: u64,
        #[serde(rename = "Middle", alias = "mid")]
        middle: String,
        #[serde(default)]
        alpha: Option<bool>,
    }

    async fn nothing<P>(_ctx: Ctx, _p: P) -> Result<Value, TaskError> {
        Ok(Value::Null)
    }

    #[test]
    fn params_keep_declaration_order() {
        let mut r = Registry::new();
        r.io("u", "U", nothing::<Unordered>).unwrap();
        let d = r.discover();
        let m = &d["methods"][0];
        assert_eq!(m["paramStructure"], "either");
        let names: Vec<&str> = m["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["zeta", "Middle", "alpha"]);
        let required: Vec<bool> = m["params"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["required"].as_bool().unwrap())
            .collect();
        assert_eq!(required, [true, true, false]);
        assert_eq!(m["params"][0]["schema"]["type"], "integer");
        // The result is a `Value`: anything (a schema with no constraint).
        assert_eq!(
            m["result"]["schema"],
            serde_json::json!({"title": "AnyValue"})
        );
    }

    #[test]
    fn registration_errors_are_typed() {
        let mut r = Registry::new();
        assert_eq!(
            r.io("", "x", nothing::<Value>).err(),
            Some(RegisterError::EmptyName)
        );
        for reserved in ["rpc.discover", "$/ping"] {
            assert_eq!(
                r.io(reserved, "x", nothing::<Value>).err(),
                Some(RegisterError::Reserved(reserved.into()))
            );
        }
        r.cpu("t", String::from("owned summary"), nothing::<Value>)
            .unwrap();
        assert_eq!(
            r.io("t", "x", nothing::<Value>).err(),
            Some(RegisterError::Duplicate("t".into()))
        );
        assert!(matches!(
            r.io("n", "x", nothing::<u64>),
            Err(RegisterError::ParamsNotObject { .. })
        ));
        assert!(matches!(
            r.io("s", "x", nothing::<String>),
            Err(RegisterError::ParamsNotObject { .. })
        ));
        assert_eq!(r.get("t").map(|t| t.summary()), Some("owned summary"));
    }

    #[test]
    fn params_shapes() {
        let mut r = Registry::new();
        r.io("v", "x", nothing::<Value>)
            .and_then(|r| r.io("m", "x", nothing::<HashMap<String, u64>>))
            .and_then(|r| r.io("t", "x", nothing::<(u64, String)>))
            .unwrap();
        let d = r.discover();
        let structure = |name: &str| {
            d["methods"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == name)
                .map(|m| m["paramStructure"].clone())
                .unwrap()
        };
        assert_eq!(structure("v"), "either");
        assert_eq!(structure("m"), "by-name");
        assert_eq!(structure("t"), "either");
    }
}
