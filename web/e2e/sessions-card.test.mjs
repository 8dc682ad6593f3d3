// The dashboard's sessions card in Chromium: a client's session is cut
// without a close frame; the card lists it as detached (and the task table
// still lists its task, marked detached); the operator presses "end": the
// session leaves the card and its task leaves the task table.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
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

/** Opens a session on a raw connection, starts a long sleep, and cuts the
 *  TCP connection (no close frame): resolves with the session's id. */
async function detachedSession() {
  const ws = new WebSocket(srv.wsUrl);
  await new Promise((resolve, reject) => { ws.once('open', resolve); ws.once('error', reject); });
  const answers = new Map();
  ws.on('message', (data) => {
    const v = JSON.parse(String(data));
    if (v && v.id !== undefined) answers.set(v.id, v);
  });
  const answer = (id) => eventually(() => answers.get(id), { message: `answer ${id}` });
  ws.send(JSON.stringify({ jsonrpc: '2.0', id: 'open', method: '$/session.open', params: {} }));
  const open = await answer('open');
  assert.ok(open.result?.session, JSON.stringify(open));
  ws.send(JSON.stringify({ jsonrpc: '2.0', id: 1, method: 'sleep', params: { ms: 600_000 } }));
  ws.send(JSON.stringify({ jsonrpc: '2.0', id: 2, method: '$/ping', params: {} }));
  await answer(2);
  ws.terminate();
  return open.result.session;
}

test('a detached session is listed, the operator ends it, it and its task are gone', { timeout: 90_000 }, async (t) => {
  const context = await browser.newContext({ viewport: { width: 1400, height: 1400 } });
  t.after(() => context.close());
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.goto(`${srv.httpUrl}/`, { waitUntil: 'load', timeout: 15_000 });
  await page.waitForSelector('html[data-ready="true"]', { timeout: 15_000 });

  const sid = await detachedSession();
  const row = `tr[data-testid="session-row"][data-session-id="${sid}"]`;
  await page.waitForSelector(`${row}[data-state="detached"]`, { timeout: 20_000 });
  const cells = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));
  assert.equal(cells[1], 'detached');
  assert.equal(cells[3], '–', 'no connection attached');
  assert.equal(cells[7], '1', 'one task');

  // Its task is still in the task table, marked detached.
  const tasks = await (await fetch(`${srv.httpUrl}/admin/tasks?method=sleep`)).json();
  const task = tasks.tasks.find((x) => String(x.session) === String(sid));
  assert.ok(task?.detached, JSON.stringify(tasks));
  const taskRow = `tr[data-testid="task-row"][data-task-id="${task.id}"]`;
  await page.waitForSelector(taskRow, { timeout: 20_000 });
  await eventually(async () => (await page.textContent(`${taskRow} td:nth-child(2)`)).includes('detached'),
    { message: 'the task row says detached' });
  await screenshot(page, 'sessions-card-detached');

  await page.click(`${row} button[data-testid="session-end"]`);
  await page.waitForSelector(row, { state: 'detached', timeout: 20_000 });
  await eventually(async () => {
    const r = await (await fetch(`${srv.httpUrl}/admin/tasks?method=sleep`)).json();
    return !r.tasks.some((x) => x.id === task.id);
  }, { timeoutMs: 20_000, message: 'the task is gone from /admin/tasks' });
  // The table's row goes (or is marked ended while the pointer holds the table).
  await eventually(async () => {
    const state = await page.$eval(taskRow, (tr) => tr.dataset.state).catch(() => 'gone');
    return state === 'gone' || state === 'ended';
  }, { timeoutMs: 20_000, message: 'the task row gone' });
  const sessions = await (await fetch(`${srv.httpUrl}/admin/sessions`)).json();
  assert.ok(!sessions.sessions.some((s) => String(s.id) === String(sid)), JSON.stringify(sessions));
  assert.equal(sessions.counts.ended >= 1, true);
  assert.deepEqual(errors, []);
});
