// The client's heartbeat: `$/ping` every heartbeatMs; any answer (an error too)
// proves the connection alive; silence for a whole period closes and reconnects.
//
// The first test runs against the real server. The others need peers the real
// server cannot play (one that answers only `$/ping`, one that answers every
// request -32601, one that answers nothing), so they use a few lines of `ws`
// server on 127.0.0.1:0.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket, { WebSocketServer } from 'ws';
import { Taskwire } from '../taskwire.js';
import { startServer, eventually } from '../testing/server.mjs';

// Generous for a shared 2-core machine running a debug server: a ping answered
// later than this would be taken for a dead connection.
const HEARTBEAT_MS = 300;
const PERIODS = 6;

let srv;
const clients = [];
const peers = [];

before(async () => { srv = await startServer(); });
after(async () => {
  for (const tw of clients) tw.close();
  for (const p of peers) await p.close();
  await srv?.stop();
});

/** A WebSocket that records every frame the client sends and receives. */
function recordingWebSocket() {
  const sent = [];
  const received = [];
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      this.addEventListener('message', (ev) => received.push(JSON.parse(String(ev.data))));
    }
    send(data) {
      sent.push(JSON.parse(String(data)));
      return super.send(data);
    }
  }
  return { Recording, sent, received };
}

/** Connects with a short heartbeat and records the connection's life. */
async function watchedClient(url) {
  const rec = recordingWebSocket();
  const life = { closes: [], reconnects: 0 };
  const tw = await Taskwire.connect(url, {
    WebSocket: rec.Recording, heartbeatMs: HEARTBEAT_MS, reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  clients.push(tw);
  tw.addEventListener('close', (e) => life.closes.push(e.detail.code));
  tw.addEventListener('reconnecting', () => { life.reconnects += 1; });
  const errors = [];
  tw.addEventListener('error', (e) => errors.push(e.detail));
  const pings = () => rec.sent.filter((m) => m.method === '$/ping');
  return { tw, rec, life, errors, pings };
}

/** A `ws` server on 127.0.0.1:0; `answer(msg)` returns the reply object or undefined for silence. */
async function peer(answer) {
  const wss = new WebSocketServer({ host: '127.0.0.1', port: 0, handleProtocols: () => 'taskwire.v1' });
  await new Promise((r) => wss.once('listening', r));
  let connections = 0;
  wss.on('connection', (ws) => {
    connections += 1;
    ws.on('message', (data) => {
      let msg;
      try { msg = JSON.parse(String(data)); } catch { return; }
      if (msg.id === undefined) return;
      const reply = answer(msg);
      if (reply !== undefined) ws.send(JSON.stringify({ jsonrpc: '2.0', id: msg.id, ...reply }));
    });
  });
  const p = {
    url: `ws://127.0.0.1:${wss.address().port}/ws`,
    connections: () => connections,
    close: () => new Promise((r) => {
      for (const c of wss.clients) c.terminate();
      wss.close(() => r());
    }),
  };
  peers.push(p);
  return p;
}

const notFound = (msg) => ({ error: { code: -32601, message: `method not found: ${msg.method}`, data: { method: msg.method } } });

test('against the real server: $/ping keeps an idle client connected across several heartbeat periods',
  { timeout: 30_000 }, async () => {
    const { tw, rec, life, errors, pings } = await watchedClient(srv.wsUrl);
    await eventually(() => pings().length >= PERIODS, { timeoutMs: 20_000, message: `${PERIODS} pings` });
    assert.equal(tw.state, 'open');
    assert.deepEqual(life.closes, [], 'never closed');
    assert.equal(life.reconnects, 0, 'never reconnected');
    // The heartbeat is `$/ping` with no params, never a task.
    for (const m of rec.sent) {
      assert.equal(m.method, '$/ping');
      assert.ok(String(m.id).startsWith('$hb'));
      assert.equal(m.params, undefined);
    }
    // Every ping but perhaps the latest was answered: `{}` by a server with `$/ping`,
    // -32601 by one without it. Either proves the connection alive.
    await eventually(() => rec.received.length >= pings().length - 1, { timeoutMs: 5_000, message: 'ping answers' });
    for (const m of rec.received) {
      assert.ok(String(m.id).startsWith('$hb'), `only heartbeat answers: ${JSON.stringify(m)}`);
      assert.ok(m.error ? m.error.code === -32601 : typeof m.result === 'object', JSON.stringify(m));
    }
    assert.deepEqual(errors, [], 'heartbeat answers are swallowed, even errors');
    assert.equal(await tw.call('echo', { value: 'still here' }), 'still here');
  });

test('a server without echo, answering only $/ping, keeps its clients', { timeout: 30_000 }, async () => {
  const p = await peer((msg) => (msg.method === '$/ping' ? { result: {} } : notFound(msg)));
  const { tw, life, errors, pings } = await watchedClient(p.url);
  await eventually(() => pings().length >= PERIODS, { timeoutMs: 20_000, message: `${PERIODS} pings` });
  assert.equal(tw.state, 'open');
  assert.deepEqual(life.closes, []);
  assert.equal(p.connections(), 1);
  assert.deepEqual(errors, []);
  // Its missing echo is the caller's error, not the heartbeat's.
  await assert.rejects(tw.call('echo', { value: 1 }), (e) => e.code === -32601);
});

test('a server that answers $/ping -32601 (older than $/ping) still counts as alive', { timeout: 30_000 }, async () => {
  const p = await peer(notFound);
  const { tw, life, errors, pings } = await watchedClient(p.url);
  await eventually(() => pings().length >= PERIODS, { timeoutMs: 20_000, message: `${PERIODS} pings` });
  assert.equal(tw.state, 'open');
  assert.deepEqual(life.closes, []);
  assert.equal(p.connections(), 1);
  assert.deepEqual(errors, [], 'a -32601 heartbeat answer raises no error event');
});

test('a peer that answers nothing is dropped (4000) and the client reconnects', { timeout: 30_000 }, async () => {
  const p = await peer(() => undefined);
  const { tw, life } = await watchedClient(p.url);
  await eventually(() => life.closes.includes(4000), { timeoutMs: 20_000, message: 'heartbeat timeout close' });
  await eventually(() => p.connections() >= 2, { timeoutMs: 20_000, message: 'a reconnect' });
  assert.ok(life.reconnects >= 1);
  assert.notEqual(tw.state, 'closed');
});
