// taskwire.js: the browser (and Node 20+) client for a taskwire server.
//
//   import { Taskwire, TaskwireError } from '/taskwire.js';
//   const tw = await Taskwire.connect('/ws', { token, reconnect: true });
//   const { count } = await tw.call('count_primes', { below: 1e7 }, {
//     signal: controller.signal,          // abort => $/cancelRequest => -32800
//     onProgress: (v) => bar.value = v.done / v.total,
//     timeoutMs: 30_000,                  // server-side deadline => -32002
//   });
//
// With `{ session: true }` the client opens a session (PROTOCOL.md, "Sessions"):
// after a drop that was not its own close() it reconnects, resumes, and every
// pending call settles with its real result, exactly once.
//
// One WebSocket (subprotocol `taskwire.v1`) speaking JSON-RPC 2.0 as described
// in PROTOCOL.md. No dependencies, no build step. See docs/CLIENT.md.

/** Error codes: the server's (PROTOCOL.md) and this client's own. */
export const ErrorCode = Object.freeze({
  PARSE_ERROR: -32700,
  INVALID_REQUEST: -32600,
  METHOD_NOT_FOUND: -32601,
  INVALID_PARAMS: -32602,
  INTERNAL_ERROR: -32603,
  CANCELLED: -32800,
  OVERLOADED: -32001,
  DEADLINE_EXCEEDED: -32002,
  CRASHED: -32003,
  KILLED: -32004,
  SHUTTING_DOWN: -32005,
  /** The cluster node running the task was lost; the task may have run in part. */
  NODE_LOST: -32008,
  /** A WebAssembly task passed its memory limit. */
  MEMORY_LIMIT: -32010,
  /** A WebAssembly task trapped (unreachable, out-of-bounds access, stack overflow, ...). */
  TRAPPED: -32011,
  /** No such session: unknown, expired, already resumed, or other credentials. */
  NO_SUCH_SESSION: -32020,
  /** The result was dropped: the session's buffer was full while the client was away (the task did run). */
  RESULT_DROPPED: -32021,
  // Client-side codes (never sent by a server):
  /** The connection dropped while the request was in flight; its outcome is unknown
   *  (the server cancels every task of a closed connection). */
  CONNECTION_LOST: -32099,
  /** The request was never sent: the client is closed, not connected and not
   *  queueing (reconnect off, queue full, reconnect gave up, or close() was called). */
  NOT_CONNECTED: -32098,
});

const CODE_NAMES = Object.fromEntries(Object.entries(ErrorCode).map(([k, v]) => [v, k]));

/** A JSON-RPC error, from the server or from this client (codes -32098, -32099). */
export class TaskwireError extends Error {
  constructor(code, message, data) {
    super(message);
    this.name = 'TaskwireError';
    /** @type {number} */
    this.code = code;
    /** @type {any} */
    this.data = data;
  }
  /** Symbolic name of the code, e.g. "CANCELLED", or undefined. */
  get codeName() { return CODE_NAMES[this.code]; }
  toJSON() { return { code: this.code, message: this.message, data: this.data }; }
}

const SUBPROTOCOL = 'taskwire.v1';
/** The protocol's heartbeat method (PROTOCOL.md): answered `{}` by the connection itself. */
const PING_METHOD = '$/ping';
/** Ids of this client's `$/session.*` requests: their answers are not numbered. */
const SESSION_ID = '$s';
/** Acknowledge at least every this many numbered responses, and every second. */
const ACK_EVERY = 64;
const ACK_INTERVAL_MS = 1000;
const OPEN = 1;

const DEFAULT_RECONNECT = Object.freeze({
  initialDelayMs: 250,
  maxDelayMs: 10_000,
  factor: 2,
  jitter: 0.5, // delay * (1 - jitter * random)
  maxRetries: Infinity,
});

function makeEvent(type, detail) {
  if (typeof CustomEvent === 'function') return new CustomEvent(type, { detail });
  const ev = new Event(type);
  Object.defineProperty(ev, 'detail', { value: detail });
  return ev;
}

