#!/usr/bin/env node
// A small stand-in for `taskwire serve`, written against PROTOCOL.md and the
// admin API contract, used only for developing the client and the dashboard
// when no real server binary is available (TASKWIRE_MOCK=1). It is not a
// reference implementation: CPU work is simulated with timers.
//
//   node web/testing/mock-server.mjs [--addr 127.0.0.1:0]
// prints `listening on 127.0.0.1:PORT` on stdout once bound.

import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { WebSocketServer } from 'ws';

const WEB = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const WORKERS = 2;
const MAX_INFLIGHT = 500;

const args = process.argv.slice(2);
const addrArg = args[args.indexOf('--addr') + 1] ?? '127.0.0.1:0';
const [host, port] = addrArg.split(':');

const started = Date.now();
let nextTaskId = 1;
let nextConnId = 1;
const tasks = new Map(); // task id -> task
const conns = new Map(); // conn id -> conn
const finished = { ok: 0, error: 0, crashed: 0, cancelled: 0, timeout: 0, killed: 0, refused: 0 };

class RpcError extends Error {
  constructor(code, message, data) { super(message); this.code = code; this.data = data; }
}

const sleep = (ms, signal) => new Promise((resolve, reject) => {
  const t = setTimeout(resolve, ms);
  signal.addEventListener('abort', () => { clearTimeout(t); reject(signal.reason); }, { once: true });
});

function needNum(p, field, max) {
  const v = p?.[field];
  if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > max) {
    throw new RpcError(-32602, `invalid params: missing or bad field \`${field}\``);
  }
  return v;
}

function splitmix(x) {
  const M = (1n << 64n) - 1n;
  let z = (x + 0x9E3779B97F4A7C15n) & M;
  z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & M;
  z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & M;
  return z ^ (z >> 31n);
}

// CPU tasks "burn" simulated CPU in 20 ms slices on a pool of WORKERS slots
// (FIFO), so a flood queues up as it would on the real compute pool.
const waiters = [];
let busySlots = 0;
function acquire(signal) {
  if (busySlots < WORKERS) { busySlots++; return Promise.resolve(); }
  return new Promise((resolve, reject) => {
    const w = { resolve };
    waiters.push(w);
    signal.addEventListener('abort', () => {
      const i = waiters.indexOf(w);
      if (i >= 0) { waiters.splice(i, 1); reject(signal.reason); }
    }, { once: true });
  });
}
function release() {
  const w = waiters.shift();
  if (w) w.resolve(); else busySlots--;
}
async function burn(task, ms, signal) {
  const step = 20;
  let left = ms;
  while (left > 0) {
    const d = Math.min(step, left);
    task.state = 'queued';
    await acquire(signal);
    task.state = 'running';
    try { await sleep(d, signal); } finally { release(); }
    task.cpuMs += d;
    left -= d;
  }
}

const registry = {
  echo: { kind: 'io', run: async (p) => p?.value ?? null },
  sleep: { kind: 'io', run: async (p, t, s) => { const ms = needNum(p, 'ms', 3600000); await sleep(ms, s); return { sleptMs: ms }; } },
  hash_chain: {
    kind: 'cpu',
    run: async (p, t, s) => {
      let x = BigInt(needNum(p, 'seed', Number.MAX_SAFE_INTEGER));
      const rounds = needNum(p, 'rounds', 1e12);
      for (let i = 0; i < rounds; i++) {
        x = splitmix(x);
        if (i % 20000 === 19999) { await sleep(0, s); t.cpuMs += 5; }
      }
      return { digest: x.toString() };
    },
  },
  count_primes: {
    kind: 'cpu',
    run: async (p, t, s, progress) => {
      const below = needNum(p, 'below', 1e10);
      const chunks = 20;
      let count = 0;
      if (below <= 5e7) {
        const sieve = new Uint8Array(below);
        for (let i = 2; i < below; i++) {
          if (sieve[i]) continue;
          count++;
          for (let j = i * i; j < below; j += i) sieve[j] = 1;
        }
      }
      for (let c = 1; c <= chunks; c++) {
        await burn(t, below > 5e7 ? 1000 : 10, s);
        progress({ done: Math.floor((below * c) / chunks), total: below });
      }
      return { count };
    },
  },
  spin: { kind: 'cpu', run: async (p, t, s) => { const ms = needNum(p, 'ms', 3600000); await burn(t, ms, s); return { spunMs: ms }; } },
  runaway: { kind: 'cpu', run: async (p, t, s) => { for (;;) await burn(t, 1000, s); } },
  crash: {
    kind: 'cpu',
    run: async (p, t, s) => { await burn(t, 5, s); throw new RpcError(-32003, `task panicked: ${p?.message ?? 'crash'}`); },
  },
};

