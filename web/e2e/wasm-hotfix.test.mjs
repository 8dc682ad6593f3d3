// The hot fix, in a browser: a WebAssembly task stuck in a loop is found in
// the dashboard's task table and killed there; a fixed module is installed
// from the WebAssembly card's file picker; new calls run the fixed code. The
// steady load runs on its own connection throughout, with no errors, and
// nothing restarts.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import WebSocket from 'ws';
import { Taskwire, TaskwireError } from '../taskwire.js';
import { startServer, eventually } from '../testing/server.mjs';
import { launch, screenshot, openDashboard } from '../testing/browser.mjs';

const STUCK = '(module (func (export "run") (loop br 0)))';
const FIXED = `(module
  (import "taskwire" "result" (func $result (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\22fixed\\22")
  (func (export "run") (call $result (i32.const 0) (i32.const 7))))`;

let srv;
let browser;
let tw;
let dir;

before(async () => {
  srv = await startServer();
  browser = await launch();
  tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, reconnect: false });
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'taskwire-wasm-'));
});
after(async () => {
  tw?.close();
  await browser?.close();
  await srv?.stop();
  if (dir) fs.rmSync(dir, { recursive: true, force: true });
});

test('a stuck wasm task is found and killed, a fixed module installed from the page, the load unharmed', { timeout: 120_000 }, async (t) => {
  // The broken module is running in production.
  const put = await fetch(`${srv.httpUrl}/admin/wasm/resize`, { method: 'PUT', body: STUCK });
  assert.equal(put.status, 200, await put.text());

  const { page, errors } = await openDashboard(browser, t, `${srv.httpUrl}/`, { width: 1400, height: 1100 });
  await page.waitForSelector('#wasm-body tr[data-module="resize"]', { timeout: 15_000 });

  // The steady load runs on its own connection.
  await page.fill('#load-rate', '20');
  await page.dispatchEvent('#load-rate', 'change');
  await page.click('#load-toggle');
  await eventually(async () => Number(await page.textContent('#load-done')) >= 10, { timeoutMs: 20_000, message: 'steady load running' });

  // A user's call gets stuck in the loop; the operator finds it and kills it.
  const stuck = tw.call('resize', {}).then((r) => ({ ok: true, r }), (e) => ({ ok: false, e }));
  const row = 'tr[data-testid="task-row"][data-method="resize"]';
  await page.waitForSelector(row, { timeout: 15_000 });
  const id = await page.$eval(row, (r) => r.dataset.taskId);
  await page.click(`tr[data-testid="task-row"][data-task-id="${id}"] button[data-testid="task-kill"]`);
  const outcome = await stuck;
  assert.equal(outcome.ok, false);
  assert.ok(outcome.e instanceof TaskwireError);
  assert.equal(outcome.e.code, -32004);
  // The row stays in place, marked ended, while the pointer rests on the
  // table (nothing slides under it); then it goes.
  await page.waitForSelector(`tr[data-testid="task-row"][data-task-id="${id}"][data-state="ended"]`, { timeout: 15_000 });
  await page.mouse.move(0, 0);
  await page.waitForSelector(`tr[data-testid="task-row"][data-task-id="${id}"]`, { state: 'detached', timeout: 30_000 });
  await screenshot(page, 'wasm-01-stuck-killed');

  // The fix is installed from the file picker: no restart.
  const file = path.join(dir, 'resize.wat');
  fs.writeFileSync(file, FIXED);
  await page.setInputFiles('#wasm-file', file);
  await page.click('[data-testid="wasm-install"]');
  await page.waitForSelector('#wasm-status:has-text("resize installed")', { timeout: 30_000 });
  assert.equal(await tw.call('resize', {}), 'fixed');
  // And from the card's own run button.
  await page.click('[data-testid="wasm-run-resize"]');
  await page.waitForSelector('#wasm-status:has-text("answered \\"fixed\\"")', { timeout: 15_000 });
  await screenshot(page, 'wasm-02-fixed');

  // The load went on, without an error, and the server never restarted.
  const done = Number(await page.textContent('#load-done'));
  await eventually(async () => Number(await page.textContent('#load-done')) > done, { timeoutMs: 10_000, message: 'load still progressing' });
  assert.equal(await page.textContent('#load-errors'), '0');
  await page.click('#load-toggle');
  assert.equal(srv.proc.exitCode, null);
  assert.deepEqual(errors, []);
});