// The WebSocket beside this file when a taskwire server served it (so that a
// server mounted under a prefix, `/tasks/taskwire.js`, is reached at
// `/tasks/ws`); `/ws` on the page's origin when it was copied or bundled.
function defaultPath() {
  let here;
  try { here = new URL(import.meta.url); } catch { return '/ws'; }
  if ((here.protocol === 'http:' || here.protocol === 'https:') && here.pathname.endsWith('/taskwire.js')) {
    return new URL('ws', here).toString();
  }
  return '/ws';
}

function resolveUrl(url, token) {
  const loc = globalThis.location;
  let u;
  if (url === undefined || url === null || url === '') {
    if (!loc) throw new TypeError('Taskwire.connect: a URL is required outside a browser');
    u = new URL(defaultPath(), loc.href);
  } else {
    u = new URL(String(url), loc ? loc.href : undefined);
  }
  if (u.protocol === 'http:') u.protocol = 'ws:';
  else if (u.protocol === 'https:') u.protocol = 'wss:';
  if (token !== undefined && token !== null && token !== '') u.searchParams.set('token', String(token));
  return u.toString();
}

/**
 * A connection to a taskwire server. Create with `await Taskwire.connect(url, options)`.
 * Events (EventTarget): `open`, `close`, `reconnecting`, `state`, `notification`, `error`.
 */
export class Taskwire extends EventTarget {
  /**
   * Open a connection; resolves once the first WebSocket is open, rejects with a
   * TaskwireError (NOT_CONNECTED) if that first attempt fails or times out.
   */
  static connect(url, options = {}) {
    const tw = new Taskwire(url, options);
    return tw._firstOpen.then(() => tw);
  }

  constructor(url, options = {}) {
    super();
    const WS = options.WebSocket ?? globalThis.WebSocket;
    if (typeof WS !== 'function') {
      throw new TypeError('Taskwire: no WebSocket implementation; pass options.WebSocket (e.g. the `ws` package)');
    }
    this._WS = WS;
    this.url = resolveUrl(url, options.token);
    this._protocols = options.protocols ?? [SUBPROTOCOL];
    const r = options.reconnect ?? true;
    this._reconnect = r === false ? null : { ...DEFAULT_RECONNECT, ...(r === true ? {} : r) };
    this._queueLimit = options.queueLimit ?? 100;
    this._connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    this._heartbeatMs = options.heartbeatMs ?? 30_000;

    // Sessions: `true`, or `{ persist, storage, key, windowMs }`.
    const so = options.session;
    this._sessionOpts = so ? (so === true ? {} : { ...so }) : null;
    /** The session: { token, id } once open; null without one. */
    this._session = null;
    /** Numbered responses received in this session, and the count last acknowledged. */
    this._seq = 0;
    this._acked = 0;
    this._ackTimer = null;
    /** While resuming: replayed frames still to come before re-sending. */
    this._resume = null;
    this._storage = null;
    this._storageKey = null;
    if (this._sessionOpts?.persist) {
      this._storage = this._sessionOpts.storage ?? globalThis.sessionStorage ?? null;
      this._storageKey = this._sessionOpts.key ?? `taskwire.session ${this.url}`;
      const saved = this._load();
      if (saved) { this._session = { token: saved.token, id: saved.id }; this._seq = saved.seq; this._acked = saved.seq; }
    }

    // A session that is not persisted dies with the page (nothing could ever
    // resume it): end it on the server as the page goes, instead of leaving
    // its tasks running for the window. Not for a page kept in the
    // back/forward cache, which may come back and resume.
    if (this._sessionOpts && !this._storage && typeof document !== 'undefined'
      && typeof globalThis.addEventListener === 'function') {
      this._onPageHide = (e) => { if (!e.persisted) this.close(1000, 'page closed'); };
      globalThis.addEventListener('pagehide', this._onPageHide);
    }

    // Ids stay unique across a page reload when a session outlives the page:
    // they continue from the clock instead of 1 (below 2^53 for centuries).
    this._nextId = this._storage ? Date.now() * 1000 : 1;
    /** id -> entry for every call not yet settled (sent or queued) */
    this._pending = new Map();
    /** progress token -> entry */
    this._progress = new Map();
    /** frames waiting for the socket to open: {value, entries} */
    this._queue = [];
    this._ws = null;
    this._state = 'connecting';
    this._attempt = 0;
    this._everOpened = false;
    this._closedByUser = false;
    this._retryTimer = null;
    this._heartbeatTimer = null;
    this._heartbeatOutstanding = false;
    this._connectTimer = null;

    this._firstOpen = new Promise((resolve, reject) => {
      this._resolveFirst = resolve;
      this._rejectFirst = reject;
    });
    this._firstOpen.catch(() => {}); // avoid unhandled rejection if nobody awaits
    this._open();
  }

