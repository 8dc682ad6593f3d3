// The sessions card: every session the server keeps (attached or detached,
// since when, what it keeps buffered, its tasks), with a button that ends one
// (`POST admin/sessions/{id}/end`: its tasks are killed, its kept responses
// freed, its token refused from then on). It reads the admin API with the
// dashboard's own admin headers, so ending a session takes exactly the access
// killing a task takes.
//
// Self-contained: the page gives it an empty element, the headers and a log.

const POLL_MS = 1000;
/** At most this many rows (the store's own bounds are far larger). */
const MAX_ROWS = 200;

function fmtBytes(b) {
  if (!b) return '–';
  if (b < 1 << 20) return `${Math.ceil(b / 1024)} KiB`;
  return `${(b / (1 << 20)).toFixed(1)} MiB`;
}

function fmtSince(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function setText(el, text) { if (el.textContent !== text) el.textContent = text; }

/**
 * Fills `el` with the card and keeps it current.
 * @param {HTMLElement} el
 * @param {{ headers: () => Record<string, string>, log: (text: string, kind?: string) => void }} opts
 */
export function mountSessionsCard(el, { headers, log }) {
  el.innerHTML = `
    <div class="card-head">
      <h2 id="sessions-h">Sessions</h2>
      <span class="hint">a session keeps its tasks running and their answers while its client is away, for its window; ending one kills its tasks</span>
      <span class="stat"><b data-testid="sessions-count">0</b> open, <b data-testid="sessions-detached">0</b> detached</span>
    </div>
    <div class="tbl-wrap">
      <table class="tbl" data-testid="sessions">
        <thead><tr><th class="num">session</th><th>state</th><th class="num">since</th><th class="num">conn</th><th>peer</th>
          <th class="num">kept answers</th><th class="num">kept bytes</th><th class="num">tasks</th><th></th></tr></thead>
        <tbody></tbody>
      </table>
    </div>
    <p class="hint" data-testid="sessions-empty">no sessions</p>`;
  const body = el.querySelector('tbody');
  const empty = el.querySelector('[data-testid="sessions-empty"]');
  const rows = new Map();

  function makeRow(s) {
    const tr = document.createElement('tr');
    tr.dataset.testid = 'session-row';
    tr.dataset.sessionId = String(s.id);
    tr.innerHTML = '<td class="num"></td><td><span class="state"></span></td><td class="num"></td><td class="num"></td><td></td>'
      + '<td class="num"></td><td class="num"></td><td class="num"></td><td></td>';
    const b = document.createElement('button');
    b.className = 'btn kill';
    b.textContent = 'end';
    b.dataset.testid = 'session-end';
    b.title = `end session ${s.id}: its tasks are killed`;
    b.addEventListener('click', () => end(s.id, b));
    tr.children[8].append(b);
    const c = tr.children;
    return { tr, id: c[0], state: c[1].firstChild, since: c[2], conn: c[3], peer: c[4], resp: c[5], bytes: c[6], tasks: c[7] };
  }

  function update(r, s, now) {
    r.tr.dataset.state = s.state;
    setText(r.id, String(s.id));
    setText(r.state, s.state);
    r.state.className = `state ${s.state === 'detached' ? 'state-waiting' : 'state-running'}`;
    setText(r.since, fmtSince(now - (s.detachedAtMs ?? s.openedAtMs)));
    r.since.title = s.state === 'detached' ? 'since it detached' : 'since it opened';
    setText(r.conn, s.conn === null || s.conn === undefined ? '–' : String(s.conn));
    setText(r.peer, s.peer);
    setText(r.resp, String(s.bufferedResponses));
    setText(r.bytes, fmtBytes(s.bufferedBytes));
    setText(r.tasks, String(s.tasks));
  }

  function render(list) {
    const now = Date.now();
    const shown = list.slice(0, MAX_ROWS);
    const keep = new Set(shown.map((s) => s.id));
    for (const [id, r] of rows) if (!keep.has(id)) { r.tr.remove(); rows.delete(id); }
    for (const s of shown) {
      let r = rows.get(s.id);
      if (!r) { r = makeRow(s); rows.set(s.id, r); body.append(r.tr); }
      update(r, s, now);
    }
    empty.hidden = shown.length > 0;
    setText(el.querySelector('[data-testid="sessions-count"]'), String(list.length));
    setText(el.querySelector('[data-testid="sessions-detached"]'), String(list.filter((s) => s.state === 'detached').length));
  }

  async function end(id, button) {
    button.disabled = true;
    button.textContent = 'ending…';
    try {
      const r = await fetch(`admin/sessions/${encodeURIComponent(id)}/end`, { method: 'POST', headers: headers() });
      if (r.status === 404) log(`session ${id} was already gone`, 'err');
      else if (!r.ok) { log(`end session ${id}: HTTP ${r.status}`, 'err'); button.disabled = false; button.textContent = 'end'; return; }
      else log(`ended session ${id}: its tasks are killed`, 'ok');
      poll();
    } catch (err) {
      log(`end session ${id}: ${err.message}`, 'err');
      button.disabled = false;
      button.textContent = 'end';
    }
  }

  let timer = null;
  async function poll() {
    clearTimeout(timer);
    try {
      const r = await fetch('admin/sessions', { headers: headers(), cache: 'no-store' });
      // A server built without sessions (404), or no admin access yet (the
      // rest of the page asks for the token): the card stays as it is.
      if (r.ok) render((await r.json()).sessions ?? []);
    } catch { /* the admin stream's pill tells of an unreachable server */ }
    timer = setTimeout(poll, POLL_MS);
  }
  poll();
  return { refresh: poll };
}
