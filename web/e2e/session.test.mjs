// Sessions in Chromium: the dashboard's actions connection opens a session.
// Its connection is cut by a TCP proxy the test controls (Playwright's
// setOffline does not cut open WebSockets) while tasks with progress run:
// back within the window, the tasks' results appear and the page says
// "resumed"; away beyond it, a clear "session expired".
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { startServer, eventually, delay } from '../testing/server.mjs';
import { launch, screenshot } from '../testing/browser.mjs';

const WINDOW_MS = 1500;
let srv;
let browser;

before(async () => {
  srv = await startServer({ extraArgs: ['--session-window-ms', String(WINDOW_MS)] });
  browser = await launch();
});
after(async () => {
  await browser?.close();
  await srv?.stop();
});

/** A TCP proxy to the server (the page, its WebSockets and its admin stream
 *  all go through it): `cut(holdMs)` resets every connection and refuses new
 *  ones for a while. */
async function startProxy(target) {
  const sockets = new Set();
  let refusingUntil = 0;
  const server = net.createServer((client) => {
    if (Date.now() < refusingUntil) { client.resetAndDestroy(); return; }
    const upstream = net.connect(target, '127.0.0.1');
    sockets.add(client); sockets.add(upstream);
    const gone = () => { sockets.delete(client); sockets.delete(upstream); client.destroy(); upstream.destroy(); };
    client.on('error', gone); upstream.on('error', gone);
    client.on('close', gone); upstream.on('close', gone);
    client.pipe(upstream); upstream.pipe(client);
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    url: `http://127.0.0.1:${server.address().port}/`,
    cut(holdMs) {
      refusingUntil = Date.now() + holdMs;
      for (const s of sockets) s.resetAndDestroy();
      sockets.clear();
    },
    close() { for (const s of sockets) s.destroy(); server.close(); },
  };
}

async function openDashboard(t, url) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  t.after(() => context.close());
  await page.goto(url, { waitUntil: 'load', timeout: 15_000 });
  await page.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });
  await page.waitForSelector('#session-state[data-state="open"]', { timeout: 15_000 });
  return { page, errors };
}

const logText = (page) => page.$eval('#log', (el) => el.textContent);

test('cut during tasks with progress, back within the window: the results appear, "resumed"', { timeout: 90_000 }, async (t) => {
  const proxy = await startProxy(srv.port);
  t.after(() => proxy.close());
  const { page, errors } = await openDashboard(t, proxy.url);
  await page.fill('#n-jobs', '3');
  // count_primes reports progress; sleep takes 2 s.
  await page.click('button[data-kind="count_primes"]');
  await page.click('button[data-kind="sleep"]');
  await eventually(async () => (await logText(page)).includes('started 3× sleep'), { message: 'started' });
  await delay(300);
  proxy.cut(WINDOW_MS / 3);
  await page.waitForSelector('#session-state[data-state="reconnecting"]', { timeout: 10_000 });
  await page.waitForSelector('#session-state[data-state="resumed"]', { timeout: 20_000 });
  // The sleeps finish after the resume: all three answered with their result.
  await eventually(async () => (await logText(page)).includes('3× sleep: 3 ok'),
    { timeoutMs: 20_000, message: 'the sleeps\' results' });
  assert.match(await logText(page), /actions session resumed/);
  await screenshot(page, 'session-resumed');
  assert.deepEqual(errors, []);
});

test('away beyond the window: a clear "session expired"', { timeout: 90_000 }, async (t) => {
  const proxy = await startProxy(srv.port);
  t.after(() => proxy.close());
  const { page, errors } = await openDashboard(t, proxy.url);
  await page.fill('#n-jobs', '2');
  await page.click('button[data-kind="sleep"]');
  await eventually(async () => (await logText(page)).includes('started 2× sleep'), { message: 'started' });
  await delay(200);
  proxy.cut(WINDOW_MS * 3);
  await page.waitForSelector('#session-state[data-state="expired"]', { timeout: 30_000 });
  assert.equal(await page.textContent('#session-state'), 'actions: session expired');
  await eventually(async () => (await logText(page)).includes('outcome of the tasks started before the drop is unknown'),
    { message: 'the expired message' });
  await screenshot(page, 'session-expired');
  assert.deepEqual(errors, []);
});