  /** 'connecting' | 'open' | 'reconnecting' | 'closed' */
  get state() { return this._state; }
  /** The subprotocol the server selected ('' if none). */
  get protocol() { return this._ws?.protocol ?? ''; }
  /** Number of calls not yet answered (sent or queued). */
  get inflight() { return this._pending.size; }
  /** Number of frames queued while disconnected. */
  get queued() { return this._queue.length; }
  /** The session's id while one is open (option `session`), else null. */
  get session() { return this._session?.id ?? null; }

  /**
   * Call a method; resolves with its result or rejects with a TaskwireError.
   * @param {string} method
   * @param {object} [params]
   * @param {{signal?: AbortSignal, onProgress?: (value:any)=>void, timeoutMs?: number}} [opts]
   */
  call(method, params, opts = {}) {
    return new Promise((resolve, reject) => {
      const entry = this._makeEntry(method, params, opts, resolve, reject);
      if (!entry) return;
      this._submit({ value: entry.request, entries: [entry] });
    });
  }

  /** Send a notification (no id, no answer, not even an error). */
  notify(method, params) {
    const msg = { jsonrpc: '2.0', method };
    if (params !== undefined) msg.params = params;
    if (this._state === 'closed') throw new TaskwireError(ErrorCode.NOT_CONNECTED, 'not connected: client closed');
    this._submit({ value: msg, entries: [] }, true);
  }

  /**
   * Send several requests as one JSON-RPC batch (one frame). Resolves, when every
   * call has settled, with one outcome per item, in the order given:
   * `{ ok: true, result }` or `{ ok: false, error: TaskwireError }`.
   * Items: `{ method, params?, notification?, onProgress?, timeoutMs? }`.
   * `opts.signal` cancels every call of the batch.
   */
  batch(items, opts = {}) {
    if (!Array.isArray(items) || items.length === 0) {
      return Promise.reject(new TypeError('batch: a non-empty array of calls is required'));
    }
    const value = [];
    const entries = [];
    const outcomes = [];
    for (const item of items) {
      if (item.notification) {
        const msg = { jsonrpc: '2.0', method: item.method };
        if (item.params !== undefined) msg.params = item.params;
        value.push(msg);
        outcomes.push(Promise.resolve({ ok: true, result: undefined }));
        continue;
      }
      let entry;
      const p = new Promise((resolve, reject) => {
        entry = this._makeEntry(item.method, item.params,
          { signal: opts.signal, onProgress: item.onProgress, timeoutMs: item.timeoutMs }, resolve, reject);
      });
      outcomes.push(p.then((result) => ({ ok: true, result }), (error) => ({ ok: false, error })));
      if (entry) { value.push(entry.request); entries.push(entry); }
    }
    if (value.length > 0) this._submit({ value, entries }, entries.length === 0);
    return Promise.all(outcomes);
  }

  /** Close for good: no reconnect; unanswered calls reject (CONNECTION_LOST if sent, NOT_CONNECTED if queued). */
  close(code = 1000, reason = 'client closed') {
    if (this._state === 'closed') return;
    this._closedByUser = true;
    clearTimeout(this._retryTimer);
    if (this._onPageHide) globalThis.removeEventListener('pagehide', this._onPageHide);
    // A close 1000 ends the session on the server: forget it here too.
    if (code === 1000) { this._session = null; this._save(); }
    const ws = this._ws;
    this._teardownSocket(code, reason, true);
    if (ws && ws.readyState <= OPEN) {
      try { ws.close(code, reason); } catch { /* ignore */ }
    }
    this._rejectQueued('not connected: client closed');
    this._setState('closed');
    this._rejectFirst(new TaskwireError(ErrorCode.NOT_CONNECTED, 'not connected: client closed'));
  }

  // ---------------------------------------------------------------- internals

