// node --test tests of web/taskwire.js against a real taskwire server.
// Each test file starts its own server on 127.0.0.1:0 and stops it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer, eventually, delay } from '../testing/server.mjs';

let srv;
const clients = [];

async function connect(opts = {}) {
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, ...opts });
  clients.push(tw);
  return tw;
}

async function rejectsWith(promise, code) {
  const err = await promise.then(
    (v) => assert.fail(`expected error ${code}, got result ${JSON.stringify(v)}`),
    (e) => e,
  );
  assert.ok(err instanceof TaskwireError, `expected TaskwireError, got ${err}`);
  assert.equal(err.code, code, `expected code ${code}, got ${err.code}: ${err.message}`);
  return err;
}

before(async () => { srv = await startServer(); });
after(async () => {
  for (const tw of clients) tw.close();
  await srv?.stop();
});

test('call echo resolves with the value over subprotocol taskwire.v1', { timeout: 10_000 }, async () => {
  const tw = await connect();
  assert.equal(tw.state, 'open');
  assert.equal(tw.protocol, 'taskwire.v1');
  assert.deepEqual(await tw.call('echo', { value: { a: [1, 'two', null] } }), { a: [1, 'two', null] });
  assert.deepEqual(await tw.call('hash_chain', { seed: 1, rounds: 1 }), { digest: '10451216379200822465' });
  assert.deepEqual(await tw.call('hash_chain', { seed: 42, rounds: 10 }), { digest: '8123981347576678140' });
  assert.deepEqual(await tw.call('count_primes', { below: 1000 }), { count: 168 });
  assert.deepEqual(await tw.call('spin', { ms: 20 }), { spunMs: 20 });
});

test('results come back in completion order: sleep 300 then echo, echo first', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const order = [];
  const slow = tw.call('sleep', { ms: 300 }).then((r) => { order.push('sleep'); return r; });
  const fast = tw.call('echo', { value: 'fast' }).then((r) => { order.push('echo'); return r; });
  assert.equal(await fast, 'fast');
  assert.deepEqual(order, ['echo']);
  assert.equal(tw.inflight, 1);
  assert.deepEqual(await slow, { sleptMs: 300 });
  assert.deepEqual(order, ['echo', 'sleep']);
});

test('progress notifications reach onProgress, then abort answers -32800', { timeout: 20_000 }, async () => {
  const tw = await connect();
  const ac = new AbortController();
  const seen = [];
  const p = tw.call('count_primes', { below: 10_000_000_000 }, {
    signal: ac.signal,
    onProgress: (v) => { seen.push(v); if (seen.length === 2) ac.abort(); },
  });
  const err = await rejectsWith(p, ErrorCode.CANCELLED);
  assert.ok(!err.data?.local, 'the -32800 came from the server');
  assert.ok(seen.length >= 2);
  for (const v of seen) {
    assert.equal(v.total, 10_000_000_000);
    assert.ok(Number.isFinite(v.done) && v.done >= 0 && v.done <= v.total);
  }
  // The connection is still fine.
  assert.equal(await tw.call('echo', { value: 1 }), 1);
});

test('progress on a call that completes, and no progress without onProgress', { timeout: 30_000 }, async () => {
  const tw = await connect();
  const seen = [];
  const r = await tw.call('count_primes', { below: 5_000_000 }, { onProgress: (v) => seen.push(v) });
  assert.deepEqual(r, { count: 348513 });
  for (const v of seen) assert.equal(v.total, 5_000_000);
  let notified = 0;
  tw.addEventListener('notification', () => notified++);
  assert.deepEqual(await tw.call('count_primes', { below: 100_000 }), { count: 9592 });
  assert.equal(notified, 0);
});

test('AbortSignal sends $/cancelRequest; the promise rejects with the server -32800', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const ac = new AbortController();
  const p = tw.call('runaway', {}, { signal: ac.signal });
  await delay(200);
  ac.abort();
  await rejectsWith(p, ErrorCode.CANCELLED);
  // Abort of an I/O task too.
  const ac2 = new AbortController();
  const p2 = tw.call('sleep', { ms: 60_000 }, { signal: ac2.signal });
  setTimeout(() => ac2.abort(), 50);
  await rejectsWith(p2, ErrorCode.CANCELLED);
  assert.equal(tw.inflight, 0);
});

test('an already-aborted signal rejects locally, nothing is sent', { timeout: 5_000 }, async () => {
  const tw = await connect();
  const err = await rejectsWith(tw.call('runaway', {}, { signal: AbortSignal.abort() }), ErrorCode.CANCELLED);
  assert.equal(err.data?.local, true);
  assert.equal(tw.inflight, 0);
});

test('abort after the result arrived changes nothing', { timeout: 5_000 }, async () => {
  const tw = await connect();
  const ac = new AbortController();
  assert.equal(await tw.call('echo', { value: 'x' }, { signal: ac.signal }), 'x');
  ac.abort();
  assert.equal(await tw.call('echo', { value: 'y' }), 'y');
});

