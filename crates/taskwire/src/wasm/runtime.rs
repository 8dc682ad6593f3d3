//! The engine (wasmtime with epoch interruption and the pooling allocator),
//! compiling a module into a task, and running one task as a future on the
//! compute pool.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::value::RawValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use wasmtime::{
    Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, Trap, UpdateDeadline, Val, ValType,
};

use super::host::{self, Budget, Halt, Host};
use super::{About, Limits};
use crate::compute::{add_tick_hook, should_yield, TickHook};
use crate::limit::Slot;
use crate::protocol::{codes, ErrorObject, Params};
use crate::registry::{TaskDef, TaskFuture};
use crate::task::{Ctx, TaskError, TaskKind, TaskOutput};

/// What a client refused for `wasm_instances` is told to wait: instances
/// end at the rate tasks do, which the lane does not track; a short hint.
const RETRY_AFTER_MS: u64 = 50;
/// The guard below each pooled memory. Memories are reserved at their limit
/// (not 4 GiB each), so loads and stores keep explicit bounds checks: the
/// price of sizing the pool's address space to the settings.
const GUARD_BYTES: u64 = 64 << 10;
const WASM_PAGE: u64 = 64 << 10;

/// Advances the engine's epoch with the pool's.
struct EngineTick(Engine);

impl TickHook for EngineTick {
    fn tick(&self) {
        self.0.increment_epoch();
    }
}

/// What every task of one engine shares.
struct Shared {
    instances: Arc<AtomicUsize>,
    instance_limit: usize,
    budget: Arc<Budget>,
}

/// The engine, its linker, and the instance and memory accounting.
pub(crate) struct Runtime {
    engine: Engine,
    linker: Linker<Host>,
    shared: Arc<Shared>,
    _tick: Arc<EngineTick>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("instances", &self.shared.instance_limit)
            .finish()
    }
}

/// Compiled code, ready to instantiate: shared by the modules of the same
/// bytes and held by every task running it.
#[derive(Clone)]
pub(super) struct Code {
    pre: InstancePre<Host>,
    has_initialize: bool,
}

