// The dashboard's cluster card, in Chromium, against a real cluster: a
// nats-server (Debian's, /usr/sbin/nats-server) on a free port of 127.0.0.1
// and two `taskwire serve --nats ... --demo --workers 1` nodes, A and B. The
// page is A's dashboard. It shows the node and its peer; a task that waits on
// busy A runs on B and is listed there by its node-qualified id; the card's
// kill button on A ends it (the client is answered -32004); with NATS gone
// the card says the node serves alone.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer, eventually } from '../testing/server.mjs';
import { launch, openDashboard, screenshot } from '../testing/browser.mjs';

const NATS = process.env.NATS_SERVER_BIN || '/usr/sbin/nats-server';

let nats;
let a;
let b;
let browser;
const clients = [];

/** A port of 127.0.0.1 free now. */
function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** nats-server on `port`, once it accepts connections. */
async function startNats(port) {
  if (!fs.existsSync(NATS)) throw new Error(`${NATS} is missing: apt-get install -y nats-server`);
  const proc = spawn(NATS, ['-a', '127.0.0.1', '-p', String(port)], { stdio: 'ignore' });
  const exited = new Promise((resolve) => proc.once('exit', resolve));
  await eventually(() => new Promise((resolve) => {
    const c = net.connect(port, '127.0.0.1', () => { c.destroy(); resolve(true); });
    c.once('error', () => resolve(false));
  }), { timeoutMs: 15_000, message: 'nats-server to accept connections' });
  return {
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
      await exited;
    },
  };
}

const node = (name, port) => startServer({
  extraArgs: ['--nats', `nats://127.0.0.1:${port}`, '--node', name, '--workers', '1', '--nice', '0'],
});

async function json(srv, path) {
  const r = await fetch(`${srv.httpUrl}${path}`);
  assert.equal(r.status, 200, path);
  return r.json();
}

before(async () => {
  const port = await freePort();
  nats = await startNats(port);
  [a, b] = await Promise.all([node('A', port), node('B', port)]);
  await eventually(async () => (await json(a, '/admin/cluster')).peers.length === 1
    && (await json(b, '/admin/cluster')).peers.length === 1, { timeoutMs: 20_000, message: 'A and B to see each other' });
  browser = await launch();
});
after(async () => {
  for (const tw of clients) tw.close();
  await browser?.close();
  await Promise.all([a?.stop(), b?.stop()]);
  await nats?.stop();
});

async function client(srv) {
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, reconnect: false });
  clients.push(tw);
  return tw;
}

/** Starts a runaway; its task id on A once listed, and the call's settled outcome. */
async function runaway(tw) {
  const known = new Set((await json(a, '/admin/tasks?method=runaway')).tasks.map((t) => t.id));
  const outcome = tw.call('runaway', {}).then((result) => ({ ok: true, result }), (error) => ({ ok: false, error }));
  const id = await eventually(async () => (await json(a, '/admin/tasks?method=runaway')).tasks
    .map((t) => t.id).find((i) => !known.has(i)), { timeoutMs: 15_000, message: 'the new runaway is listed' });
  return { id, outcome };
}

test('the cluster card shows the node, its peer, a task run on the peer (killed from here) and a lost NATS', { timeout: 120_000 }, async (t) => {
  const { page, errors } = await openDashboard(browser, t, `${a.httpUrl}/`, { width: 1400, height: 1200 });

  // The node, NATS connected, and peer B with its one worker.
  const status = page.locator('[data-testid="cluster-status"]');
  await page.waitForSelector('[data-testid="cluster-status"][data-connected="true"]', { timeout: 15_000 });
  const text = await status.textContent();
  assert.match(text, /node A/);
  assert.match(text, /NATS connected/);
  const peer = page.locator('[data-testid="cluster-peer"][data-node="B"]');
  await peer.waitFor({ timeout: 15_000 });
  assert.match(await peer.textContent(), /B \d+\/1 spare/);

  // A's one worker is taken (and seen running there) ...
  const tw = await client(a);
  const home = await runaway(tw);
  await eventually(async () => {
    const c = await json(a, '/admin/cluster');
    const task = (await json(a, '/admin/tasks')).tasks.find((x) => x.id === home.id);
    return task && task.state !== 'queued' && !c.sentTasks.some((s) => s.id === home.id);
  }, { timeoutMs: 20_000, message: 'the first runaway to run on A' });
  // ... so the next one runs on B.
  const away = await runaway(tw);
  const qid = await eventually(async () => (await json(a, '/admin/cluster')).sentTasks
    .find((s) => s.id === away.id)?.remoteId, { timeoutMs: 20_000, message: 'the second runaway to run on B' });
  assert.match(qid, /^B\/\d+$/);
  const onB = `tr[data-testid="cluster-row"][data-qid="${qid}"][data-node="B"]`;
  await page.waitForSelector(onB, { timeout: 15_000 });
  assert.equal(await page.locator(`${onB} td`).nth(2).textContent(), 'runaway');
  // A's own row for it says where it runs.
  await page.waitForSelector(`tr[data-testid="cluster-row"][data-qid="A/${away.id}"][data-runs-on="${qid}"]`, { timeout: 15_000 });
  await screenshot(page, '12-cluster-card');

  // Killed from A's dashboard: the client is answered -32004 and the row goes.
  await page.click(`${onB} button[data-testid="cluster-kill"]`, { timeout: 10_000 });
  const killed = await Promise.race([away.outcome, new Promise((r) => setTimeout(() => r(null), 20_000))]);
  assert.ok(killed, 'the task on B is still running 20 s after the click');
  assert.equal(killed.ok, false);
  assert.ok(killed.error instanceof TaskwireError);
  assert.equal(killed.error.code, ErrorCode.KILLED, killed.error.message);
  await page.waitForSelector(onB, { state: 'detached', timeout: 15_000 });

  // NATS gone: the card says the node serves alone, without its peer.
  await nats.stop();
  await page.waitForSelector('[data-testid="cluster-status"][data-connected="false"]', { timeout: 20_000 });
  assert.match(await status.textContent(), /node A .*serving alone/);
  await page.waitForSelector('[data-testid="cluster-peer"]', { state: 'detached', timeout: 20_000 });
  await screenshot(page, '13-cluster-card-alone');

  tw.close();
  const h = await home.outcome;
  assert.equal(h.ok, false);
  assert.deepEqual(errors, []);
});
