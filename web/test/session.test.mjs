// Sessions: connections cut while 100 tasks of mixed length run (by a TCP proxy
// in the test that drops the connection, and from the server side through the
// admin API); every call settles exactly once with its task's real result.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer, eventually, delay } from '../testing/server.mjs';

/** A TCP proxy to the server that the test can cut (a reset, no close frame) and hold shut. */
async function startProxy(target) {
  const sockets = new Set();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) { client.resetAndDestroy(); return; }
    const upstream = net.connect(target, '127.0.0.1');
    sockets.add(client); sockets.add(upstream);
    const gone = () => { sockets.delete(client); sockets.delete(upstream); client.destroy(); upstream.destroy(); };
    client.on('error', gone); upstream.on('error', gone);
    client.on('close', gone); upstream.on('close', gone);
    client.pipe(upstream); upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  const port = server.address().port;
  return {
    wsUrl: `ws://127.0.0.1:${port}/ws`,
    /** Drops every connection with a reset; `holdMs`: refuse new ones that long. */
    cut(holdMs = 0) {
      for (const s of sockets) s.resetAndDestroy();
      sockets.clear();
      if (holdMs > 0) { refusing = true; setTimeout(() => { refusing = false; }, holdMs); }
    },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  };
}

// The protocol's hash_chain, to check results: splitmix64 `rounds` times.
function hashChain(seed, rounds) {
  const M = (1n << 64n) - 1n;
  let x = BigInt(seed);
  for (let i = 0; i < rounds; i++) {
    let z = (x + 0x9E3779B97F4A7C15n) & M;
    z = ((z ^ (z >> 30n)) * 0xBF58476D1CE4E5B9n) & M;
    z = ((z ^ (z >> 27n)) * 0x94D049BB133111EBn) & M;
    x = z ^ (z >> 31n);
  }
  return x.toString();
}

/** 100 calls of mixed length, each with the result it must settle with. */
function mixedCalls(tw, progress) {
  const calls = [];
  for (let i = 0; i < 100; i++) {
    switch (i % 4) {
      case 0: calls.push({ p: tw.call('echo', { value: { i } }), want: { i } }); break;
      case 1: {
        const ms = 50 + ((i * 37) % 2000);
        calls.push({ p: tw.call('sleep', { ms }), want: { sleptMs: ms } });
        break;
      }
      case 2: {
        const rounds = 1000 + i * 20_000;
        calls.push({ p: tw.call('hash_chain', { seed: i, rounds }), want: { digest: hashChain(i, rounds) } });
        break;
      }
      default: {
        calls.push({
          p: tw.call('count_primes', { below: 2_000_000 }, { onProgress: () => { progress.n += 1; } }),
          want: { count: 148933 },
        });
      }
    }
  }
  return calls;
}

function watch(tw) {
  const seen = { replayed: 0, errors: [], sessions: [] };
  tw.addEventListener('replayed', () => { seen.replayed += 1; });
  tw.addEventListener('error', (e) => seen.errors.push(e.detail));
  tw.addEventListener('session', (e) => seen.sessions.push(e.detail));
  return seen;
}

async function checkAll(calls) {
  const outcomes = await Promise.all(calls.map(({ p }) => p.then((v) => ({ v }), (e) => ({ e }))));
  outcomes.forEach((o, i) => {
    assert.equal(o.e, undefined, `call ${i} failed: ${o.e?.code} ${o.e?.message}`);
    assert.deepEqual(o.v, calls[i].want, `call ${i}`);
  });
}

async function admin(httpUrl, method, path) {
  const r = await fetch(`${httpUrl}${path}`, { method });
  assert.equal(r.status, 200, `${method} ${path}`);
  return r.json();
}

test('a proxy drops the TCP connection twice while 100 tasks run: every call settles once, with its result', { timeout: 120_000 }, async (t) => {
  const srv = await startServer();
  t.after(() => srv.stop());
  const proxy = await startProxy(srv.port);
  t.after(() => proxy.close());
  const tw = await Taskwire.connect(proxy.wsUrl, {
    WebSocket, session: true, heartbeatMs: 0, reconnect: { initialDelayMs: 50, maxDelayMs: 300 },
  });
  t.after(() => tw.close());
  const seen = watch(tw);
  await eventually(() => tw.session !== null, { message: 'session open' });
  const progress = { n: 0 };
  const calls = mixedCalls(tw, progress);
  await delay(300);
  proxy.cut();
  await delay(500);
  proxy.cut(400); // and once more, staying down a while
  await checkAll(calls);
  assert.equal(seen.replayed, 0, 'no answer came twice');
  assert.deepEqual(seen.errors, []);
  assert.ok(seen.sessions.filter((s) => s.state === 'resumed').length >= 2, JSON.stringify(seen.sessions));
  assert.equal(tw.inflight, 0);
  // The session is still usable, and the server keeps nothing unacknowledged for long.
  assert.deepEqual(await tw.call('echo', { value: 1 }), 1);
  await eventually(async () => {
    const v = await admin(srv.httpUrl, 'GET', '/admin/sessions');
    return v.sessions.length === 1 && v.sessions[0].bufferedResponses === 0;
  }, { message: 'the buffer acknowledged' });
});

