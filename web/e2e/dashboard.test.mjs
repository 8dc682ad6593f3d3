// Browser end-to-end tests: Debian's Chromium (headless) opens the dashboard
// served by a real taskwire server started on 127.0.0.1:0.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, eventually } from '../testing/server.mjs';
import { launch, screenshot } from '../testing/browser.mjs';

let srv;
let browser;

before(async () => {
  srv = await startServer();
  browser = await launch();
});
after(async () => {
  await browser?.close();
  await srv?.stop();
});

/** A fresh page on the dashboard, with page errors collected. */
async function openDashboard(t) {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1000 } });
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('console', (msg) => { if (msg.type() === 'error') errors.push(msg.text()); });
  t.after(() => context.close());
  await page.goto(`${srv.httpUrl}/`, { waitUntil: 'load', timeout: 15_000 });
  await page.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });
  await page.waitForSelector('#conn-state[data-state="open"]', { timeout: 15_000 });
  await page.waitForSelector('#admin-state[data-state="open"]', { timeout: 15_000 });
  return { page, errors };
}

const points = (page, id) => page.$eval(`#${id}`, (c) => Number(c.dataset.points ?? 0));

test('the dashboard loads from the server, connects, and draws live charts', { timeout: 60_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  assert.equal(await page.title(), 'taskwire · live');
  // The latency probe and the admin stream feed their charts.
  await eventually(async () => (await points(page, 'chart-latency')) >= 5, { timeoutMs: 15_000, message: 'latency points' });
  await eventually(async () => (await points(page, 'chart-pool')) >= 3, { timeoutMs: 15_000, message: 'pool points' });
  await eventually(async () => (await points(page, 'chart-tps')) >= 2, { timeoutMs: 15_000, message: 'tps points' });
  const conns = await page.textContent('#connections');
  assert.ok(Number(conns) >= 3, `the page's three connections are counted: ${conns}`);
  await screenshot(page, '01-dashboard');

  // Scales: one spike is clipped and marked, not the scale of everything; a
  // series on the alternative scale is not flattened by (nor flattens) the
  // main one; a long stretch of slow values is the bulk, not a spike.
  const clipped = await page.evaluate(() => {
    const Chart = window.taskwireDashboard.charts.latency.constructor;
    const make = () => {
      const canvas = document.createElement('canvas');
      document.body.append(canvas);
      return new Chart(canvas, {
        series: [{ label: 'a', color: '#2563eb' }, { label: 'b', color: '#dc2626', axis: 'alt' }],
        unit: 'ms', yMaxFloor: 1, alt: { yMaxFloor: 1 },
      });
    };
    const start = performance.now() - 30_000;
    const spiky = make();
    for (let i = 0; i < 100; i++) spiky.push([2 + (i % 3) * 0.1, 5000], start + i * 200);
    spiky.push([270, 5000], start + 100 * 200);
    for (let i = 101; i < 140; i++) spiky.push([2, 5000], start + i * 200);
    spiky.draw();
    const slow = make();
    for (let i = 0; i < 20; i++) slow.push([2, 1], start + i * 200);
    for (let i = 0; i < 12; i++) slow.push([4000, 1], start + 5_000 + i * 2_000);
    slow.draw();
    return [Number(spiky.canvas.dataset.clipped), Number(slow.canvas.dataset.clipped)];
  });
  assert.deepEqual(clipped, [1, 0]);
  assert.deepEqual(errors, []);
});

test('start a runaway, see its CPU time grow in the table, kill it, see it leave', { timeout: 90_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  await page.click('#btn-runaway');
  const row = 'tr[data-testid="task-row"][data-method="runaway"]';
  await page.waitForSelector(row, { timeout: 15_000 });
  const id = await page.$eval(row, (tr) => tr.dataset.taskId);
  const cpu = () => page.$eval(`tr[data-testid="task-row"][data-task-id="${id}"] [data-testid="task-cpu"]`,
    (td) => Number(td.dataset.cpuMs));
  const first = await eventually(async () => { const v = await cpu(); return v > 0 ? v : 0; },
    { timeoutMs: 15_000, message: 'runaway CPU time > 0' });
  await eventually(async () => (await cpu()) > first + 200, { timeoutMs: 20_000, message: 'runaway CPU time growing' });
  // It is at the top of the "top" view too.
  await page.waitForSelector(`tr[data-testid="top-row"][data-task-id="${id}"]`, { timeout: 15_000 });
  await screenshot(page, '02-runaway');

  await page.click(`tr[data-testid="task-row"][data-task-id="${id}"] button[data-testid="task-kill"]`);
  // The row stays in place, marked ended, while the pointer rests on the table; then it goes.
  await page.mouse.move(5, 5);
  await page.waitForSelector(`tr[data-testid="task-row"][data-task-id="${id}"]`, { state: 'detached', timeout: 15_000 });
  // The caller (the page's actions connection) got -32004.
  await page.waitForSelector('li[data-testid="log-entry"][data-code="-32004"]', { timeout: 15_000 });
  const gone = await fetch(`${srv.httpUrl}/admin/tasks/${id}`);
  assert.equal(gone.status, 404);
  await screenshot(page, '03-runaway-killed');
  assert.deepEqual(errors, []);
});

