// The Top view kills on a person's click. Top is refreshed four times a second;
// a person's press and release are ~120 ms apart, so a refresh lands between
// them. A refresh that replaced the rows (or reordered them under the pointer)
// sent the release to another element and the click was lost.
//
// Five times: a node client starts a runaway; the page presses the Top view's
// kill button of that task, waits 120 ms, releases; the client's call must be
// answered -32004. A second runaway (the decoy, never killed) keeps Top's
// ordering busy the whole time.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer, eventually, delay } from '../testing/server.mjs';
import { launch, screenshot, openDashboard } from '../testing/browser.mjs';

const KILLS = 5;
const PRESS_MS = 120;

let srv;
let browser;
const clients = [];

before(async () => {
  srv = await startServer();
  browser = await launch();
});
after(async () => {
  for (const tw of clients) tw.close();
  await browser?.close();
  await srv?.stop();
});

async function client() {
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, reconnect: false });
  clients.push(tw);
  return tw;
}

/** Ids of the runaway tasks the server lists now. */
async function runawayIds() {
  const r = await fetch(`${srv.httpUrl}/admin/tasks?method=runaway`);
  assert.equal(r.status, 200);
  return new Set((await r.json()).tasks.map((t) => String(t.id)));
}

/** Starts a runaway on `tw`; resolves with its task id and the settled outcome of the call. */
async function startRunaway(tw) {
  const known = await runawayIds();
  const outcome = tw.call('runaway', {}).then((result) => ({ ok: true, result }), (error) => ({ ok: false, error }));
  const id = await eventually(async () => [...(await runawayIds())].find((i) => !known.has(i)),
    { timeoutMs: 15_000, message: 'the new runaway is listed' });
  return { id, outcome };
}

test('the Top view kills on a press and a release 120 ms apart, five times in a row', { timeout: 180_000 }, async (t) => {
  const { page, errors } = await openDashboard(browser, t, `${srv.httpUrl}/`, { width: 1400, height: 1000 });

  const decoyClient = await client();
  const decoy = await startRunaway(decoyClient);
  await page.waitForSelector(`tr[data-testid="top-row"][data-task-id="${decoy.id}"]`, { timeout: 20_000 });

  const killer = await client();
  const answered = [];
  for (let i = 0; i < KILLS; i++) {
    const { id, outcome } = await startRunaway(killer);
    const button = `tr[data-testid="top-row"][data-task-id="${id}"] button[data-testid="task-kill"]`;
    await page.waitForSelector(button, { timeout: 20_000 });
    // Where the button is now; a person aims, then presses and releases without moving.
    await page.locator(button).scrollIntoViewIfNeeded({ timeout: 10_000 });
    const box = await eventually(() => page.locator(button).boundingBox({ timeout: 1_000 }).catch(() => null),
      { timeoutMs: 10_000, message: `kill button of ${id} on screen` });
    await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
    // The pointer over Top holds its order; a person looks before pressing, and so
    // does this test: the button under the pointer is the one for this task.
    const under = await page.evaluate(({ x, y }) => document.elementFromPoint(x, y)?.closest('button')?.dataset.kill,
      { x: box.x + box.width / 2, y: box.y + box.height / 2 });
    if (under !== id) {
      const again = await page.locator(button).boundingBox();
      assert.ok(again, `kill button of ${id} on screen`);
      await page.mouse.move(again.x + again.width / 2, again.y + again.height / 2);
    }
    await page.mouse.down();
    await delay(PRESS_MS);
    await page.mouse.up();
    // Bounded: a lost click leaves the runaway running, and this wait fails.
    const settled = await Promise.race([outcome, delay(20_000).then(() => null)]);
    assert.ok(settled, `kill #${i + 1} (task ${id}): the runaway is still running 20 s after the click`);
    assert.equal(settled.ok, false, `runaway ${id} returned?!`);
    assert.ok(settled.error instanceof TaskwireError);
    assert.equal(settled.error.code, ErrorCode.KILLED, `kill #${i + 1}: ${settled.error.message}`);
    answered.push(settled.error.code);
    // While the pointer rests there the row stays, marked ended, so nothing slides under it...
    const row = `tr[data-testid="top-row"][data-task-id="${id}"]`;
    await page.waitForSelector(`${row}[data-state="ended"] button[data-testid="task-kill"][disabled]`, { timeout: 20_000 });
    // ...and once it leaves, the row goes.
    await page.mouse.move(5, 5);
    await page.waitForSelector(row, { state: 'detached', timeout: 20_000 });
  }
  assert.deepEqual(answered, Array(KILLS).fill(ErrorCode.KILLED));
  await screenshot(page, '09-top-kills');

  // The decoy was never touched: still running, then ends with its connection.
  assert.ok((await runawayIds()).has(decoy.id), 'the decoy runaway is still running');
  decoyClient.close();
  const d = await decoy.outcome;
  assert.equal(d.ok, false);
  assert.notEqual(d.error.code, ErrorCode.KILLED);
  await eventually(async () => (await runawayIds()).size === 0, { timeoutMs: 20_000, message: 'no runaway left' });
  assert.deepEqual(errors, []);
});
