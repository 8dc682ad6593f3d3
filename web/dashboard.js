// dashboard.js: the live taskwire dashboard served at `/`.
//
// Three WebSocket connections, so that each story is told on its own:
//   probe   - `$/ping` 5×/s and charts the round trip (responsiveness)
//   load    - the steady synthetic load at a user-set rate (fairness)
//   actions - the buttons: N jobs, flood, runaway, crash
// plus the server's admin stream (/admin/events, Server-Sent Events) for the
// task table, the top view, the tasks/s and pool charts.

import { Taskwire, TaskwireError, ErrorCode } from './taskwire.js';
import { LineChart, formatNumber } from './chart.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

// ------------------------------------------------------------------ tokens
// A token never travels in a URL query the server would log: it is taken once
// from the page's fragment (`#token=T&admin_token=A`; a `?token=` of an old
// link too, though that request is already logged), kept in sessionStorage
// (this tab only) and removed from the address bar. The WebSocket gets it as
// the `taskwire_token` cookie, scoped to the `ws` path alone (a browser
// cannot set headers on a WebSocket); the admin API as `Authorization:
// Bearer` (the admin API takes no cookie: another site's form could use it).
const KEYS = { token: 'taskwire.token', admin_token: 'taskwire.adminToken' };
const store = {
  get(k) { try { return sessionStorage.getItem(k) || undefined; } catch { return undefined; } },
  set(k, v) { try { if (v) sessionStorage.setItem(k, v); else sessionStorage.removeItem(k); } catch { /* storage off */ } },
};
(function takeTokensFromUrl() {
  const frag = new URLSearchParams(location.hash.slice(1));
  let changed = false;
  for (const [key, name] of Object.entries(KEYS)) {
    const v = frag.get(key) ?? params.get(key);
    if (v === null) continue;
    store.set(name, v);
    frag.delete(key);
    params.delete(key);
    changed = true;
  }
  if (changed) {
    const q = params.toString();
    const f = frag.toString();
    history.replaceState(null, '', `${location.pathname}${q ? `?${q}` : ''}${f ? `#${f}` : ''}`);
  }
})();
const wsToken = () => store.get(KEYS.token);
const adminToken = () => store.get(KEYS.admin_token) || wsToken();
const adminHeaders = () => (adminToken() ? { authorization: `Bearer ${adminToken()}` } : {});
const wsHttpUrl = new URL('ws', location.href);
function setWsCookie() {
  const t = wsToken();
  const path = wsHttpUrl.pathname;
  document.cookie = t
    ? `taskwire_token=${encodeURIComponent(t)}; path=${path}; SameSite=Strict`
    : `taskwire_token=; path=${path}; max-age=0; SameSite=Strict`;
}
setWsCookie();

// Waiting for a token, for the WebSocket (`ws`) or the admin API (`admin`):
// no retries pile up refusals meanwhile. Resolved when one is entered.
const waits = {};
const entered = [];
function needToken(what) {
  const el = $('auth');
  const wasWs = !el.hidden && el.dataset.what === 'ws';
  el.hidden = false;
  if (!wasWs) el.dataset.what = what;
  if (!wasWs) $('auth-msg').textContent = what === 'admin'
    ? 'admin token missing or refused: the admin API answered 401 (the table and charts need it)'
    : 'token missing or refused: the server refused the WebSocket upgrade (401)';
  if (what === 'ws') setConnPill('unauthorized', 'token missing or refused');
  waits[what] ??= new Promise((resolve) => { entered.push(resolve); });
  return waits[what];
}
$('auth-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const t = $('auth-token').value.trim();
  const a = $('auth-admin-token').value.trim();
  if (t) store.set(KEYS.token, t);
  store.set(KEYS.admin_token, a || undefined);
  $('auth-token').value = '';
  $('auth-admin-token').value = '';
  setWsCookie();
  $('auth').hidden = true;
  log('token entered: connecting again', 'ok');
  delete waits.ws;
  delete waits.admin;
  for (const resolve of entered.splice(0)) resolve();
});

/** Why the server refuses a WebSocket upgrade: a browser cannot read the
 * status of a refused upgrade, so a plain GET of the same URL, which the
 * server checks the same way, tells it (401 token, 403 origin or host). */
async function upgradeRefusal() {
  try {
    const r = await fetch(wsHttpUrl, { cache: 'no-store' });
    return r.status;
  } catch {
    return 0;
  }
}

const COLORS = { blue: '#2563eb', green: '#16a34a', red: '#dc2626', amber: '#d97706', violet: '#7c3aed', slate: '#475569' };