test('crash a task: the error shows, everything else carries on', { timeout: 60_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  await page.click('#btn-crash');
  const entry = await page.waitForSelector('li[data-testid="log-entry"][data-code="-32003"]', { timeout: 15_000 });
  const text = await entry.textContent();
  assert.match(text, /-32003/);
  assert.match(text, /boom #1 from the dashboard/);
  // Still connected, and the probe still answers.
  assert.equal(await page.getAttribute('#conn-state', 'data-state'), 'open');
  const before = await points(page, 'chart-latency');
  await eventually(async () => (await points(page, 'chart-latency')) > before + 3, { timeoutMs: 10_000, message: 'probe after crash' });
  await eventually(async () => Number(await page.textContent('#kpi-crashed')) >= 1, { timeoutMs: 10_000, message: 'crashed counter' });
  await screenshot(page, '04-crash');
  assert.deepEqual(errors, []);
});

test('flood the server: the latency chart keeps updating, the steady load keeps running', { timeout: 120_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  await page.fill('#load-rate', '20');
  await page.dispatchEvent('#load-rate', 'change');
  await page.click('#load-toggle');
  await eventually(async () => Number(await page.textContent('#load-done')) >= 10, { timeoutMs: 20_000, message: 'steady load running' });

  await page.fill('#n-jobs', '3'); // 300 × spin 100 ms
  await page.click('#btn-flood');
  await eventually(async () => Number(await page.textContent('#task-count')) >= 20, { timeoutMs: 20_000, message: 'flood tasks in the table' });
  // While flooded, every few seconds the latency chart has new points, and load jobs complete.
  for (let round = 0; round < 3; round++) {
    const lat = await points(page, 'chart-latency');
    const done = Number(await page.textContent('#load-done'));
    await eventually(async () => (await points(page, 'chart-latency')) >= lat + 5, { timeoutMs: 10_000, message: `latency points, round ${round}` });
    await eventually(async () => Number(await page.textContent('#load-done')) > done, { timeoutMs: 10_000, message: `load progress, round ${round}` });
  }
  await screenshot(page, '05-flood');
  const lastRtt = Number(await page.$eval('#chart-latency', (c) => c.dataset.last));
  assert.ok(Number.isFinite(lastRtt) && lastRtt >= 0);

  // On a busy machine the flood may have ended by now (its tasks are answered): cancel
  // only what is left.
  if (await page.isEnabled('#btn-stop-flood')) await page.click('#btn-stop-flood', { timeout: 5_000 }).catch(() => {});
  await page.waitForSelector('li[data-testid="log-entry"]:has-text("flood done")', { timeout: 30_000 });
  await page.click('#load-toggle');
  await eventually(async () => Number(await page.textContent('#task-count')) < 20, { timeoutMs: 30_000, message: 'flood drained' });
  await screenshot(page, '06-after-flood');
  assert.deepEqual(errors, []);
});

test('start N jobs of each built-in kind; count_primes shows progress', { timeout: 150_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  await page.fill('#n-jobs', '2');
  const kinds = ['echo', 'sleep', 'spin', 'hash_chain', 'count_primes'];
  for (const kind of kinds) await page.click(`[data-testid="start-${kind}"]`);
  await page.waitForSelector('tr[data-testid="task-row"]', { timeout: 15_000 });
  // count_primes reports progress: its row grows a progress bar.
  await page.waitForSelector('tr[data-testid="task-row"][data-method="count_primes"] td.prog[data-progress]', { timeout: 30_000 });
  await screenshot(page, '07-jobs');
  for (const kind of ['echo', 'sleep', 'spin', 'hash_chain']) {
    await page.waitForSelector(`li[data-testid="log-entry"]:has-text("2× ${kind}: 2 ok")`, { timeout: 90_000 });
  }
  // count_primes (2·10⁹) takes long in a debug build: finish it with the row's kill buttons
  // (or it finished already).
  for (const deadline = Date.now() + 60_000; ;) {
    assert.ok(Date.now() < deadline, 'count_primes neither finished nor killed within 60 s');
    const done = await page.$('li[data-testid="log-entry"]:has-text("2× count_primes:")');
    if (done) break;
    const kill = await page.$('tr[data-testid="task-row"][data-method="count_primes"] button[data-testid="task-kill"]:not([disabled])');
    if (kill) await kill.click().catch(() => {});
    await new Promise((r) => setTimeout(r, 200));
  }
  const line = await page.textContent('li[data-testid="log-entry"]:has-text("2× count_primes:")');
  assert.match(line, /2× count_primes: (2 ok|2 killed|1 ok, 1 killed|1 killed, 1 ok)/);
  assert.deepEqual(errors, []);
});

test('under a small flood the state tiles add up to the live count and the table', { timeout: 90_000 }, async (t) => {
  const { page, errors } = await openDashboard(t);
  await page.fill('#n-jobs', '1'); // 100 × spin 100 ms: most of them yielded or queued at any moment
  await page.click('#btn-flood');
  await eventually(async () => Number(await page.textContent('#task-count')) >= 20, { timeoutMs: 20_000, message: 'flood tasks in the table' });
  let yielded = 0;
  for (let i = 0; i < 10; i++) {
    // One read of every tile and the table: all written by the same snapshot.
    const v = await page.evaluate(() => {
      const n = (id) => Number(document.getElementById(id).textContent);
      return {
        live: n('kpi-live'), table: n('task-count'), running: n('kpi-running'), queued: n('kpi-queued'),
        yielded: n('kpi-yielded'), waiting: n('kpi-waiting'), abandoned: n('kpi-abandoned'),
      };
    });
    assert.equal(v.running + v.queued + v.yielded + v.waiting + v.abandoned, v.live, JSON.stringify(v));
    assert.equal(v.live, v.table, JSON.stringify(v)); // fewer than 500: the table lists every task
    yielded = Math.max(yielded, v.yielded);
    await new Promise((r) => setTimeout(r, 300));
  }
  assert.ok(yielded > 0, 'a flood of 100 ms tasks on 2 ms slices shows yielded tasks');
  // The probe is no task: its pings are not in the finished counts (the page runs no other task now).
  await page.click('#btn-stop-flood');
  await page.waitForSelector('li[data-testid="log-entry"]:has-text("flood done")', { timeout: 60_000 });
  assert.match(await page.textContent('#kpi-rtt-p99'), /^p99 [\d.]+ ms$/);
  // Red only above zero (other tests on this server may have crashed or killed some).
  for (const id of ['kpi-crashed', 'kpi-killed', 'kpi-refused']) {
    const [text, nonzero] = await page.$eval(`#${id}`, (b) => [b.textContent, b.closest('.kpi').dataset.nonzero]);
    assert.equal(nonzero, String(text !== '0'), `${id}: ${text}`);
  }
  await screenshot(page, '09-tiles');
  assert.deepEqual(errors, []);
});

test('the demo buttons follow rpc.discover', { timeout: 60_000 }, async (t) => {
  // This server's own answer first: the buttons show exactly when it lists the demo tasks.
  const { page, errors } = await openDashboard(t);
  const listed = await page.evaluate(async () => {
    const d = await window.taskwireDashboard.conns.actions.call('rpc.discover');
    return ['spin', 'runaway', 'crash'].every((m) => d.methods.some((x) => x.name === m));
  });
  assert.equal(await page.getAttribute('html', 'data-demo'), String(listed));
  assert.equal(await page.isVisible('#btn-runaway'), listed);

  // A server without its demo tasks (as the binary is without --demo): its
  // rpc.discover answer, with them taken out, is what the page sees.
  const context = await browser.newContext();
  t.after(() => context.close());
  const p2 = await context.newPage();
  await p2.routeWebSocket(/\/ws$/, (ws) => {
    const server = ws.connectToServer();
    server.onMessage((msg) => {
      try {
        const v = JSON.parse(msg);
        if (v?.result?.methods) {
          v.result.methods = v.result.methods.filter((m) => !['spin', 'runaway', 'crash'].includes(m.name));
          ws.send(JSON.stringify(v));
          return;
        }
      } catch { /* not JSON: pass it on */ }
      ws.send(msg);
    });
  });
  await p2.goto(`${srv.httpUrl}/`, { timeout: 15_000 });
  await p2.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });
  assert.equal(await p2.getAttribute('html', 'data-demo'), 'false');
  for (const sel of ['#btn-runaway', '#btn-crash', '#btn-flood', '[data-testid="start-spin"]']) {
    assert.equal(await p2.isVisible(sel), false, sel);
  }
  for (const sel of ['[data-testid="start-echo"]', '[data-testid="start-hash_chain"]', '#demo-hint']) {
    assert.equal(await p2.isVisible(sel), true, sel);
  }
  assert.equal(await p2.$eval('#load-kind', (s) => s.value), 'hash');
  await screenshot(p2, '10-no-demo');
  assert.deepEqual(errors, []);
});
