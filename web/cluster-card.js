// The cluster card: shown only when the server is a node of a cluster
// (`GET admin/cluster` names a node). It says whether NATS is connected (a
// node cut off serves alone, and says so here), lists the peers, and every
// node's tasks with node-qualified ids (`b/17`): a kill button works for a
// task on any node. Polled once a second; a self-contained module so that
// the dashboard's own code does not change.

const headers = () => {
  let t;
  try { t = sessionStorage.getItem('taskwire.adminToken') || undefined; } catch { t = undefined; }
  return t ? { authorization: `Bearer ${t}` } : {};
};

const esc = (s) => String(s ?? '').replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);

function card() {
  let el = document.getElementById('cluster-card');
  if (el) return el;
  el = document.createElement('section');
  el.className = 'card wide';
  el.id = 'cluster-card';
  el.dataset.testid = 'cluster-card';
  el.innerHTML = `
    <div class="card-head">
      <h2 id="cluster-h">Cluster</h2>
      <span class="hint" id="cluster-status" data-testid="cluster-status"></span>
    </div>
    <p id="cluster-peers" data-testid="cluster-peers"></p>
    <div class="tbl-wrap">
      <table class="tbl" data-testid="cluster-tasks">
        <thead><tr><th>task</th><th>node</th><th>method</th><th>state</th><th class="num">CPU ms</th><th>runs on</th><th></th></tr></thead>
        <tbody id="cluster-body"></tbody>
      </table>
    </div>`;
  const anchor = document.getElementById('tasks-card');
  (anchor?.parentNode ?? document.body).insertBefore(el, anchor?.nextSibling ?? null);
  el.addEventListener('click', async (ev) => {
    const qid = ev.target?.dataset?.kill;
    if (!qid) return;
    const [node, id] = qid.split('/');
    await fetch(`admin/tasks/${encodeURIComponent(node)}/${encodeURIComponent(id)}/kill`, { method: 'POST', headers: headers() });
  });
  return el;
}

// Rows are kept by node-qualified id and updated in place: a poll that
// replaced them between a person's press and release of a kill button would
// send the release to another element, and the click would be lost.
function render(body, tasks, unreachable) {
  const rows = new Map([...body.querySelectorAll('tr[data-qid]')].map((r) => [r.dataset.qid, r]));
  let prev = null;
  for (const x of tasks) {
    const qid = String(x.qid ?? '');
    let row = rows.get(qid);
    rows.delete(qid);
    if (!row) {
      row = document.createElement('tr');
      row.dataset.testid = 'cluster-row';
      row.dataset.qid = qid;
      row.innerHTML = '<td></td><td></td><td></td><td></td><td class="num"></td><td></td>'
        + `<td><button type="button" class="btn kill" data-testid="cluster-kill" data-kill="${esc(qid)}" title="kill task ${esc(qid)}">kill</button></td>`;
    }
    const cells = [qid, x.node, x.method, x.state, Number(x.cpuMs ?? 0).toFixed(1), x.runsOn ?? ''];
    cells.forEach((v, i) => {
      const text = String(v ?? '');
      if (row.cells[i].textContent !== text) row.cells[i].textContent = text;
    });
    row.dataset.node = String(x.node ?? '');
    row.dataset.runsOn = String(x.runsOn ?? '');
    // Moved only when out of place, so that a row under the pointer stays put.
    const want = prev ? prev.nextSibling : body.firstChild;
    if (want !== row) body.insertBefore(row, want);
    prev = row;
  }
  for (const r of rows.values()) r.remove();
  let note = body.querySelector('tr[data-testid="cluster-unreachable"]');
  if (unreachable.length) {
    if (!note) {
      note = document.createElement('tr');
      note.dataset.testid = 'cluster-unreachable';
      note.innerHTML = '<td colspan="7"></td>';
    }
    note.cells[0].textContent = `unreachable: ${unreachable.join(', ')}`;
    body.appendChild(note);
  } else {
    note?.remove();
  }
}

async function poll() {
  try {
    const r = await fetch('admin/cluster', { headers: headers(), cache: 'no-store' });
    if (!r.ok) return;
    const c = await r.json();
    if (!c.node) return; // not in a cluster: no card
    const el = card();
    el.querySelector('#cluster-status').dataset.connected = String(Boolean(c.natsConnected));
    el.querySelector('#cluster-status').textContent = c.natsConnected
      ? `node ${c.node} · NATS connected · ${c.peers.length} peer(s)`
      : `node ${c.node} · NATS unreachable: serving alone`;
    el.querySelector('#cluster-peers').innerHTML = c.peers.length
      ? c.peers.map((p) => `<span data-testid="cluster-peer" data-node="${esc(p.node)}"><b>${esc(p.node)}</b> ${esc(p.spare)}/${esc(p.workers)} spare, ${esc(p.queued)} queued</span>`).join(' · ')
      : 'no peer heard';
    const t = await fetch('admin/cluster/tasks', { headers: headers(), cache: 'no-store' });
    if (!t.ok) return;
    const { tasks = [], unreachable = [] } = await t.json();
    render(el.querySelector('#cluster-body'), tasks.slice(0, 500), unreachable);
  } catch { /* the next poll tries again */ }
}

poll();
setInterval(poll, 1000);