  _makeEntry(method, params, opts, resolve, reject) {
    const { signal, onProgress, timeoutMs } = opts ?? {};
    if (signal?.aborted) {
      reject(new TaskwireError(ErrorCode.CANCELLED, 'cancelled before it was sent', { local: true }));
      return null;
    }
    if (this._state === 'closed') {
      reject(new TaskwireError(ErrorCode.NOT_CONNECTED, 'not connected: client closed'));
      return null;
    }
    const id = this._nextId++;
    const request = { jsonrpc: '2.0', id, method };
    let p = params;
    if (onProgress || timeoutMs !== undefined) {
      if (p !== undefined && (p === null || typeof p !== 'object' || Array.isArray(p))) {
        reject(new TypeError('onProgress/timeoutMs need params to be an object'));
        return null;
      }
      const meta = { ...(p?._meta ?? {}) };
      if (onProgress) meta.progressToken = `p${id}`;
      if (timeoutMs !== undefined) meta.timeoutMs = timeoutMs;
      p = { ...(p ?? {}), _meta: meta };
    }
    if (p !== undefined) request.params = p;
    const entry = {
      id, method, request, sent: false, frame: null, signal, onProgress,
      token: onProgress ? `p${id}` : undefined,
      resolve, reject, onAbort: null,
    };
    if (signal) {
      entry.onAbort = () => this._abort(entry);
      signal.addEventListener('abort', entry.onAbort, { once: true });
    }
    this._pending.set(id, entry);
    if (entry.token !== undefined) this._progress.set(entry.token, entry);
    return entry;
  }

  _settle(entry, error, result) {
    if (!this._pending.has(entry.id)) return;
    this._pending.delete(entry.id);
    if (entry.token !== undefined) this._progress.delete(entry.token);
    if (entry.signal && entry.onAbort) entry.signal.removeEventListener('abort', entry.onAbort);
    if (error) entry.reject(error); else entry.resolve(result);
  }

  _abort(entry) {
    if (!this._pending.has(entry.id)) return;
    if (!entry.sent) {
      // Still queued: take it out of its frame; nothing reached the server.
      const frame = entry.frame;
      if (frame) {
        frame.entries = frame.entries.filter((e) => e !== entry);
        if (Array.isArray(frame.value)) {
          frame.value = frame.value.filter((m) => m !== entry.request);
          if (frame.value.length === 0) this._queue = this._queue.filter((f) => f !== frame);
        } else {
          this._queue = this._queue.filter((f) => f !== frame);
        }
      }
      this._settle(entry, new TaskwireError(ErrorCode.CANCELLED, 'cancelled before it was sent', { local: true }));
      return;
    }
    // Sent: ask the server; the promise settles with its -32800 (or the result).
    this._sendRaw({ jsonrpc: '2.0', method: '$/cancelRequest', params: { id: entry.id } });
  }

  _submit(frame, isNotification = false) {
    for (const e of frame.entries) e.frame = frame;
    if (this._ws && this._ws.readyState === OPEN && this._state === 'open') {
      this._sendFrame(frame);
      return;
    }
    if (this._state !== 'closed' && this._queueLimit > 0 && this._queue.length < this._queueLimit) {
      this._queue.push(frame);
      return;
    }
    const why = this._state === 'closed' ? 'client closed'
      : this._queueLimit > 0 ? `queue full (${this._queueLimit})` : 'queueing disabled';
    const err = new TaskwireError(ErrorCode.NOT_CONNECTED, `not connected: ${why}`, { state: this._state });
    for (const e of frame.entries) this._settle(e, err);
    if (isNotification) throw err;
  }

  _sendFrame(frame) {
    for (const e of frame.entries) e.sent = true;
    this._sendRaw(frame.value);
  }

  _sendRaw(value) {
    const ws = this._ws;
    if (!ws || ws.readyState !== OPEN) return false;
    try {
      ws.send(JSON.stringify(value));
      return true;
    } catch (err) {
      this.dispatchEvent(makeEvent('error', { error: err }));
      return false;
    }
  }

  _setState(state) {
    if (state === this._state) return;
    const previous = this._state;
    this._state = state;
    this.dispatchEvent(makeEvent('state', { state, previous }));
  }

