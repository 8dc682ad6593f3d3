// wasm-card.js: the dashboard's WebAssembly card, self-contained.
//
// Lists the installed modules (admin/wasm), installs one from a file picker
// (PUT admin/wasm/NAME: a hot fix needs no restart), removes one, and runs a
// module's task on a connection of its own, so that a stuck module can be
// found in the task table, killed there, and replaced by a fixed one while
// the steady load goes on.

import { Taskwire, TaskwireError } from './taskwire.js';

const $ = (id) => document.getElementById(id);
// The tokens as dashboard.js keeps them (taken from the page's fragment into
// this tab's sessionStorage): the admin API gets `Authorization: Bearer`, the
// WebSocket the `taskwire_token` cookie dashboard.js sets for the `ws` path.
const stored = (k) => { try { return sessionStorage.getItem(k) || undefined; } catch { return undefined; } };
const adminHeaders = () => {
  const token = stored('taskwire.adminToken') || stored('taskwire.token');
  return token ? { authorization: `Bearer ${token}` } : {};
};
const REFRESH_MS = 2000;

let conn;
async function connection() {
  conn ??= await Taskwire.connect(new URL('ws', location.href).toString(), { reconnect: { maxDelayMs: 5000 } });
  return conn;
}

function say(text, bad = false) {
  const s = $('wasm-status');
  s.textContent = text;
  s.classList.toggle('bad', bad);
}

const short = (hex) => (hex ? hex.slice(0, 12) : '');
const kib = (n) => `${(n / 1024).toFixed(1)} KiB`;

function cell(text, cls) {
  const td = document.createElement('td');
  td.textContent = text;
  if (cls) td.className = cls;
  return td;
}

function button(label, testid, onClick) {
  const b = document.createElement('button');
  b.type = 'button';
  b.textContent = label;
  b.dataset.testid = testid;
  b.addEventListener('click', onClick);
  return b;
}

async function run(name) {
  say(`running ${name}…`);
  try {
    const tw = await connection();
    const result = await tw.call(name, {});
    say(`${name} answered ${JSON.stringify(result)}`);
  } catch (err) {
    say(`${name}: ${err instanceof TaskwireError ? `${err.code} ${err.message}` : err.message}`, true);
  }
}

async function remove(name) {
  const r = await fetch(`admin/wasm/${encodeURIComponent(name)}`, { method: 'DELETE', headers: adminHeaders() });
  say(r.ok ? `${name} removed` : `remove ${name}: HTTP ${r.status}`, !r.ok);
  refresh();
}

function render(modules) {
  const body = $('wasm-body');
  body.replaceChildren(...modules.map((m) => {
    const tr = document.createElement('tr');
    tr.dataset.module = m.name;
    tr.append(
      cell(m.name), cell(short(m.sha256), 'mono'), cell(kib(m.size), 'num'),
      cell(`${Math.round(m.memoryLimitBytes / 1048576)} MiB`, 'num'), cell(String(m.running), 'num'),
    );
    const actions = document.createElement('td');
    actions.append(button('run', `wasm-run-${m.name}`, () => run(m.name)), ' ',
      button('remove', `wasm-remove-${m.name}`, () => remove(m.name)));
    tr.append(actions);
    return tr;
  }));
  $('wasm-empty').hidden = modules.length > 0;
}

async function refresh() {
  try {
    const r = await fetch('admin/wasm', { headers: adminHeaders(), cache: 'no-store' });
    if (!r.ok) throw new Error(r.status === 401 || r.status === 403 ? `admin: HTTP ${r.status}, open the page with #admin_token=…` : `HTTP ${r.status}`);
    render((await r.json()).modules);
  } catch (err) {
    say(`modules: ${err.message}`, true);
  }
}

async function install(ev) {
  ev.preventDefault();
  const file = $('wasm-file').files[0];
  if (!file) return say('pick a .wasm or .wat file first', true);
  const name = $('wasm-name').value.trim() || file.name.replace(/\.(wasm|wat)$/, '');
  say(`installing ${name}…`);
  const r = await fetch(`admin/wasm/${encodeURIComponent(name)}`, {
    method: 'PUT', headers: { ...adminHeaders(), 'content-type': 'application/wasm' }, body: await file.arrayBuffer(),
  });
  const body = await r.json().catch(() => ({}));
  if (r.ok) say(`${name} installed (sha256 ${short(body.sha256)}…): new calls run it, running ones finish on the old code`);
  else say(`install ${name}: ${body.error ?? `HTTP ${r.status}`}`, true);
  refresh();
}

$('wasm-form').addEventListener('submit', install);
refresh();
setInterval(refresh, REFRESH_MS);
