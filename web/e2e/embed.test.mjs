// taskwire mounted in another axum app: the real example binary
// (crates/taskwire/examples/embed_axum.rs) serves its own /hello and taskwire
// under /tasks on 127.0.0.1:0. Node checks the routes and the WebSocket; Chromium
// loads the dashboard from /tasks/ and sees it connect and run a job.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Taskwire } from '../taskwire.js';
import { startEmbedExample } from '../testing/server.mjs';
import { launch, screenshot } from '../testing/browser.mjs';

let srv;
let browser;

before(async () => {
  srv = await startEmbedExample();
  browser = await launch();
});
after(async () => {
  await browser?.close();
  await srv?.stop();
});

test("the app's own route and taskwire's routes side by side", async () => {
  const hello = await fetch(`${srv.httpUrl}/hello`);
  assert.equal(hello.status, 200);
  assert.match(await hello.text(), /hello from the host app/);
  const bare = await fetch(`${srv.httpUrl}/tasks`, { redirect: 'manual' });
  assert.equal(bare.status, 307);
  assert.equal(bare.headers.get('location'), 'tasks/');
  const page = await fetch(srv.tasksUrl);
  assert.equal(page.status, 200);
  assert.equal(page.headers.get('x-frame-options'), 'DENY');
  assert.match(await page.text(), /<title>taskwire/);
  for (const f of ['taskwire.js', 'dashboard.js', 'dashboard.css', 'chart.js', 'healthz', 'metrics', 'admin/stats']) {
    const r = await fetch(`${srv.httpUrl}/tasks/${f}`);
    assert.equal(r.status, 200, f);
    await r.arrayBuffer();
  }
});

test('the WebSocket at /tasks/ws echoes', async () => {
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, reconnect: false });
  try {
    assert.equal(await tw.call('echo', { value: 'mounted' }), 'mounted');
  } finally {
    tw.close();
  }
});

test('the dashboard under /tasks/ connects and runs a job', { timeout: 90_000 }, async (t) => {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  // Every request the page makes stays under /tasks/ (or is the page's own data: icon).
  const outside = [];
  page.on('request', (req) => {
    const u = new URL(req.url());
    if (u.protocol !== 'data:' && !u.pathname.startsWith('/tasks/')) outside.push(req.url());
  });
  const sockets = [];
  page.on('websocket', (ws) => sockets.push(new URL(ws.url()).pathname));
  // The bare prefix redirects to the page.
  await page.goto(`${srv.httpUrl}/tasks`, { waitUntil: 'load', timeout: 15_000 });
  assert.equal(new URL(page.url()).pathname, '/tasks/');
  await page.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });
  await page.waitForSelector('#conn-state[data-state="open"]', { timeout: 15_000 });
  await page.waitForSelector('#admin-state[data-state="open"]', { timeout: 15_000 });
  await page.fill('#n-jobs', '2');
  await page.click('[data-testid="start-echo"]');
  await page.waitForSelector('li[data-testid="log-entry"]:has-text("2× echo: 2 ok")', { timeout: 30_000 });
  // taskwire.js without a URL finds the WebSocket beside itself, under the prefix.
  const echoed = await page.evaluate(async () => {
    const { Taskwire } = await import('./taskwire.js');
    const tw = await Taskwire.connect(undefined, { reconnect: false });
    try { return await tw.call('echo', { value: 'default url' }); } finally { tw.close(); }
  });
  assert.equal(echoed, 'default url');
  // The admin stream reaches the page through the prefix too.
  await page.waitForFunction(() => Number(document.querySelector('#connections')?.textContent) >= 3, null,
    { timeout: 15_000 });
  await screenshot(page, '20-embedded-dashboard');
  assert.ok(sockets.length >= 3, `the page's WebSockets: ${sockets}`);
  assert.deepEqual([...new Set(sockets)], ['/tasks/ws']);
  assert.deepEqual(outside.filter((u) => !u.endsWith('/tasks')), [], 'requests outside /tasks/');
  assert.deepEqual(errors, []);
});
