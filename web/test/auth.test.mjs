// Client tokens: `token` goes into the query string; a server with --token refuses without it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import WebSocket from 'ws';
import { Taskwire, TaskwireError, ErrorCode } from '../taskwire.js';
import { startServer } from '../testing/server.mjs';

let srv;
before(async () => { srv = await startServer({ extraArgs: ['--token', 'client-token-0001'] }); });
after(async () => { await srv?.stop(); });

test('with the right token the client connects and calls', { timeout: 10_000 }, async () => {
  const tw = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, token: 'client-token-0001' });
  try {
    assert.match(tw.url, /\?token=client-token-0001$/);
    assert.equal(await tw.call('echo', { value: 'in' }), 'in');
  } finally { tw.close(); }
});

test('without a token, or with a wrong one, connect() rejects with NOT_CONNECTED', { timeout: 10_000 }, async () => {
  for (const token of [undefined, 'wrong-token-00000']) {
    const err = await Taskwire.connect(srv.wsUrl, { WebSocket, heartbeatMs: 0, token }).then(
      (tw) => { tw.close(); assert.fail(`connected with token ${token}`); },
      (e) => e,
    );
    assert.ok(err instanceof TaskwireError);
    assert.equal(err.code, ErrorCode.NOT_CONNECTED);
  }
});