test('the server cuts the connection (operator close) while 100 tasks run: every call settles once', { timeout: 120_000 }, async (t) => {
  const srv = await startServer();
  t.after(() => srv.stop());
  const tw = await Taskwire.connect(srv.wsUrl, {
    WebSocket, session: true, heartbeatMs: 0, reconnect: { initialDelayMs: 50, maxDelayMs: 300 },
  });
  t.after(() => tw.close());
  const seen = watch(tw);
  await eventually(() => tw.session !== null, { message: 'session open' });
  const calls = mixedCalls(tw, { n: 0 });
  for (const at of [200, 700]) {
    await delay(at === 200 ? 200 : 500);
    const { connections } = await admin(srv.httpUrl, 'GET', '/admin/connections');
    for (const c of connections) await admin(srv.httpUrl, 'POST', `/admin/connections/${c.id}/close`);
  }
  await checkAll(calls);
  assert.equal(seen.replayed, 0);
  assert.ok(seen.sessions.some((s) => s.state === 'resumed'), JSON.stringify(seen.sessions));
  // Closing with 1000 ends the session on the server.
  tw.close();
  await eventually(async () => (await admin(srv.httpUrl, 'GET', '/admin/sessions')).sessions.length === 0,
    { message: 'the session ended' });
});

test('beyond the window: pending calls reject with a clear "outcome unknown", and a new session opens', { timeout: 60_000 }, async (t) => {
  const srv = await startServer({ extraArgs: ['--session-window-ms', '200'] });
  t.after(() => srv.stop());
  const proxy = await startProxy(srv.port);
  t.after(() => proxy.close());
  const tw = await Taskwire.connect(proxy.wsUrl, {
    WebSocket, session: true, heartbeatMs: 0, reconnect: { initialDelayMs: 50, maxDelayMs: 100 },
  });
  t.after(() => tw.close());
  const seen = watch(tw);
  await eventually(() => tw.session !== null, { message: 'session open' });
  const first = tw.session;
  const pending = tw.call('sleep', { ms: 5_000 }).then((v) => ({ v }), (e) => ({ e }));
  await delay(100);
  proxy.cut(1_000);
  const { e } = await pending;
  assert.ok(e instanceof TaskwireError);
  assert.equal(e.code, ErrorCode.NO_SUCH_SESSION);
  assert.match(e.message, /outcome of this call is unknown/);
  assert.ok(seen.sessions.some((s) => s.state === 'expired'));
  await eventually(() => tw.session !== null && tw.session !== first, { message: 'a new session' });
  assert.equal(await tw.call('echo', { value: 'again' }), 'again');
});

test('persisted: a "reload" resumes, ids stay unique, and answers with no waiting call go to an event', { timeout: 60_000 }, async (t) => {
  const srv = await startServer();
  t.after(() => srv.stop());
  const store = new Map();
  const storage = { getItem: (k) => store.get(k) ?? null, setItem: (k, v) => store.set(k, v), removeItem: (k) => store.delete(k) };
  const opts = { WebSocket, session: { persist: true, storage }, heartbeatMs: 0, reconnect: { initialDelayMs: 50 } };
  const page1 = await Taskwire.connect(srv.wsUrl, opts);
  await eventually(() => page1.session !== null, { message: 'session open' });
  const lost = page1.call('sleep', { ms: 300 }).catch(() => {});
  await delay(50);
  // The page goes away: no close 1000, so the session detaches.
  page1.close(4000, 'reload');
  await lost;
  assert.equal(store.size, 1);
  const page2 = new Taskwire(srv.wsUrl, opts);
  t.after(() => page2.close());
  const replayed = [];
  page2.addEventListener('replayed', (e) => replayed.push(e.detail.response));
  await eventually(() => replayed.length === 1, { message: 'the kept answer' });
  assert.deepEqual(replayed[0].result, { sleptMs: 300 });
  assert.ok(page2._nextId > replayed[0].id, 'ids continue past the old page');
  assert.equal(await page2.call('echo', { value: 2 }), 2);
  page2.close();
  assert.equal(store.size, 0, 'a close 1000 forgets the session');
});