// ------------------------------------------------------------------ charts
const charts = {
  load: new LineChart($('chart-load'), {
    series: [{ label: 'completed/s', color: COLORS.green, fill: true }, { label: 'errors/s', color: COLORS.red }],
    unit: '/s', yMaxFloor: 10,
  }),
  latency: new LineChart($('chart-latency'), {
    series: [{ label: '$/ping round trip', color: COLORS.blue, fill: true }],
    unit: 'ms', yMaxFloor: 5,
  }),
  // Refusals come in bursts of thousands a second: on a scale of their own
  // (left, red), so that they do not flatten the finished line.
  tps: new LineChart($('chart-tps'), {
    series: [{ label: 'finished/s', color: COLORS.violet, fill: true }, { label: 'refused/s (left scale)', color: COLORS.red, axis: 'alt' }],
    unit: '/s', yMaxFloor: 10, alt: { yMaxFloor: 10 },
  }),
  pool: new LineChart($('chart-pool'), {
    series: [
      { label: 'utilisation', color: COLORS.amber, fill: true, unit: '%' },
      { label: 'run queue (left scale)', color: COLORS.slate, axis: 'alt', unit: 'tasks' },
    ],
    unit: '%', yMax: 100, alt: { yMaxFloor: 10 },
  }),
};

// ------------------------------------------------------------------ log
const logEl = $('log');
let logSeq = 0;
function log(text, kind = '', code = undefined) {
  const li = document.createElement('li');
  li.dataset.testid = 'log-entry';
  li.dataset.seq = String(++logSeq);
  if (code !== undefined) li.dataset.code = String(code);
  if (kind) li.className = kind;
  const time = document.createElement('time');
  time.textContent = new Date().toLocaleTimeString([], { hour12: false });
  const span = document.createElement('span');
  span.textContent = text;
  li.append(time, span);
  logEl.prepend(li);
  while (logEl.children.length > 100) logEl.lastChild.remove();
}
const describe = (err) => (err instanceof TaskwireError ? `${err.code} ${err.message}` : String(err?.message ?? err));

// ------------------------------------------------------------------ connections
// Every URL is relative to this page, so that the dashboard works wherever
// taskwire is mounted (`/`, or `/tasks/` inside another app).
const wsUrl = new URL('ws', location.href).toString();
const conns = {};

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function open(name) {
  for (let delay = 250; ; delay = Math.min(delay * 2, 30_000)) {
    if (waits.ws) await waits.ws;
    try {
      // The actions connection opens a session: its tasks survive a dropped
      // connection and their results still arrive (see sessionPill).
      const tw = await Taskwire.connect(wsUrl, {
        reconnect: { maxDelayMs: 5000 }, queueLimit: 50, session: name === 'actions',
      });
      conns[name] = tw;
      return tw;
    } catch (err) {
      const status = waits.ws ? 401 : await upgradeRefusal();
      if (status === 401) {
        // Retrying with the same (missing) token only piles up refusals.
        await needToken('ws');
        delay = 125;
        continue;
      }
      if (name === 'probe') {
        setConnPill('closed', status === 403 ? 'refused: origin or host not allowed (403)' : `cannot connect: ${err.message}`);
      }
      await sleep(delay);
    }
  }
}

function setConnPill(state, title = '') {
  const el = $('conn-state');
  el.dataset.state = state;
  el.title = title;
  const [text, cls] = {
    open: ['connected', 'pill-ok'],
    connecting: ['connecting…', 'pill-wait'],
    reconnecting: ['reconnecting…', 'pill-wait'],
    closed: ['disconnected', 'pill-bad'],
    unauthorized: ['token missing or refused', 'pill-bad'],
  }[state] ?? [state, 'pill-wait'];
  el.textContent = text;
  el.className = `pill ${cls}`;
}

// The actions connection's session, shown beside the connection pill:
// "reconnecting…" while it is away, "resumed" once its tasks' results flow again.
function sessionPill(tw) {
  const el = document.createElement('span');
  el.id = 'session-state';
  el.dataset.testid = 'session-state';
  $('conn-state').after(el);
  const show = (state, text, cls) => {
    el.dataset.state = state;
    el.textContent = text;
    el.className = `pill ${cls}`;
  };
  show('open', 'session', 'pill-ok');
  tw.addEventListener('state', (e) => {
    if (e.detail.state === 'reconnecting') show('reconnecting', 'actions: reconnecting…', 'pill-wait');
  });
  tw.addEventListener('session', (e) => {
    const d = e.detail;
    if (d.state === 'resumed') {
      show('resumed', 'actions: resumed', 'pill-ok');
      log(`actions session resumed: ${d.replayed} results replayed, ${d.running} tasks still running`, 'ok');
    } else if (d.state === 'expired') {
      show('expired', 'actions: session expired', 'pill-bad');
      log('actions session expired: the outcome of the tasks started before the drop is unknown', 'err');
    }
  });
}

