// Test support: start a taskwire server on 127.0.0.1:0, parse its
// `listening on 127.0.0.1:PORT` line, stop it with SIGTERM.
//
// Binary: $TASKWIRE_BIN, else the newer of target/release/taskwire and
// target/debug/taskwire. TASKWIRE_MOCK=1 runs web/testing/mock-server.mjs
// instead (development only: the real tests use the real server).

import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const HERE = path.dirname(fileURLToPath(import.meta.url));
export const REPO = path.resolve(HERE, '..', '..');

export function serverCommand() {
  if (process.env.TASKWIRE_MOCK === '1') {
    return { cmd: process.execPath, args: [path.join(HERE, 'mock-server.mjs')], mock: true };
  }
  if (process.env.TASKWIRE_BIN) return { cmd: process.env.TASKWIRE_BIN, args: [] };
  const candidates = ['release', 'debug']
    .map((p) => path.join(REPO, 'target', p, 'taskwire'))
    .filter((f) => fs.existsSync(f))
    .sort((a, b) => fs.statSync(b).mtimeMs - fs.statSync(a).mtimeMs);
  if (candidates.length === 0) {
    throw new Error('no taskwire binary: build it (cargo build --release -p taskwire-cli) or set TASKWIRE_BIN');
  }
  return { cmd: candidates[0], args: [] };
}

/**
 * Start a server. Resolves with { port, httpUrl, wsUrl, stop(), proc, stderr() }.
 * The demo tasks (spin, runaway, crash) are on unless `demo: false`: the tests
 * use them, and the server offers them only with `--demo`.
 * @param {{port?: number, extraArgs?: string[], timeoutMs?: number, demo?: boolean}} [opts]
 */
export function startServer(opts = {}) {
  const { cmd, args, mock } = serverCommand();
  const addr = `127.0.0.1:${opts.port ?? 0}`;
  const demo = opts.demo !== false && !mock ? ['--demo'] : [];
  return spawnServer(cmd, [...args, 'serve', '--addr', addr, ...demo, ...(opts.extraArgs ?? [])], opts);
}

/**
 * The example that mounts taskwire in its own axum app
 * (crates/taskwire/examples/embed_axum.rs) on 127.0.0.1:0: $TASKWIRE_EXAMPLE_BIN,
 * else target/debug/examples/embed_axum (`cargo build -p taskwire --example embed_axum`).
 * Resolves like startServer; `wsUrl` is taskwire's WebSocket under `/tasks`.
 */
export async function startEmbedExample(opts = {}) {
  const bin = process.env.TASKWIRE_EXAMPLE_BIN || path.join(REPO, 'target', 'debug', 'examples', 'embed_axum');
  if (!fs.existsSync(bin)) {
    throw new Error(`no ${bin}: build it (cargo build -p taskwire --example embed_axum) or set TASKWIRE_EXAMPLE_BIN`);
  }
  const srv = await spawnServer(bin, [], { ...opts, env: { TASKWIRE_EXAMPLE_ADDR: '127.0.0.1:0', ...(opts.env ?? {}) } });
  return { ...srv, wsUrl: `ws://127.0.0.1:${srv.port}/tasks/ws`, tasksUrl: `${srv.httpUrl}/tasks/` };
}

function spawnServer(cmd, argv, opts) {
  const proc = spawn(cmd, argv, {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, ...(opts.env ?? {}) },
  });
  let stderr = '';
  proc.stderr.on('data', (d) => {
    stderr += d;
    if (stderr.length > 200_000) stderr = stderr.slice(-100_000);
    if (process.env.TASKWIRE_TEST_LOG) process.stderr.write(d);
  });
  const exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
  return new Promise((resolve, reject) => {
    let out = '';
    const timer = setTimeout(() => {
      proc.kill('SIGKILL');
      reject(new Error(`server did not print "listening on" within ${opts.timeoutMs ?? 20000} ms\n${stderr}`));
    }, opts.timeoutMs ?? 20000);
    const early = (code, signal) => {
      clearTimeout(timer);
      reject(new Error(`server exited early (code ${code}, signal ${signal}): ${cmd}\n${stderr}`));
    };
    proc.once('exit', early);
    proc.stdout.on('data', (d) => {
      out += d;
      const m = out.match(/listening on 127\.0\.0\.1:(\d+)/);
      if (!m) return;
      clearTimeout(timer);
      proc.removeListener('exit', early);
      proc.stdout.removeAllListeners('data');
      proc.stdout.resume();
      const port = Number(m[1]);
      let stopped = null;
      resolve({
        port,
        proc,
        httpUrl: `http://127.0.0.1:${port}`,
        wsUrl: `ws://127.0.0.1:${port}/ws`,
        stderr: () => stderr,
        exited,
        stop(signal = 'SIGTERM') {
          if (stopped) return stopped;
          stopped = (async () => {
            if (proc.exitCode === null && proc.signalCode === null) {
              proc.kill(signal);
              const killer = setTimeout(() => proc.kill('SIGKILL'), 5000);
              await exited;
              clearTimeout(killer);
            }
          })();
          return stopped;
        },
      });
    });
  });
}

/** Poll `fn` until it returns a truthy value (or a resolved truthy promise). */
export async function eventually(fn, { timeoutMs = 10_000, intervalMs = 50, message = 'condition' } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastErr;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
    } catch (err) { lastErr = err; }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${message}${lastErr ? `: ${lastErr.message}` : ''}`);
    }
    await new Promise((r) => setTimeout(r, intervalMs));
  }
}

export const delay = (ms) => new Promise((r) => setTimeout(r, ms));