  _open() {
    let ws;
    try {
      ws = new this._WS(this.url, this._protocols);
    } catch (err) {
      this._onSocketGone(null, 1006, String(err?.message ?? err), false);
      return;
    }
    this._ws = ws;
    const onOpen = () => this._onOpen(ws);
    const onMessage = (ev) => this._onMessage(ev);
    const onClose = (ev) => this._onSocketGone(ws, ev.code ?? 1006, ev.reason ?? '', ev.wasClean ?? false);
    const onError = () => { /* a close event always follows */ };
    ws.addEventListener('open', onOpen);
    ws.addEventListener('message', onMessage);
    ws.addEventListener('close', onClose);
    ws.addEventListener('error', onError);
    ws._twDetach = () => {
      ws.removeEventListener('open', onOpen);
      ws.removeEventListener('message', onMessage);
      ws.removeEventListener('close', onClose);
      ws.removeEventListener('error', onError);
    };
    clearTimeout(this._connectTimer);
    this._connectTimer = setTimeout(() => {
      if (this._ws === ws && ws.readyState !== OPEN) {
        try { ws.close(); } catch { /* ignore */ }
        this._onSocketGone(ws, 1006, 'connect timeout', false);
      }
    }, this._connectTimeoutMs);
  }

  _onOpen(ws) {
    if (this._ws !== ws) return;
    clearTimeout(this._connectTimer);
    if (this._sessionOpts && this._session) {
      // The resume must be the connection's first request; everything else
      // waits for its answer and the replay (see _resumed).
      this._everOpened = true;
      this._resume = { ws, left: -1 };
      this._sendRaw({ jsonrpc: '2.0', id: `${SESSION_ID}r`, method: '$/session.resume',
        params: { token: this._session.token, seq: this._seq } });
      this._resolveFirst();
      return;
    }
    if (this._sessionOpts) this._openSession();
    this._ready(ws);
  }

  /** Asks for a session; answers counted from it on. */
  _openSession() {
    const params = {};
    if (this._sessionOpts.windowMs !== undefined) params.windowMs = this._sessionOpts.windowMs;
    this._seq = 0;
    this._acked = 0;
    this._sendRaw({ jsonrpc: '2.0', id: `${SESSION_ID}o`, method: '$/session.open', params });
  }

  /** The connection is usable: state open, queue flushed. */
  _ready(ws) {
    const reconnected = this._everOpened;
    this._everOpened = true;
    this._attempt = 0;
    this._setState('open');
    this._startHeartbeat();
    const queue = this._queue;
    this._queue = [];
    for (const frame of queue) this._sendFrame(frame);
    this.dispatchEvent(makeEvent('open', { reconnected, protocol: ws.protocol }));
    this._resolveFirst();
  }

  _onMessage(ev) {
    this._heartbeatOutstanding = false;
    let msg;
    try {
      msg = JSON.parse(typeof ev.data === 'string' ? ev.data : String(ev.data));
    } catch (err) {
      this.dispatchEvent(makeEvent('error', { error: err, data: ev.data }));
      return;
    }
    if (this._session && isNumbered(msg)) this._counted();
    if (Array.isArray(msg)) for (const m of msg) this._handle(m);
    else this._handle(msg);
    if (this._resume && this._resume.left === 0) this._resumed();
  }

  /** One more numbered response: acknowledge now and then; count the replay. */
  _counted() {
    this._seq += 1;
    if (this._resume && this._resume.left > 0) this._resume.left -= 1;
    this._save();
    if (this._seq - this._acked >= ACK_EVERY) this._ack();
    else if (!this._ackTimer) this._ackTimer = setTimeout(() => { this._ackTimer = null; this._ack(); }, ACK_INTERVAL_MS);
  }

  _ack() {
    if (this._seq === this._acked || !this._session) return;
    if (this._sendRaw({ jsonrpc: '2.0', method: '$/session.ack', params: { seq: this._seq } })) this._acked = this._seq;
  }