pub(super) fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Runtime {
    pub(super) fn new(limits: Limits) -> Result<Runtime, String> {
        let slots = u32::try_from(limits.instances).unwrap_or(u32::MAX);
        let memory = limits.memory_limit.div_ceil(WASM_PAGE) * WASM_PAGE;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .total_stacks(slots)
            .max_memories_per_module(1)
            .max_tables_per_module(1)
            .max_memory_size(memory as usize)
            // Nothing kept resident between tasks: a task's memory goes back
            // to the kernel when it ends.
            .linear_memory_keep_resident(0)
            .table_keep_resident(0)
            .async_stack_keep_resident(0);
        let mut cfg = wasmtime::Config::new();
        cfg.epoch_interruption(true)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool))
            .memory_reservation(memory)
            .memory_reservation_for_growth(0)
            .memory_guard_size(GUARD_BYTES)
            .memory_init_cow(true)
            .cranelift_opt_level(wasmtime::OptLevel::Speed);
        let engine = Engine::new(&cfg).map_err(|e| format!("the wasm engine: {e}"))?;
        let mut linker = Linker::new(&engine);
        host::link(&mut linker).map_err(|e| format!("the wasm linker: {e}"))?;
        let tick = Arc::new(EngineTick(engine.clone()));
        let weak: std::sync::Weak<dyn TickHook> = Arc::downgrade(&tick) as _;
        add_tick_hook(weak);
        Ok(Runtime {
            engine,
            linker,
            shared: Arc::new(Shared {
                instances: Arc::new(AtomicUsize::new(0)),
                instance_limit: limits.instances,
                budget: Arc::new(Budget {
                    used: Default::default(),
                    limit: limits.memory_budget,
                }),
            }),
            _tick: tick,
        })
    }

    /// Compiles `bytes` (or reuses `code` of the same bytes) into a task.
    pub(super) fn task(
        &self,
        about: About,
        bytes: &[u8],
        code: Option<Code>,
        memory_limit: u64,
        running: Arc<AtomicUsize>,
    ) -> Result<(TaskDef, Code), String> {
        let code = match code {
            Some(c) => c,
            None => self.compile(bytes)?,
        };
        let shared = self.shared.clone();
        let engine_code = code.clone();
        let def = TaskDef::erased(
            about.name,
            TaskKind::Wasm,
            about.summary,
            about.schema,
            move |ctx: Ctx, params: Params<'_>| -> Result<TaskFuture, ErrorObject> {
                let slot = Slot::acquire(&shared.instances, shared.instance_limit)
                    .ok_or_else(|| ErrorObject::overloaded("wasm_instances", RETRY_AFTER_MS))?;
                let input = match params {
                    Params::None => b"{}".to_vec(),
                    Params::Raw(raw) | Params::Array(raw) => raw.get().as_bytes().to_vec(),
                    Params::Owned(raw) => raw.get().as_bytes().to_vec(),
                };
                running.fetch_add(1, Ordering::Relaxed);
                let running = Running(running.clone());
                let code = engine_code.clone();
                let budget = shared.budget.clone();
                Ok(Box::pin(async move {
                    let _held = (slot, running);
                    run(code, ctx, input, memory_limit, budget).await
                }) as TaskFuture)
            },
        );
        Ok((def, code))
    }

    fn compile(&self, bytes: &[u8]) -> Result<Code, String> {
        let module = Module::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
        match module.get_export("run") {
            Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0 => {}
            Some(_) => {
                return Err(
                    "the export `run` must be a function of no params and no results".into(),
                )
            }
            None => return Err("the module exports no function `run`".into()),
        }
        let has_initialize = matches!(module.get_export("_initialize"), Some(ExternType::Func(f)) if f.params().len() == 0 && f.results().len() == 0);
        // Every wasi function the shim does not offer answers ENOSYS; any
        // other import is refused here, at install, not at the first call.
        let mut linker = self.linker.clone();
        for import in module.imports() {
            match import.module() {
                "taskwire" => {}
                "wasi_snapshot_preview1" if host::WASI_OFFERED.contains(&import.name()) => {}
                "wasi_snapshot_preview1" => {
                    let ExternType::Func(ty) = import.ty() else {
                        return Err(format!("unsupported import {}.{}", import.module(), import.name()));
                    };
                    let answers_errno = match ty.results().collect::<Vec<_>>().as_slice() {
                        [] => false,
                        [ValType::I32] => true,
                        _ => return Err(format!("unsupported import {}.{}", import.module(), import.name())),
                    };
                    linker
                        .func_new(
                            import.module(),
                            import.name(),
                            ty,
                            move |_: wasmtime::Caller<'_, Host>, _: &[Val], results: &mut [Val]| {
                            if answers_errno {
                                results[0] = Val::I32(host::ENOSYS);
                            }
                            Ok(())
                        })
                        .map_err(|e| e.to_string())?;
                }
                other => {
                    return Err(format!(
                        "the module imports {other}.{}: taskwire offers only `taskwire` and a wasi_snapshot_preview1 shim (docs/WASM.md)",
                        import.name()
                    ))
                }
            }
        }
        let pre = linker
            .instantiate_pre(&module)
            .map_err(|e| format!("{e:#}"))?;
        Ok(Code {
            pre,
            has_initialize,
        })
    }
}