function watch(tw, name) {
  tw.addEventListener('state', (e) => {
    if (name === 'probe' && !waits.ws) setConnPill(e.detail.state);
  });
  tw.addEventListener('reconnecting', async (e) => {
    if (name === 'probe') log(`connection lost (${e.detail.code}); reconnecting in ${e.detail.delayMs} ms`, 'err');
    // A token revoked or a server restarted with other tokens: stop this
    // connection's retries and open it again once a token is entered.
    if (waits.ws || (await upgradeRefusal()) === 401) {
      tw.close();
      await needToken('ws');
      watch(await open(name), name);
      if (name === 'probe') setConnPill('open');
    }
  });
  tw.addEventListener('open', (e) => {
    if (e.detail.reconnected && name === 'probe') log('reconnected', 'ok');
  });
}

// ------------------------------------------------------------------ responsiveness probe
// The probe sends `$/ping`, which the connection answers itself: what it
// measures is the connection's responsiveness (reader, writer, the threads
// that serve sockets), and being no task it stays out of the server-wide task
// counts and histograms that the rest of the page shows.
const RTT_WINDOW_MS = 10_000;
const rtts = []; // [at, ms], the last 10 s (at most 5 a second)
const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(q * sorted.length) - 1))];
function startProbe() {
  let outstanding = 0;
  setInterval(() => {
    const tw = conns.probe;
    if (!tw || tw.state !== 'open' || outstanding >= 4) return;
    outstanding++;
    const t0 = performance.now();
    tw.call('$/ping').then(
      () => {
        const now = performance.now();
        const rtt = now - t0;
        charts.latency.push([rtt], now);
        rtts.push([now, rtt]);
        while (rtts.length && rtts[0][0] < now - RTT_WINDOW_MS) rtts.shift();
        const sorted = rtts.map((r) => r[1]).sort((a, b) => a - b);
        $('kpi-rtt').textContent = `${formatNumber(quantile(sorted, 0.5))} ms`;
        $('kpi-rtt-p99').textContent = `p99 ${formatNumber(quantile(sorted, 0.99))} ms`;
      },
      () => {},
    ).finally(() => { outstanding--; });
  }, 200);
}

// ------------------------------------------------------------------ steady load
const LOAD_JOBS = {
  spin2: (tw, i) => tw.call('spin', { ms: 2 }),
  hash: (tw, i) => tw.call('hash_chain', { seed: i, rounds: 20_000 }),
  echo: (tw, i) => tw.call('echo', { value: i }),
  sleep: (tw, i) => tw.call('sleep', { ms: 50 }),
};
const load = { running: false, rate: 50, credit: 0, seq: 0, inflight: 0, done: 0, errors: 0, doneAt: [], errAt: [] };

function setRate(v) {
  const rate = Math.max(0, Math.min(2000, Number(v) || 0));
  load.rate = rate;
  $('load-rate').value = String(rate);
  $('load-rate-slider').value = String(Math.min(rate, 500));
  charts.load.setGuide(load.running ? { value: rate, label: `target ${rate}/s` } : null);
}
$('load-rate').addEventListener('change', (e) => setRate(e.target.value));
$('load-rate-slider').addEventListener('input', (e) => setRate(e.target.value));

function setLoadRunning(on) {
  load.running = on;
  load.credit = 0;
  const b = $('load-toggle');
  b.textContent = on ? 'Stop load' : 'Start load';
  b.setAttribute('aria-pressed', String(on));
  setRate(load.rate);
}
$('load-toggle').addEventListener('click', () => setLoadRunning(!load.running));

function startLoad() {
  let last = performance.now();
  setInterval(() => {
    const now = performance.now();
    const dt = (now - last) / 1000;
    last = now;
    const tw = conns.load;
    if (!load.running || !tw || tw.state !== 'open') return;
    load.credit = Math.min(load.credit + load.rate * dt, Math.max(1, load.rate)); // never more than 1 s behind
    const job = LOAD_JOBS[$('load-kind').value] ?? LOAD_JOBS.hash;
    while (load.credit >= 1 && load.inflight < 5000) {
      load.credit -= 1;
      load.inflight++;
      job(tw, load.seq++).then(
        () => { load.done++; load.doneAt.push(performance.now()); },
        () => { load.errors++; load.errAt.push(performance.now()); },
      ).finally(() => { load.inflight--; });
    }
  }, 50);
  setInterval(() => {
    const now = performance.now();
    const cut = now - 1000;
    while (load.doneAt.length && load.doneAt[0] < cut) load.doneAt.shift();
    while (load.errAt.length && load.errAt[0] < cut) load.errAt.shift();
    charts.load.push([load.doneAt.length, load.errAt.length], now);
    $('load-done').textContent = String(load.done);
    $('load-errors').textContent = String(load.errors);
  }, 500);
}

