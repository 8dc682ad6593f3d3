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

async function poll() {
  try {
    const r = await fetch('admin/cluster', { headers: headers(), cache: 'no-store' });
    if (!r.ok) return;
    const c = await r.json();
    if (!c.node) return; // not in a cluster: no card
    const el = card();
    el.querySelector('#cluster-status').textContent = c.natsConnected
      ? `node ${c.node} · NATS connected · ${c.peers.length} peer(s)`
      : `node ${c.node} · NATS unreachable: serving alone`;
    el.querySelector('#cluster-peers').innerHTML = c.peers.length
      ? c.peers.map((p) => `<b>${esc(p.node)}</b> ${esc(p.spare)}/${esc(p.workers)} spare, ${esc(p.queued)} queued`).join(' · ')
      : 'no peer heard';
    const t = await fetch('admin/cluster/tasks', { headers: headers(), cache: 'no-store' });
    if (!t.ok) return;
    const { tasks = [], unreachable = [] } = await t.json();
    el.querySelector('#cluster-body').innerHTML = tasks.slice(0, 500).map((x) => `<tr>
      <td>${esc(x.qid)}</td><td>${esc(x.node)}</td><td>${esc(x.method)}</td><td>${esc(x.state)}</td>
      <td class="num">${Number(x.cpuMs ?? 0).toFixed(1)}</td><td>${esc(x.runsOn ?? '')}</td>
      <td><button type="button" data-kill="${esc(x.qid)}">kill</button></td></tr>`).join('')
      + (unreachable.length ? `<tr><td colspan="7">unreachable: ${unreachable.map(esc).join(', ')}</td></tr>` : '');
  } catch { /* the next poll tries again */ }
}

poll();
setInterval(poll, 1000);
