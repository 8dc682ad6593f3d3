// Connection loss: calls in flight never hang; reconnect after the server restarts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer, eventually, delay } from '../testing/server.mjs';

function record(tw) {
  const events = [];
  for (const type of ['open', 'close', 'reconnecting', 'state']) {
    tw.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  return events;
}

// Attach handlers at once (no unhandled rejection while the test awaits something else).
const outcome = (p) => p.then((v) => ({ v }), (e) => ({ e }));

async function settleWithin(promise, ms) {
  let timer;
  const timeout = new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`promise still pending after ${ms} ms`)), ms); });
  try {
    return await Promise.race([promise, timeout]);
  } finally { clearTimeout(timer); }
}

test('reconnect after the server restarts; in-flight calls reject at once; queued calls go out after', { timeout: 60_000 }, async (t) => {
  let srv = await startServer();
  const port = srv.port;
  t.after(() => srv.stop());
  const tw = await Taskwire.connect(srv.wsUrl, {
    WebSocket, heartbeatMs: 0, reconnect: { initialDelayMs: 50, maxDelayMs: 500 },
  });
  t.after(() => tw.close());
  const events = record(tw);
  assert.equal(await tw.call('echo', { value: 'before' }), 'before');

  const inflight = [tw.call('sleep', { ms: 60_000 }), tw.call('runaway', {}), tw.call('sleep', { ms: 60_000 })].map(outcome);
  await delay(100);
  await srv.stop(); // SIGTERM: graceful shutdown closes the socket (1001) or answers -32005

  for (const p of inflight) {
    const { e } = await settleWithin(p, 5_000);
    assert.ok(e instanceof TaskwireError, `rejected with TaskwireError, got ${e}`);
    assert.ok([ErrorCode.CONNECTION_LOST, ErrorCode.SHUTTING_DOWN].includes(e.code), `code ${e.code}: ${e.message}`);
  }
  await eventually(() => tw.state === 'reconnecting', { message: 'state reconnecting' });
  assert.ok(events.some((e) => e.type === 'close'));
  assert.ok(events.some((e) => e.type === 'reconnecting' && e.attempt >= 1 && e.delayMs >= 0));

  // A call made while reconnecting is queued (bounded) and sent once the server is back.
  const queued = outcome(tw.call('echo', { value: 'queued' }));
  assert.equal(tw.queued, 1);
  await delay(300); // let a few attempts fail
  srv = await startServer({ port });
  const { v, e } = await settleWithin(queued, 15_000);
  assert.equal(e, undefined, `queued call failed: ${e?.message}`);
  assert.equal(v, 'queued');
  assert.equal(tw.state, 'open');
  const reopened = events.filter((e) => e.type === 'open');
  assert.equal(reopened.length, 1);
  assert.equal(reopened[0].reconnected, true);
  assert.equal(await tw.call('echo', { value: 'after' }), 'after');
  // The backoff grew between attempts and stayed capped.
  const attempts = events.filter((e) => e.type === 'reconnecting');
  assert.ok(attempts.length >= 2, `several attempts: ${attempts.length}`);
  for (const a of attempts) assert.ok(a.delayMs <= 500);
});

test('no hanging promise when the server dies hard (SIGKILL)', { timeout: 30_000 }, async (t) => {
  const srv = await startServer();
  t.after(() => srv.stop());
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, reconnect: false });
  t.after(() => tw.close());
  const progressed = [];
  const calls = [
    tw.call('runaway', {}),
    tw.call('sleep', { ms: 60_000 }),
    tw.call('count_primes', { below: 10_000_000_000 }, { onProgress: (v) => progressed.push(v) }),
    tw.batch([{ method: 'sleep', params: { ms: 60_000 } }, { method: 'echo', params: { value: 1 } }]),
  ].map(outcome);
  await delay(200);
  await srv.stop('SIGKILL');
  for (const p of calls.slice(0, 3)) {
    const { e } = await settleWithin(p, 5_000);
    assert.ok(e instanceof TaskwireError);
    assert.equal(e.code, ErrorCode.CONNECTION_LOST);
    assert.match(e.message, /connection lost/);
  }
  const { v: batch } = await settleWithin(calls[3], 5_000);
  assert.equal(batch[0].ok, false);
  assert.equal(batch[0].error.code, ErrorCode.CONNECTION_LOST);
  await eventually(() => tw.state === 'closed', { message: 'closed (reconnect disabled)' });
  assert.equal(tw.inflight, 0);
  const err = await tw.call('echo', { value: 1 }).catch((e) => e);
  assert.equal(err.code, ErrorCode.NOT_CONNECTED);
});

test('queue limit: calls beyond it reject with NOT_CONNECTED while reconnecting', { timeout: 30_000 }, async (t) => {
  const srv = await startServer();
  t.after(() => srv.stop());
  const tw = await Taskwire.connect(srv.wsUrl, {
    WebSocket, heartbeatMs: 0, queueLimit: 2, reconnect: { initialDelayMs: 100, maxDelayMs: 200, maxRetries: 3 },
  });
  t.after(() => tw.close());
  await srv.stop('SIGKILL');
  await eventually(() => tw.state === 'reconnecting', { message: 'reconnecting' });
  const a = outcome(tw.call('echo', { value: 1 }));
  const ac = new AbortController();
  const b = tw.call('echo', { value: 2 }, { signal: ac.signal });
  const c = tw.call('echo', { value: 3 });
  assert.equal((await c.catch((e) => e)).code, ErrorCode.NOT_CONNECTED);
  ac.abort(); // a queued call aborted: rejects locally, leaves the queue
  const eb = await b.catch((e) => e);
  assert.equal(eb.code, ErrorCode.CANCELLED);
  assert.equal(eb.data.local, true);
  assert.equal(tw.queued, 1);
  // Reconnect gives up after maxRetries: the queued call rejects, state is closed.
  const { e } = await settleWithin(a, 10_000);
  assert.equal(e.code, ErrorCode.NOT_CONNECTED);
  await eventually(() => tw.state === 'closed', { message: 'closed after giving up' });
});