// ------------------------------------------------------------------ actions
const ACTION_JOBS = {
  echo: (i) => ['echo', { value: `hello ${i}` }],
  sleep: () => ['sleep', { ms: 2000 }],
  hash_chain: (i) => ['hash_chain', { seed: Date.now() + i, rounds: 200_000_000 }],
  count_primes: () => ['count_primes', { below: 2_000_000_000 }],
  spin: () => ['spin', { ms: 2000 }],
  flood: () => ['spin', { ms: 100 }],
};
const nJobs = () => Math.max(1, Math.min(1000, Number($('n-jobs').value) || 1));

function summarize(outcomes) {
  const by = {};
  for (const o of outcomes) {
    const k = o.ok ? 'ok' : (o.error?.codeName ?? o.error?.code ?? 'error');
    by[k] = (by[k] ?? 0) + 1;
  }
  return Object.entries(by).map(([k, n]) => `${n} ${String(k).toLowerCase()}`).join(', ');
}

async function runMany(tw, kind, n, signal) {
  const t0 = performance.now();
  const calls = [];
  for (let i = 0; i < n; i++) {
    const [method, p] = ACTION_JOBS[kind](i);
    const opts = { signal };
    if (kind === 'count_primes') opts.onProgress = () => {};
    calls.push(tw.call(method, p, opts).then((result) => ({ ok: true, result }), (error) => ({ ok: false, error })));
  }
  const outcomes = await Promise.all(calls);
  return { outcomes, secs: (performance.now() - t0) / 1000 };
}

function wireActions() {
  const tw = new Proxy({}, { get: (_, k) => { const c = conns.actions; const v = c[k]; return typeof v === 'function' ? v.bind(c) : v; } });
  for (const b of document.querySelectorAll('button[data-kind]')) {
    b.addEventListener('click', async () => {
      const kind = b.dataset.kind;
      const n = nJobs();
      log(`started ${n}× ${kind}`);
      const { outcomes, secs } = await runMany(tw, kind, n);
      const bad = outcomes.some((o) => !o.ok);
      const first = outcomes[0];
      const sample = first?.ok ? ` · e.g. ${JSON.stringify(first.result).slice(0, 60)}` : '';
      log(`${n}× ${kind}: ${summarize(outcomes)} in ${secs.toFixed(2)} s${sample}`, bad ? 'err' : 'ok');
    });
  }

  let flood = null;
  $('btn-flood').addEventListener('click', async () => {
    if (flood) return;
    const n = nJobs() * 100;
    flood = new AbortController();
    $('btn-flood').disabled = true;
    $('btn-stop-flood').disabled = false;
    log(`flood: ${n}× spin 100 ms at once`, 'err');
    const { outcomes, secs } = await runMany(tw, 'flood', n, flood.signal).catch(() => ({ outcomes: [], secs: 0 }));
    log(`flood done: ${summarize(outcomes)} in ${secs.toFixed(1)} s`, 'ok');
    flood = null;
    $('btn-flood').disabled = false;
    $('btn-stop-flood').disabled = true;
  });
  $('btn-stop-flood').addEventListener('click', () => {
    flood?.abort();
    log('flood: cancelling every task ($/cancelRequest)');
  });

  let runaways = 0;
  $('btn-runaway').addEventListener('click', () => {
    const n = ++runaways;
    log(`runaway #${n} started: find it in Top and kill it`, 'err');
    tw.call('runaway', {}).then(
      () => log(`runaway #${n} returned?!`),
      (err) => log(`runaway #${n} ended: ${describe(err)}`, err.code === ErrorCode.KILLED ? 'ok' : 'err', err.code),
    );
  });

  let crashes = 0;
  $('btn-crash').addEventListener('click', () => {
    const n = ++crashes;
    tw.call('crash', { message: `boom #${n} from the dashboard` }).then(
      () => log(`crash #${n} did not crash?!`),
      (err) => log(`crash #${n} → ${describe(err)} (nothing else was hurt)`, 'err', err.code),
    );
  });
}

// ------------------------------------------------------------------ admin stream
let lastStats = null;
let lastStatsAt = 0;
const cpuPrev = new Map(); // task id -> {cpuMs, t}
const cpuRate = new Map(); // task id -> fraction of a core