function taskInfo(t) {
  return {
    id: t.id, conn: t.conn.id, requestId: t.requestId, method: t.method, kind: t.kind,
    state: t.state, ageMs: Date.now() - t.started, cpuMs: Math.round(t.cpuMs), progress: t.progress,
    notYielding: t.method === 'runaway' && t.cpuMs > 1000,
  };
}

function stats() {
  const st = { queued: 0, running: 0, yielded: 0, waiting: 0 };
  for (const t of tasks.values()) st[t.state]++;
  const busy = busySlots;
  return {
    connections: conns.size, tasks: st,
    pool: { workers: WORKERS, busy, utilisation: busy / WORKERS, queued: waiters.length },
    finished: { ...finished }, uptimeMs: Date.now() - started,
  };
}

function runRequest(conn, req, reply) {
  if (req === null || typeof req !== 'object' || req.jsonrpc !== '2.0' || typeof req.method !== 'string') {
    reply({ jsonrpc: '2.0', id: req?.id ?? null, error: { code: -32600, message: 'invalid request' } });
    return;
  }
  const hasId = 'id' in req;
  if (req.method === '$/cancelRequest') {
    const t = conn.inflight.get(req.params?.id);
    if (t) t.ac.abort(new RpcError(-32800, 'cancelled'));
    return;
  }
  const send = (m) => { if (hasId) reply(m); };
  if (req.method === '$/ping') {
    send({ jsonrpc: '2.0', id: req.id, result: {} });
    return;
  }
  if (req.method === 'rpc.discover') {
    send({ jsonrpc: '2.0', id: req.id, result: { methods: Object.entries(registry).map(([name, d]) => ({ name, kind: d.kind })) } });
    return;
  }
  const def = registry[req.method];
  if (!def) {
    send({ jsonrpc: '2.0', id: req.id, error: { code: -32601, message: `method not found: ${req.method}`, data: { method: req.method } } });
    return;
  }
  if (hasId && conn.inflight.has(req.id)) {
    reply({ jsonrpc: '2.0', id: req.id, error: { code: -32600, message: 'duplicate id' } });
    return;
  }
  if (conn.inflight.size >= MAX_INFLIGHT) {
    finished.refused++;
    send({ jsonrpc: '2.0', id: req.id, error: { code: -32001, message: 'overloaded', data: { retryAfterMs: 100, reason: 'connection_inflight' } } });
    return;
  }
  const { _meta: meta, ...params } = req.params ?? {};
  const ac = new AbortController();
  const t = {
    id: nextTaskId++, conn, requestId: hasId ? req.id : null, method: req.method, kind: def.kind,
    state: 'running', started: Date.now(), cpuMs: 0, progress: null, ac,
  };
  if (def.kind === 'io') t.state = 'waiting';
  tasks.set(t.id, t);
  const key = hasId ? req.id : Symbol('notification');
  conn.inflight.set(key, t);
  let timer;
  if (meta?.timeoutMs > 0) timer = setTimeout(() => ac.abort(new RpcError(-32002, 'deadline exceeded', { timeoutMs: meta.timeoutMs })), meta.timeoutMs);
  const progress = (value) => {
    t.progress = value;
    if (meta?.progressToken !== undefined && hasId) {
      conn.send({ jsonrpc: '2.0', method: '$/progress', params: { token: meta.progressToken, value } });
    }
  };
  const abortP = new Promise((_, reject) => ac.signal.addEventListener('abort', () => reject(ac.signal.reason), { once: true }));
  Promise.race([Promise.resolve().then(() => def.run(params, t, ac.signal, progress)), abortP]).then(
    (result) => { finished.ok++; send({ jsonrpc: '2.0', id: req.id, result }); },
    (err) => {
      const code = err instanceof RpcError ? err.code : -32603;
      const kind = { [-32003]: 'crashed', [-32800]: 'cancelled', [-32002]: 'timeout', [-32004]: 'killed' }[code] ?? 'error';
      finished[kind]++;
      const error = { code, message: err.message };
      if (err.data !== undefined) error.data = err.data;
      send({ jsonrpc: '2.0', id: req.id, error });
    },
  ).finally(() => {
    clearTimeout(timer);
    tasks.delete(t.id);
    conn.inflight.delete(key);
    ac.abort(new RpcError(-32800, 'done'));
  });
}