  /** The answer to `$/session.open` or `$/session.resume`. */
  _sessionAnswer(msg) {
    if (msg.id === `${SESSION_ID}o`) {
      if (msg.error) {
        // A server without sessions: go on without one.
        this._session = null;
        this.dispatchEvent(makeEvent('error', { response: msg }));
      } else {
        this._session = { token: msg.result.token, id: msg.result.session };
        this.dispatchEvent(makeEvent('session', { state: 'open', session: msg.result.session }));
      }
      this._save();
      return;
    }
    if (!this._resume) return;
    if (msg.error) {
      // The session is gone (expired, ended, a restart): the outcome of every
      // call sent before the drop is unknown. Open a new one and go on.
      const err = new TaskwireError(ErrorCode.NO_SUCH_SESSION,
        'session expired: the outcome of this call is unknown (it may or may not have run)', { session: msg.error });
      for (const e of [...this._pending.values()].filter((x) => x.sent)) this._settle(e, err);
      const ws = this._resume.ws;
      this._resume = null;
      this._session = null;
      this._save();
      this.dispatchEvent(makeEvent('session', { state: 'expired' }));
      this._openSession();
      this._ready(ws);
      return;
    }
    this._session = { token: msg.result.token, id: msg.result.session };
    this._save();
    this._resume.inflight = new Set(msg.result.inflight ?? []);
    this._resume.replay = msg.result.replay ?? 0;
    this._resume.left = this._resume.replay;
  }

  /** The replay is in: re-send what the server never received, then go on. */
  _resumed() {
    const { ws, inflight, replay } = this._resume;
    this._resume = null;
    const resend = [...this._pending.values()].filter((e) => e.sent && !inflight.has(e.id));
    for (const e of resend) this._sendRaw(e.request);
    this.dispatchEvent(makeEvent('session', { state: 'resumed', session: this._session?.id,
      replayed: replay, running: inflight.size, resent: resend.length }));
    this._ready(ws);
  }

  _load() {
    try {
      const v = this._storage?.getItem(this._storageKey);
      const o = v ? JSON.parse(v) : null;
      return o && typeof o.token === 'string' && Number.isSafeInteger(o.seq) ? o : null;
    } catch { return null; }
  }

  _save() {
    if (!this._storage) return;
    try {
      if (this._session) {
        this._storage.setItem(this._storageKey, JSON.stringify({ token: this._session.token, id: this._session.id, seq: this._seq }));
      } else {
        this._storage.removeItem(this._storageKey);
      }
    } catch { /* storage full or denied: the session lives for this page only */ }
  }

  _handle(msg) {
    if (msg === null || typeof msg !== 'object') return;
    if ('id' in msg && ('result' in msg || 'error' in msg) && !('method' in msg)) {
      // A heartbeat answer, `{}` or an error alike: _onMessage already noted that the peer is alive.
      if (typeof msg.id === 'string' && msg.id.startsWith('$hb')) return;
      if (typeof msg.id === 'string' && msg.id.startsWith(SESSION_ID) && this._sessionOpts) {
        this._sessionAnswer(msg);
        return;
      }
      const entry = msg.id === null ? undefined : this._pending.get(msg.id);
      if (!entry && msg.id !== null && this._session) {
        // A kept answer whose call is gone (the page was reloaded).
        this.dispatchEvent(makeEvent('replayed', { response: msg }));
        return;
      }
      if (!entry) {
        // id null: the server could not tie the error to a request.
        this.dispatchEvent(makeEvent('error', { response: msg }));
        return;
      }
      if (msg.error) {
        const e = msg.error;
        this._settle(entry, new TaskwireError(e.code, e.message, e.data));
      } else {
        this._settle(entry, null, msg.result);
      }
      return;
    }
    if (msg.method === '$/progress' && msg.params) {
      const entry = this._progress.get(msg.params.token);
      if (entry?.onProgress) {
        try { entry.onProgress(msg.params.value); } catch (err) {
          this.dispatchEvent(makeEvent('error', { error: err }));
        }
      }
      return;
    }
    if (typeof msg.method === 'string') {
      this.dispatchEvent(makeEvent('notification', { method: msg.method, params: msg.params }));
    }
  }

  _teardownSocket(code, reason, byUser) {
    const ws = this._ws;
    clearTimeout(this._connectTimer);
    this._stopHeartbeat();
    if (ws) ws._twDetach?.();
    this._ws = null;
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    this._resume = null;
    // With a session (and a reconnect to come), sent calls wait for the resume.
    if (this._session && !byUser && this._reconnect) return ws;
    // Every sent call is lost with the socket: reject at once, never hang.
    const lost = [...this._pending.values()].filter((e) => e.sent);
    const err = byUser
      ? new TaskwireError(ErrorCode.CONNECTION_LOST, 'connection closed by the client', { closeCode: code, reason })
      : new TaskwireError(ErrorCode.CONNECTION_LOST, `connection lost (close code ${code}${reason ? `: ${reason}` : ''})`,
        { closeCode: code, reason });
    for (const e of lost) this._settle(e, err);
    return ws;
  }