function setAdminPill(state, text) {
  const el = $('admin-state');
  el.dataset.state = state;
  el.textContent = text;
  el.className = `pill ${state === 'open' ? 'pill-ok' : state === 'closed' ? 'pill-bad' : 'pill-wait'}`;
}

function fmtDuration(ms) {
  if (!Number.isFinite(ms)) return '–';
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${Math.floor(s % 60)}s`;
  return `${Math.floor(m / 60)}h ${m % 60}m`;
}
const sum = (o) => Object.values(o ?? {}).reduce((a, b) => a + (Number(b) || 0), 0);

function onSnapshot(snap) {
  const now = performance.now();
  const { stats, tasks = [] } = snap;
  if (stats) {
    $('uptime').textContent = fmtDuration(stats.uptimeMs);
    $('connections').textContent = String(stats.connections);
    $('workers').textContent = String(stats.pool?.workers ?? '–');
    // Every live task is in exactly one state; the tiles add up to "live",
    // which is the table's count (the server counts both in one walk).
    const n = stats.tasks ?? {};
    for (const k of ['running', 'queued', 'yielded', 'waiting', 'abandoned']) $(`kpi-${k}`).textContent = String(n[k] ?? 0);
    $('kpi-abandoned-tile').hidden = !(n.abandoned > 0);
    $('kpi-live').textContent = String(sum(n));
    const util = Math.round((stats.pool?.utilisation ?? 0) * 100);
    $('kpi-pool').textContent = `${util}%`;
    $('kpi-pool-queue').textContent = `run queue ${stats.pool?.queued ?? 0}`;
    const f = stats.finished ?? {};
    $('kpi-ok').textContent = formatNumber(f.ok ?? 0);
    for (const k of ['crashed', 'killed', 'refused']) {
      $(`kpi-${k}`).textContent = formatNumber(f[k] ?? 0);
      // Red only when something happened: a 0 is good news.
      $(`kpi-${k}`).closest('.kpi').dataset.nonzero = String((f[k] ?? 0) > 0);
    }
    charts.pool.push([util, stats.pool?.queued ?? 0], now);
    if (lastStats) {
      const dt = (now - lastStatsAt) / 1000;
      if (dt > 0.05) {
        const done = sum(lastStats.finished) - (lastStats.finished?.refused ?? 0);
        const doneNow = sum(f) - (f.refused ?? 0);
        const tps = Math.max(0, (doneNow - done) / dt);
        const rps = Math.max(0, ((f.refused ?? 0) - (lastStats.finished?.refused ?? 0)) / dt);
        charts.tps.push([tps, rps], now);
        $('kpi-tps').textContent = formatNumber(tps);
      }
    }
    lastStats = stats;
    lastStatsAt = now;
  }
  // CPU share per task since the previous snapshot.
  const seen = new Set();
  for (const t of tasks) {
    seen.add(t.id);
    // The task's own age is the server's clock: no jitter from the network or this page.
    const p = cpuPrev.get(t.id);
    if (p && t.ageMs > p.ageMs) cpuRate.set(t.id, Math.min(1, Math.max(0, (t.cpuMs - p.cpuMs) / (t.ageMs - p.ageMs))));
    else if (!p) cpuRate.set(t.id, t.ageMs > 0 ? Math.min(1, t.cpuMs / t.ageMs) : 0);
    cpuPrev.set(t.id, { cpuMs: t.cpuMs, ageMs: t.ageMs });
  }
  for (const id of cpuPrev.keys()) if (!seen.has(id)) { cpuPrev.delete(id); cpuRate.delete(id); }
  renderTop(tasks);
  renderTasks(tasks);
}

/** An HTTP status from the admin API. */
class AdminHttpError extends Error {
  constructor(status) { super(`admin: HTTP ${status}`); this.status = status; }
}

/** `admin/events` read with fetch rather than EventSource, so that the admin
 * token travels in a header, not in the URL's query. Resolves when the
 * stream ends (the server shuts down). */
async function streamAdmin() {
  const r = await fetch('admin/events', { headers: { ...adminHeaders(), accept: 'text/event-stream' }, cache: 'no-store' });
  if (!r.ok) throw new AdminHttpError(r.status);
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n/g, '\n');
    for (let i; (i = buf.indexOf('\n\n')) >= 0;) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      let event = 'message';
      let data = '';
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data += line.slice(5).replace(/^ /, '');
      }
      if (event !== 'snapshot' || !data) continue;
      setAdminPill('open', 'admin stream');
      try { onSnapshot(JSON.parse(data)); } catch (err) { console.error('bad snapshot', err); }
    }
    // A snapshot is bounded by the server (500 tasks); a buffer past this is not one.
    if (buf.length > 16 << 20) throw new Error('admin: oversized event');
  }
}

/** Without the stream (404: an older server), poll the JSON endpoints. */
async function pollAdmin() {
  const get = async (url) => {
    const r = await fetch(url, { headers: adminHeaders(), cache: 'no-store' });
    if (!r.ok) throw new AdminHttpError(r.status);
    return r.json();
  };
  for (;;) {
    const [s, t] = await Promise.all([get('admin/stats'), get('admin/tasks?sort=cpu&limit=500')]);
    setAdminPill('open', 'admin (polling)');
    onSnapshot({ stats: s, tasks: t.tasks ?? [] });
    await sleep(500);
  }
}

async function startAdminStream() {
  let poll = false;
  for (let delay = 500; ; delay = Math.min(delay * 2, 10_000)) {
    try {
      await (poll ? pollAdmin() : streamAdmin());
      delay = 250; // the stream ended: the server went away; try again soon
    } catch (err) {
      if (err instanceof AdminHttpError && err.status === 404) { poll = true; continue; }
      if (err instanceof AdminHttpError && (err.status === 401 || err.status === 403)) {
        setAdminPill('closed', `admin: HTTP ${err.status}, token missing or refused`);
        // No retries until a token is entered: each would be refused again.
        await needToken('admin');
        delay = 250;
        continue;
      }
      setAdminPill('closed', 'admin unreachable');
    }
    await sleep(delay);
  }
}

async function kill(id, button) {
  if (button) { button.disabled = true; button.textContent = 'killing…'; }
  try {
    const r = await fetch(`admin/tasks/${encodeURIComponent(id)}/kill`, { method: 'POST', headers: adminHeaders() });
    if (r.status === 404) log(`task ${id} was already gone`);
    else if (!r.ok) { log(`kill ${id}: HTTP ${r.status}`, 'err'); rearm(button); }
    else log(`killed task ${id}`, 'ok');
  } catch (err) {
    log(`kill ${id}: ${err.message}`, 'err');
    rearm(button);
  }
}

// Rows live on across snapshots, so a button a failed kill disabled must be re-armed
// here: no rebuild will do it.
function rearm(button) {
  if (button && button.isConnected) { button.disabled = false; button.textContent = 'kill'; }
}

function killButton(id) {
  const b = document.createElement('button');
  b.className = 'btn kill';
  b.textContent = 'kill';
  b.dataset.kill = String(id);
  b.dataset.testid = 'task-kill';
  b.title = `kill task ${id}`;
  return b;
}

for (const tbodyId of ['tasks-body', 'top-body']) {
  $(tbodyId).addEventListener('click', (e) => {
    const b = e.target.closest('button[data-kill]');
    if (b) kill(b.dataset.kill, b);
  });
}

function fmtBytes(b) {
  if (!b) return '–';
  if (b < 1 << 20) return `${Math.ceil(b / 1024)} KiB`;
  if (b < 1 << 30) return `${(b / (1 << 20)).toFixed(1)} MiB`;
  return `${(b / (1 << 30)).toFixed(2)} GiB`;
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

// Both tables are refreshed four times a second, and a person's press and release
// are some 100 ms apart: a refresh between them that replaced or moved the row under
// the pointer sent the release elsewhere and lost the click. So rows are keyed by task
// id and updated in place, and while a table is *held* (the pointer over it or pressed
// in it, or the keyboard focus inside it) nothing in it moves: rows keep their places,
// a row whose task has ended stays, marked ended, so that the next row does not slide
// under the pointer, and new rows are only added at the bottom. The order catches up
// with the next snapshot after the pointer leaves.
function holdable(el) {
  const h = { pointer: false, pressed: false, focus: false };
  el.addEventListener('pointerenter', () => { h.pointer = true; });
  el.addEventListener('pointerleave', () => { h.pointer = false; });
  el.addEventListener('pointerdown', () => { h.pressed = true; });
  // The release may land outside the table; a re-render on it could still beat the
  // click event, so the order catches up with the next snapshot instead.
  window.addEventListener('pointerup', () => { h.pressed = false; });
  window.addEventListener('pointercancel', () => { h.pressed = false; });
  el.addEventListener('focusin', () => { h.focus = true; });
  el.addEventListener('focusout', (e) => { if (!el.contains(e.relatedTarget)) h.focus = false; });
  return () => h.pointer || h.pressed || h.focus;
}

/**
 * Puts the rows of `wanted` (task ids, in order) into `body`. `rows` maps a task id
 * to its row (`{ tr }` and whatever `make` adds); `live` maps a task id to its task.
 * While `held`, see above; `heldMax` bounds the rows kept then.
 */
function reconcile(body, rows, wanted, live, held, heldMax, { make, update, ended }) {
  let order = wanted;
  if (held) {
    order = [...body.children].map((tr) => tr.twId).filter((id) => rows.has(id));
    const placed = new Set(order);
    for (const id of wanted) {
      if (order.length >= heldMax) break;
      if (!placed.has(id)) order.push(id);
    }
  }
  const keep = new Set(order);
  for (const [id, r] of rows) if (!keep.has(id)) { r.tr.remove(); rows.delete(id); }
  let prev = null;
  for (const id of order) {
    let r = rows.get(id);
    const t = live.get(id);
    if (!r) {
      if (!t) continue;
      r = make(t);
      r.tr.twId = id;
      rows.set(id, r);
    }
    if (t) update(r, t); else ended(r);
    const want = prev ? prev.nextSibling : body.firstChild;
    if (want !== r.tr) body.insertBefore(r.tr, want);
    prev = r.tr;
  }
}

function markEnded(tr) {
  if (tr.dataset.state === 'ended') return;
  tr.dataset.state = 'ended';
  tr.classList.add('ended');
  tr.classList.remove('hot');
  const b = tr.querySelector('button[data-kill]');
  if (b) { b.disabled = true; b.textContent = 'ended'; }
}

const TOP_ROWS = 6;
const topRows = new Map();
const topHeld = holdable($('top'));

function makeTopRow(t) {
  const tr = document.createElement('tr');
  tr.dataset.testid = 'top-row';
  tr.dataset.taskId = String(t.id);
  tr.innerHTML = '<td class="num"></td><td class="method"></td><td class="num"></td>'
    + '<td class="num"><span class="cpu-bar"></span><span></span></td><td class="num"></td><td></td>';
  const c = tr.children;
  c[5].append(killButton(t.id));
  return { tr, id: c[0], method: c[1], conn: c[2], bar: c[3].firstChild, now: c[3].lastChild, total: c[4] };
}

function updateTopRow(r, t) {
  const pct = (cpuRate.get(t.id) ?? 0) * 100;
  r.tr.dataset.method = t.method;
  setText(r.id, String(t.id));
  setText(r.method, t.method + (t.notYielding ? ' ⚠' : ''));
  setText(r.conn, String(t.conn));
  const width = `${Math.max(1, Math.min(60, pct * 0.6))}px`;
  if (r.bar.style.width !== width) r.bar.style.width = width;
  setText(r.now, `${pct < 10 ? pct.toFixed(1) : Math.round(pct)}%`);
  setText(r.total, fmtDuration(t.cpuMs));
}

function renderTop(tasks) {
  const live = new Map(tasks.map((t) => [t.id, t]));
  const wanted = tasks
    .map((t) => ({ t, rate: cpuRate.get(t.id) ?? 0 }))
    .filter((x) => x.rate > 0.001)
    .sort((a, b) => b.rate - a.rate || b.t.cpuMs - a.t.cpuMs)
    .slice(0, TOP_ROWS)
    .map((x) => x.t.id);
  reconcile($('top-body'), topRows, wanted, live, topHeld(), 2 * TOP_ROWS, {
    make: makeTopRow,
    update: updateTopRow,
    ended: (r) => { markEnded(r.tr); setText(r.now, '–'); },
  });
  $('top-empty').hidden = topRows.size > 0;
}

// Keyed rows: update in place, so 500 rows at 4 Hz stay cheap.
const rows = new Map();

function progressOf(p) {
  if (p === null || p === undefined) return null;
  if (typeof p === 'number') return p <= 1 ? p : p / 100;
  if (typeof p === 'object' && Number.isFinite(p.done) && Number.isFinite(p.total) && p.total > 0) return p.done / p.total;
  return null;
}

function makeRow(t) {
  const tr = document.createElement('tr');
  tr.dataset.testid = 'task-row';
  tr.dataset.taskId = String(t.id);
  tr.innerHTML = '<td class="num"></td><td class="num"></td><td class="num"></td><td class="method"></td><td></td>'
    + '<td><span class="state"></span></td><td class="num"></td><td class="num" data-testid="task-cpu"></td>'
    + '<td class="num" data-testid="task-mem"></td>'
    + '<td class="prog"><div class="bar"><span></span></div><span class="bar-label"></span></td><td></td>';
  const c = tr.children;
  c[10].append(killButton(t.id));
  return {
    tr,
    id: c[0], conn: c[1], req: c[2], method: c[3], kind: c[4], state: c[5].firstChild, age: c[6], cpu: c[7], mem: c[8],
    prog: c[9], bar: c[9].querySelector('.bar'), fill: c[9].querySelector('.bar > span'), plabel: c[9].querySelector('.bar-label'),
  };
}

function updateRow(r, t) {
  r.tr.dataset.method = t.method;
  r.tr.dataset.state = t.state;
  r.tr.classList.toggle('hot', !!t.notYielding || !!t.memoryFlagged || (cpuRate.get(t.id) ?? 0) > 0.5);
  setText(r.id, String(t.id));
  setText(r.conn, String(t.conn));
  setText(r.req, t.requestId === null || t.requestId === undefined ? '–' : String(t.requestId));
  setText(r.method, t.method);
  setText(r.kind, t.kind);
  setText(r.state, t.state + (t.notYielding ? ' · not yielding' : '') + (t.memoryFlagged ? ' · memory' : ''));
  const cls = `state state-${t.state}`;
  if (r.state.className !== cls) r.state.className = cls;
  setText(r.age, fmtDuration(t.ageMs));
  r.cpu.dataset.cpuMs = String(t.cpuMs);
  setText(r.cpu, fmtDuration(t.cpuMs));
  // What the task holds (0 until the server runs the counting allocator).
  r.mem.dataset.memoryBytes = String(t.memoryBytes ?? 0);
  setText(r.mem, fmtBytes(t.memoryBytes ?? 0));
  const frac = progressOf(t.progress);
  if (frac === null) {
    r.bar.hidden = true;
    setText(r.plabel, t.progress === null || t.progress === undefined ? '' : JSON.stringify(t.progress).slice(0, 40));
  } else {
    r.bar.hidden = false;
    const pct = Math.max(0, Math.min(100, frac * 100));
    r.fill.style.width = `${pct}%`;
    r.prog.dataset.progress = String(pct);
    setText(r.plabel, `${pct.toFixed(0)}%`);
  }
}

const TASK_ROWS_HELD = 600;
const tasksHeld = holdable($('tasks'));

function renderTasks(tasks) {
  const q = $('task-filter').value.trim().toLowerCase();
  const shown = q
    ? tasks.filter((t) => `${t.id} ${t.method} ${t.state} ${t.kind} conn${t.conn} ${t.conn}`.toLowerCase().includes(q))
    : tasks;
  // Every live task, shown or not: a row held under the pointer is "ended" only when its task is.
  const live = new Map(tasks.map((t) => [t.id, t]));
  reconcile($('tasks-body'), rows, shown.map((t) => t.id), live, tasksHeld(), TASK_ROWS_HELD, {
    make: makeRow,
    update: updateRow,
    ended: (r) => markEnded(r.tr),
  });
  setText($('task-count'), String(tasks.length));
  $('tasks-empty').hidden = rows.size > 0;
}

// ------------------------------------------------------------------ what this server offers
/** Hides every control whose task the server does not have (`data-needs`):
 * the demo tasks (`spin`, `runaway`, `crash`) exist only on a server started
 * with `--demo`, and a server embedding taskwire may offer none of the built-ins. */
async function offerWhatTheServerHas(tw) {
  let names;
  try {
    const d = await tw.call('rpc.discover');
    names = new Set((d?.methods ?? []).map((m) => m.name));
  } catch (err) {
    log(`rpc.discover failed: ${describe(err)}; every button stays`, 'err');
    return;
  }
  for (const el of document.querySelectorAll('[data-needs]')) {
    const has = el.dataset.needs.split(' ').every((m) => names.has(m));
    el.hidden = !has;
    if (el.tagName === 'OPTION') el.disabled = !has;
  }
  const kind = $('load-kind');
  if (kind.selectedOptions[0]?.disabled) kind.value = [...kind.options].find((o) => !o.disabled)?.value ?? '';
  const demo = ['spin', 'runaway', 'crash'].every((m) => names.has(m));
  document.documentElement.dataset.demo = String(demo);
  $('demo-hint').hidden = demo;
}

// ------------------------------------------------------------------ start
setConnPill('connecting');
startAdminStream();
if (params.get('load')) setRate(params.get('load'));

const [probe, loadConn, actions] = await Promise.all([open('probe'), open('load'), open('actions')]);
watch(probe, 'probe');
watch(loadConn, 'load');
watch(actions, 'actions');
sessionPill(actions);
setConnPill(probe.state);
await offerWhatTheServerHas(actions);
startProbe();
startLoad();
wireActions();
if (params.get('load')) setLoadRunning(true);
log('connected: probe, load and actions connections are open', 'ok');

// For tests and curious users in the console.
window.taskwireDashboard = { conns, charts, load, setRate, setLoadRunning };
document.documentElement.dataset.ready = 'true';
