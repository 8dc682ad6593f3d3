// dashboard.js: the live taskwire dashboard served at `/`.
//
// Three WebSocket connections, so that each story is told on its own:
//   probe   - echoes 5×/s and charts the round trip (responsiveness)
//   load    - the steady synthetic load at a user-set rate (fairness)
//   actions - the buttons: N jobs, flood, runaway, crash
// plus the server's admin stream (/admin/events, Server-Sent Events) for the
// task table, the top view, the tasks/s and pool charts.

import { Taskwire, TaskwireError, ErrorCode } from './taskwire.js';
import { LineChart, formatNumber } from './chart.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// `?token=T` is sent on the WebSocket (client token) and to the admin API;
// `?admin_token=A` overrides the latter when the two differ.
const wsToken = params.get('token') || undefined;
const token = params.get('admin_token') || wsToken;
const tokenQs = token ? `?token=${encodeURIComponent(token)}` : '';
const adminHeaders = token ? { authorization: `Bearer ${token}` } : {};

const COLORS = { blue: '#2563eb', green: '#16a34a', red: '#dc2626', amber: '#d97706', violet: '#7c3aed' };

// ------------------------------------------------------------------ charts
const charts = {
  load: new LineChart($('chart-load'), {
    series: [{ label: 'completed/s', color: COLORS.green, fill: true }, { label: 'errors/s', color: COLORS.red }],
    unit: '/s', yMaxFloor: 10,
  }),
  latency: new LineChart($('chart-latency'), {
    series: [{ label: 'round trip', color: COLORS.blue, fill: true }],
    unit: 'ms', yMaxFloor: 5,
  }),
  tps: new LineChart($('chart-tps'), {
    series: [{ label: 'finished/s', color: COLORS.violet, fill: true }, { label: 'refused/s', color: COLORS.red }],
    unit: '/s', yMaxFloor: 10,
  }),
  pool: new LineChart($('chart-pool'), {
    series: [{ label: 'utilisation', color: COLORS.amber, fill: true }],
    unit: '%', yMax: 100,
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

async function open(name) {
  for (let delay = 250; ; delay = Math.min(delay * 2, 5000)) {
    try {
      // The actions connection opens a session: its tasks survive a dropped
      // connection and their results still arrive (see sessionPill).
      const tw = await Taskwire.connect(wsUrl, {
        token: wsToken, reconnect: { maxDelayMs: 5000 }, queueLimit: 50, session: name === 'actions',
      });
      conns[name] = tw;
      return tw;
    } catch (err) {
      if (name === 'probe') setConnPill('closed', `cannot connect: ${err.message}`);
      await new Promise((r) => setTimeout(r, delay));
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
    if (name === 'probe') setConnPill(e.detail.state);
  });
  tw.addEventListener('reconnecting', (e) => {
    if (name === 'probe') log(`connection lost (${e.detail.code}); reconnecting in ${e.detail.delayMs} ms`, 'err');
  });
  tw.addEventListener('open', (e) => {
    if (e.detail.reconnected && name === 'probe') log('reconnected', 'ok');
  });
}

// ------------------------------------------------------------------ responsiveness probe
const rtts = [];
function startProbe(tw) {
  let outstanding = 0;
  setInterval(() => {
    if (tw.state !== 'open' || outstanding >= 4) return;
    outstanding++;
    const t0 = performance.now();
    tw.call('echo', { value: t0 }).then(
      () => {
        const rtt = performance.now() - t0;
        charts.latency.push([rtt]);
        rtts.push(rtt);
        if (rtts.length > 25) rtts.shift();
        const sorted = [...rtts].sort((a, b) => a - b);
        $('kpi-rtt').textContent = `${formatNumber(sorted[Math.floor(sorted.length / 2)])} ms`;
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

function startLoad(tw) {
  let last = performance.now();
  setInterval(() => {
    const now = performance.now();
    const dt = (now - last) / 1000;
    last = now;
    if (!load.running || tw.state !== 'open') return;
    load.credit = Math.min(load.credit + load.rate * dt, Math.max(1, load.rate)); // never more than 1 s behind
    const job = LOAD_JOBS[$('load-kind').value] ?? LOAD_JOBS.spin2;
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

function wireActions(tw) {
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
    $('kpi-running').textContent = String(stats.tasks?.running ?? 0);
    $('kpi-queued').textContent = String((stats.tasks?.queued ?? 0));
    const util = Math.round((stats.pool?.utilisation ?? 0) * 100);
    $('kpi-pool').textContent = `${util}%`;
    const f = stats.finished ?? {};
    $('kpi-ok').textContent = formatNumber(f.ok ?? 0);
    $('kpi-crashed').textContent = formatNumber(f.crashed ?? 0);
    $('kpi-killed').textContent = formatNumber(f.killed ?? 0);
    $('kpi-refused').textContent = formatNumber(f.refused ?? 0);
    charts.pool.push([util], now);
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

function startAdminStream() {
  let gotSnapshot = false;
  let polling = null;
  const poll = async () => {
    const get = async (url) => {
      const r = await fetch(url, { headers: adminHeaders });
      if (!r.ok) throw new Error(r.status === 401 || r.status === 403 ? `admin: HTTP ${r.status}, add ?token=…` : `admin: HTTP ${r.status}`);
      return r.json();
    };
    try {
      const [s, t] = await Promise.all([
        get(`admin/stats${tokenQs}`),
        get(`admin/tasks?sort=cpu&limit=500${token ? `&token=${encodeURIComponent(token)}` : ''}`),
      ]);
      setAdminPill('open', 'admin (polling)');
      onSnapshot({ stats: s, tasks: t.tasks ?? [] });
    } catch (err) {
      setAdminPill('closed', err.message.startsWith('admin:') ? err.message : 'admin unreachable');
    }
  };
  const startPolling = () => {
    if (polling) return;
    polling = setInterval(poll, 500);
    poll();
  };
  if (typeof EventSource !== 'function') { startPolling(); return; }
  const es = new EventSource(`admin/events${tokenQs}`);
  es.addEventListener('open', () => setAdminPill('open', 'admin stream'));
  es.addEventListener('snapshot', (e) => {
    gotSnapshot = true;
    if (polling) { clearInterval(polling); polling = null; }
    setAdminPill('open', 'admin stream');
    try { onSnapshot(JSON.parse(e.data)); } catch (err) { console.error('bad snapshot', err); }
  });
  es.addEventListener('error', () => {
    if (es.readyState === EventSource.CLOSED) {
      setAdminPill('closed', 'admin stream closed');
      startPolling();
    } else {
      setAdminPill('connecting', 'admin stream…');
    }
  });
  // A server without the stream: fall back to polling the JSON endpoints.
  setTimeout(() => { if (!gotSnapshot) startPolling(); }, 3000);
}

async function kill(id, button) {
  if (button) { button.disabled = true; button.textContent = 'killing…'; }
  try {
    const r = await fetch(`admin/tasks/${encodeURIComponent(id)}/kill${tokenQs}`, { method: 'POST', headers: adminHeaders });
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
startProbe(probe);
startLoad(loadConn);
wireActions(actions);
if (params.get('load')) setLoadRunning(true);
log('connected: probe, load and actions connections are open', 'ok');

// For tests and curious users in the console.
window.taskwireDashboard = { conns, charts, load, setRate, setLoadRunning };
document.documentElement.dataset.ready = 'true';