  _onSocketGone(ws, code, reason, wasClean) {
    if (ws !== null && this._ws !== ws) return; // stale socket
    if (this._closedByUser) return;
    const hadOpened = this._state === 'open';
    this._teardownSocket(code, reason, false);
    if (hadOpened) this.dispatchEvent(makeEvent('close', { code, reason, wasClean }));

    if (!this._everOpened) {
      // The first attempt failed: connect() rejects; no automatic retry.
      this._closedByUser = true;
      this._rejectQueued('not connected: connect failed');
      this._setState('closed');
      this._rejectFirst(new TaskwireError(ErrorCode.NOT_CONNECTED,
        `could not connect to ${this.url} (close code ${code}${reason ? `: ${reason}` : ''})`, { closeCode: code, reason }));
      return;
    }
    const rc = this._reconnect;
    if (!rc || this._attempt >= rc.maxRetries) {
      if (!hadOpened) this.dispatchEvent(makeEvent('close', { code, reason, wasClean, gaveUp: true }));
      const lost = new TaskwireError(ErrorCode.CONNECTION_LOST, 'connection lost: reconnect gave up; the outcome is unknown',
        { closeCode: code, reason });
      for (const e of [...this._pending.values()].filter((x) => x.sent)) this._settle(e, lost);
      this._closedByUser = true;
      this._rejectQueued('not connected: reconnect ' + (rc ? 'gave up' : 'disabled'));
      this._setState('closed');
      return;
    }
    this._attempt += 1;
    const base = Math.min(rc.maxDelayMs, rc.initialDelayMs * rc.factor ** (this._attempt - 1));
    const delayMs = Math.round(base * (1 - rc.jitter * Math.random()));
    this._setState('reconnecting');
    this.dispatchEvent(makeEvent('reconnecting', { attempt: this._attempt, delayMs, code, reason }));
    clearTimeout(this._retryTimer);
    this._retryTimer = setTimeout(() => {
      if (!this._closedByUser) this._open();
    }, delayMs);
  }

  _rejectQueued(message) {
    const queue = this._queue;
    this._queue = [];
    const err = new TaskwireError(ErrorCode.NOT_CONNECTED, message);
    for (const frame of queue) for (const e of frame.entries) this._settle(e, err);
  }

  _startHeartbeat() {
    this._stopHeartbeat();
    if (!(this._heartbeatMs > 0)) return;
    this._heartbeatOutstanding = false;
    this._heartbeatTimer = setInterval(() => {
      const ws = this._ws;
      if (!ws || this._state !== 'open') return;
      if (this._heartbeatOutstanding) {
        // Nothing at all received for a whole interval after a probe: the socket is dead.
        try { ws.close(4000, 'heartbeat timeout'); } catch { /* ignore */ }
        this._onSocketGone(ws, 4000, 'heartbeat timeout', false);
        return;
      }
      this._heartbeatOutstanding = true;
      // `$/ping` is answered by the connection itself, whatever tasks the server has.
      // Any frame received proves liveness, so an error answer counts too: a server
      // older than `$/ping` answers -32601 (method not found), and that is just as alive.
      this._sendRaw({ jsonrpc: '2.0', id: `$hb${this._nextId++}`, method: PING_METHOD });
    }, this._heartbeatMs);
  }

  _stopHeartbeat() {
    clearInterval(this._heartbeatTimer);
    this._heartbeatTimer = null;
  }
}

/** Whether a frame is numbered in a session: a response to a request with an id
 *  (or a batch's array), other than a `$/session.*` answer. */
function isNumbered(msg) {
  if (Array.isArray(msg)) return true;
  if (msg === null || typeof msg !== 'object' || 'method' in msg) return false;
  if (msg.id === null || msg.id === undefined) return false;
  return !(typeof msg.id === 'string' && msg.id.startsWith(SESSION_ID));
}

export default Taskwire;