function onFrame(conn, data, isBinary) {
  if (isBinary) { conn.send({ jsonrpc: '2.0', id: null, error: { code: -32600, message: 'binary frame' } }); return; }
  let msg;
  try { msg = JSON.parse(data.toString()); } catch {
    conn.send({ jsonrpc: '2.0', id: null, error: { code: -32700, message: 'parse error' } });
    return;
  }
  if (Array.isArray(msg)) {
    if (msg.length === 0) { conn.send({ jsonrpc: '2.0', id: null, error: { code: -32600, message: 'empty batch' } }); return; }
    const out = [];
    let left = msg.length;
    const done = () => { if (--left === 0 && out.length) conn.send(out); };
    for (const req of msg) {
      const hasId = req && typeof req === 'object' && 'id' in req;
      let replied = false;
      runRequest(conn, req, (m) => { replied = true; out.push(m); done(); });
      if (!hasId && !replied) done();
    }
    return;
  }
  runRequest(conn, msg, (m) => conn.send(m));
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

const TYPES = { '.html': 'text/html; charset=utf-8', '.js': 'text/javascript; charset=utf-8', '.css': 'text/css; charset=utf-8' };
const sse = new Set();

const server = http.createServer((req, res) => {
  const u = new URL(req.url, 'http://x');
  const p = u.pathname;
  let m;
  if (p === '/admin/stats') return json(res, 200, stats());
  if (p === '/admin/tasks') {
    let list = [...tasks.values()].map(taskInfo);
    const q = u.searchParams;
    if (q.get('conn')) list = list.filter((t) => String(t.conn) === q.get('conn'));
    if (q.get('state')) list = list.filter((t) => t.state === q.get('state'));
    if (q.get('method')) list = list.filter((t) => t.method === q.get('method'));
    list.sort(q.get('sort') === 'age' ? (a, b) => b.ageMs - a.ageMs : (a, b) => b.cpuMs - a.cpuMs);
    if (q.get('limit')) list = list.slice(0, Number(q.get('limit')));
    return json(res, 200, { tasks: list });
  }
  if ((m = p.match(/^\/admin\/tasks\/(\d+)$/))) {
    const t = tasks.get(Number(m[1]));
    return t ? json(res, 200, taskInfo(t)) : json(res, 404, { error: 'no such task' });
  }
  if ((m = p.match(/^\/admin\/tasks\/(\d+)\/kill$/)) && req.method === 'POST') {
    const t = tasks.get(Number(m[1]));
    if (!t) return json(res, 404, { error: 'no such task' });
    t.ac.abort(new RpcError(-32004, 'killed by an operator'));
    return json(res, 200, { killed: true });
  }
  if (p === '/admin/connections') {
    return json(res, 200, {
      connections: [...conns.values()].map((c) => ({
        id: c.id, peer: c.peer, openedAtMs: c.opened, ageMs: Date.now() - c.opened, inflight: c.inflight.size, bytesIn: 0, bytesOut: 0,
      })),
    });
  }
  if ((m = p.match(/^\/admin\/connections\/(\d+)\/close$/)) && req.method === 'POST') {
    const c = conns.get(Number(m[1]));
    if (!c) return json(res, 404, { error: 'no such connection' });
    c.ws.close(1000, 'closed by operator');
    return json(res, 200, { closed: true });
  }
  if (p === '/admin/events') {
    res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
    res.write(': hello\n\n');
    sse.add(res);
    req.on('close', () => sse.delete(res));
    return;
  }
  const name = p === '/' ? 'index.html' : p.slice(1);
  if (/^[\w.-]+\.(js|css|html)$/.test(name)) {
    const file = path.join(WEB, name);
    if (fs.existsSync(file)) {
      res.writeHead(200, { 'content-type': TYPES[path.extname(name)] });
      res.end(fs.readFileSync(file));
      return;
    }
  }
  res.writeHead(404);
  res.end('not found');
});

setInterval(() => {
  if (sse.size === 0) return;
  const list = [...tasks.values()].map(taskInfo).sort((a, b) => b.cpuMs - a.cpuMs).slice(0, 500);
  const data = JSON.stringify({ stats: stats(), tasks: list });
  for (const res of sse) res.write(`event: snapshot\ndata: ${data}\n\n`);
}, 250).unref();

const wss = new WebSocketServer({
  noServer: true,
  handleProtocols: (protocols) => (protocols.has('taskwire.v1') ? 'taskwire.v1' : false),
});
server.on('upgrade', (req, socket, head) => {
  if (new URL(req.url, 'http://x').pathname !== '/ws') { socket.destroy(); return; }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const conn = {
      id: nextConnId++, ws, inflight: new Map(), opened: Date.now(), peer: `${req.socket.remoteAddress}:${req.socket.remotePort}`,
      send: (m) => { if (ws.readyState === 1) ws.send(JSON.stringify(m)); },
    };
    conns.set(conn.id, conn);
    ws.on('message', (data, isBinary) => onFrame(conn, data, isBinary));
    ws.on('close', () => {
      conns.delete(conn.id);
      for (const t of conn.inflight.values()) t.ac.abort(new RpcError(-32800, 'connection closed'));
    });
  });
});

server.listen(Number(port), host, () => {
  process.stdout.write(`listening on ${host}:${server.address().port}\n`);
});

process.on('SIGTERM', () => {
  for (const c of conns.values()) c.ws.close(1001, 'server shutting down');
  for (const res of sse) res.end();
  server.close();
  setTimeout(() => process.exit(0), 100).unref();
});