/// Counts a module's admitted tasks for the admin API.
struct Running(Arc<AtomicUsize>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// At every epoch tick: stop a task that was told to stop, yield the worker
/// when the slice is used up (the checkpoint's own test), else go on.
fn at_deadline(ctx: &Ctx) -> wasmtime::Result<UpdateDeadline> {
    if let Some(s) = ctx.stopped() {
        return Err(wasmtime::Error::new(Halt::Stopped(s)));
    }
    if should_yield() {
        Ok(UpdateDeadline::Yield(1))
    } else {
        Ok(UpdateDeadline::Continue(1))
    }
}

/// One task: instantiate, `_initialize` if exported, `run`, answer.
async fn run(code: Code, ctx: Ctx, input: Vec<u8>, limit: u64, budget: Arc<Budget>) -> TaskOutput {
    let mut store = Store::new(
        code.pre.module().engine(),
        Host::new(ctx.clone(), input, limit, budget),
    );
    store.limiter(|h| h);
    let watched = ctx.clone();
    store.epoch_deadline_callback(move |_| at_deadline(&watched));
    store.set_epoch_deadline(1);
    let called = call(&code, &mut store).await;
    let host = store.data_mut();
    match called {
        Ok(()) => {}
        Err(e) => match e.downcast_ref::<Halt>() {
            Some(Halt::Exit(0)) => {}
            _ => return Err(failure(&e, host)),
        },
    }
    if let Some(err) = host.error.take() {
        return Err(err);
    }
    Ok(host
        .result
        .take()
        .unwrap_or_else(|| RawValue::NULL.to_owned()))
}

async fn call(code: &Code, store: &mut Store<Host>) -> wasmtime::Result<()> {
    let instance = code.pre.instantiate_async(&mut *store).await?;
    if code.has_initialize {
        instance
            .get_typed_func::<(), ()>(&mut *store, "_initialize")?
            .call_async(&mut *store, ())
            .await?;
    }
    instance
        .get_typed_func::<(), ()>(&mut *store, "run")?
        .call_async(&mut *store, ())
        .await
}

/// The answer for a guest that did not return.
fn failure(e: &wasmtime::Error, host: &Host) -> TaskError {
    match e.downcast_ref::<Halt>() {
        Some(Halt::Stopped(s)) => return TaskError::Stopped(*s),
        Some(Halt::Memory { limit, .. }) => {
            return TaskError::Failed {
                code: codes::MEMORY_LIMIT,
                message: e.to_string(),
                data: Some(serde_json::json!({ "limitBytes": limit })),
            }
        }
        _ => {}
    }
    if let Some(s) = host.ctx.stopped() {
        return TaskError::Stopped(s);
    }
    let message = match e.downcast_ref::<Trap>() {
        Some(trap) => format!("trapped: {trap}"),
        None => format!("trapped: {}", e.root_cause()),
    };
    TaskError::failed(codes::TRAPPED, message)
}

/// One module run through the lane's own path (instance slot, store,
/// limiter, deadline callback, `run`) on the calling thread, for the
/// benchmarks: what instantiate + call + tear down costs, and how fast a
/// guest runs.
#[derive(Debug)]
pub struct BenchModule {
    _runtime: Runtime,
    def: TaskDef,
}

impl BenchModule {
    /// Compiles `module` (binary or text) with the default limits.
    pub fn new(module: &[u8]) -> Result<BenchModule, String> {
        let runtime = Runtime::new(Limits {
            memory_limit: 64 << 20,
            memory_budget: 1 << 30,
            instances: 16,
            max_modules: 1,
        })?;
        let about = About {
            name: "bench".into(),
            summary: "bench".into(),
            schema: Value::Null,
        };
        let (def, _) = runtime.task(about, module, None, 64 << 20, Arc::default())?;
        Ok(BenchModule {
            _runtime: runtime,
            def,
        })
    }

    /// Runs the task once with these params (JSON text) to completion;
    /// the result's JSON text, or the error's message.
    pub fn call(&self, params: &str) -> Result<String, String> {
        let raw = RawValue::from_string(params.to_string()).map_err(|e| e.to_string())?;
        let fut =
            (self.def.call)(Ctx::detached("bench"), Params::Raw(&raw)).map_err(|e| e.message)?;
        block_on(fut)
            .map(|v| v.get().to_string())
            .map_err(|e| e.to_string())
    }
}

/// Polls a future to completion on this thread.
fn block_on<F: std::future::Future>(fut: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