test('timeoutMs becomes params._meta.timeoutMs: a runaway ends with -32002', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const err = await rejectsWith(tw.call('runaway', {}, { timeoutMs: 300 }), ErrorCode.DEADLINE_EXCEEDED);
  if (err.data && 'timeoutMs' in err.data) assert.equal(err.data.timeoutMs, 300);
  await rejectsWith(tw.call('sleep', { ms: 60_000 }, { timeoutMs: 100 }), ErrorCode.DEADLINE_EXCEEDED);
  // A call that ends in time is unaffected.
  assert.deepEqual(await tw.call('sleep', { ms: 10 }, { timeoutMs: 5_000 }), { sleptMs: 10 });
});

test('errors carry their codes: -32601, -32602, -32003; the connection survives', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const nf = await rejectsWith(tw.call('no_such_task', {}), ErrorCode.METHOD_NOT_FOUND);
  assert.equal(nf.data?.method, 'no_such_task');
  assert.equal(nf.codeName, 'METHOD_NOT_FOUND');
  const ip = await rejectsWith(tw.call('spin', {}), ErrorCode.INVALID_PARAMS);
  assert.match(ip.message, /ms/);
  await rejectsWith(tw.call('sleep', { ms: 'soon' }), ErrorCode.INVALID_PARAMS);
  const crash = await rejectsWith(tw.call('crash', { message: 'boom 42' }), ErrorCode.CRASHED);
  assert.match(crash.message, /boom 42/);
  // Siblings and the connection live on.
  const sibling = tw.call('sleep', { ms: 100 });
  await rejectsWith(tw.call('crash', { message: 'again' }), ErrorCode.CRASHED);
  assert.deepEqual(await sibling, { sleptMs: 100 });
  assert.equal(await tw.call('echo', { value: 'alive' }), 'alive');
});

test('an operator kill through the admin API answers -32004', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const p = tw.call('runaway', {});
  const task = await eventually(async () => {
    const r = await fetch(`${srv.httpUrl}/admin/tasks?method=runaway`);
    const { tasks } = await r.json();
    return tasks.find((t) => t.method === 'runaway' && t.requestId !== null);
  }, { message: 'the runaway in /admin/tasks' });
  const res = await fetch(`${srv.httpUrl}/admin/tasks/${task.id}/kill`, { method: 'POST' });
  assert.equal(res.status, 200);
  await rejectsWith(p, ErrorCode.KILLED);
});

test('batch: one frame, one outcome per item in order; notify gets no answer', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const out = await tw.batch([
    { method: 'sleep', params: { ms: 100 } },
    { method: 'echo', params: { value: 'b' } },
    { method: 'nope' },
    { method: 'echo', params: { value: 'ignored' }, notification: true },
  ]);
  assert.equal(out.length, 4);
  assert.deepEqual(out[0], { ok: true, result: { sleptMs: 100 } });
  assert.deepEqual(out[1], { ok: true, result: 'b' });
  assert.equal(out[2].ok, false);
  assert.equal(out[2].error.code, ErrorCode.METHOD_NOT_FOUND);
  assert.deepEqual(out[3], { ok: true, result: undefined });

  const errors = [];
  tw.addEventListener('error', (e) => errors.push(e.detail));
  tw.notify('echo', { value: 'nobody hears' });
  assert.equal(await tw.call('echo', { value: 'after notify' }), 'after notify');
  await delay(100);
  assert.deepEqual(errors, []);
});

test('many calls in flight at once all settle', { timeout: 20_000 }, async () => {
  const tw = await connect();
  const n = 200;
  const results = await Promise.all(Array.from({ length: n }, (_, i) => tw.call('echo', { value: i })));
  assert.deepEqual(results, Array.from({ length: n }, (_, i) => i));
});

test('close() rejects in-flight calls at once and refuses new ones', { timeout: 10_000 }, async () => {
  const tw = await connect();
  const p = tw.call('sleep', { ms: 60_000 });
  await delay(50);
  tw.close();
  assert.equal(tw.state, 'closed');
  await rejectsWith(p, ErrorCode.CONNECTION_LOST);
  await rejectsWith(tw.call('echo', { value: 1 }), ErrorCode.NOT_CONNECTED);
  assert.throws(() => tw.notify('echo', {}), (e) => e.code === ErrorCode.NOT_CONNECTED);
});

test('connect() to a closed port rejects with NOT_CONNECTED', { timeout: 10_000 }, async () => {
  const other = await startServer();
  const url = other.wsUrl;
  await other.stop();
  const err = await Taskwire.connect(url, { WebSocket }).then(() => assert.fail('connected'), (e) => e);
  assert.ok(err instanceof TaskwireError);
  assert.equal(err.code, ErrorCode.NOT_CONNECTED);
});

test('token goes into the query string; http(s) URLs become ws(s)', () => {
  class FakeWS extends EventTarget {
    constructor(url, protocols) { super(); FakeWS.last = { url, protocols }; this.readyState = 0; }
    close() {}
  }
  const tw = new Taskwire('http://127.0.0.1:1/ws', { WebSocket: FakeWS, token: 'sécret&x', connectTimeoutMs: 60_000 });
  assert.equal(FakeWS.last.url, 'ws://127.0.0.1:1/ws?token=s%C3%A9cret%26x');
  assert.deepEqual(FakeWS.last.protocols, ['taskwire.v1']);
  tw.close();
});
