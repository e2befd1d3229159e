"""The pages' stylesheet and scripts, inlined into every page so a static copy needs no server."""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { background: #243044; color: #fff; padding: .6em 1.2em; }
header a { color: #cfe0ff; margin-right: 1em; text-decoration: none; }
main { padding: 1em 1.5em; }
h1 { font-size: 1.4em; margin: .3em 0; } h2 { font-size: 1.15em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0; background: #fff; }
th, td { border: 1px solid #d6d6d6; padding: 3px 7px; text-align: left; vertical-align: top; }
th { background: #eef1f5; }
th.sortable { cursor: pointer; user-select: none; }
th.sortable[data-dir="asc"]::after { content: " ▲"; }
th.sortable[data-dir="desc"]::after { content: " ▼"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.detector td:first-child { font-weight: bold; }
.state { font-weight: bold; }
.bar { display: inline-block; width: 120px; height: 10px; background: #e3e3e3; }
.bar span { display: block; height: 100%; background: #4a78b5; }
.filters { display: flex; flex-wrap: wrap; gap: .8em; align-items: center; margin: .5em 0; }
.pager { margin: .4em 0; } .pager button { margin-right: .4em; }
.exemplars { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr));
             gap: .8em; }
figure.exemplar { margin: 0; background: #fff; border: 1px solid #ddd; padding: .4em; }
figure.exemplar img { width: 120px; height: 120px; image-rendering: pixelated;
                      margin-right: 6px; }
figure.exemplar figcaption { font-size: .8em; color: #555; }
.legend span { padding: 0 .4em; margin-right: .6em; border-bottom: 3px solid; }
img.plot { max-width: 100%; background: #fff; }
pre { background: #f2f2f2; padding: .8em; overflow-x: auto; }
.muted { color: #777; }
"""

# The layer table: rows from the page's JSON, filtered, sorted and shown a page at a time.
LAYER_SCRIPT = """
const data = JSON.parse(document.getElementById('units').textContent);
const simMethods = data.simulation, PAGE = 100;
const unitHref = (unit) => encodeURIComponent(`unit-${data.layer}-${unit}.html`);
const rows = data.rows.map((values) => {
  const row = {};
  data.fields.forEach((name, i) => { row[name] = values[i]; });
  row.sim = Object.fromEntries(simMethods.map((m, i) => [m, row.sim[i]]));
  row.href = unitHref(row.unit);
  row.text = [row.label, row.formula, row.clip, row.linear, row.caption].join(' | ')
    .toLowerCase();
  return row;
});
let sortKey = 'unit', sortDir = 1, page = 0, shown = rows;
const $ = (id) => document.getElementById(id);
const esc = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const num = (v) => (v === null || v === undefined) ? '' : Number(v).toFixed(3);
function value(row, key) {
  if (!key.startsWith('sim:')) return row[key];
  const v = row.sim[key.slice(4)];
  return v === undefined ? null : v;
}
function render() {
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  page = Math.min(page, pages - 1);
  const slice = shown.slice(page * PAGE, (page + 1) * PAGE);
  $('rows').innerHTML = slice.map((r) => `<tr class="${r.detector ? 'detector' : ''}">`
    + `<td class=num><a href="${esc(r.href)}">${r.unit}</a></td>`
    + `<td>${esc(r.label)}</td><td>${esc(r.category)}</td><td class=num>${num(r.iou)}</td>`
    + `<td>${r.detector ? 'yes' : ''}</td><td>${esc(r.formula)}</td>`
    + `<td class=num>${num(r.formula_iou)}</td><td>${esc(r.clip)}</td>`
    + `<td class=num>${num(r.clip_score)}</td><td>${esc(r.linear)}</td>`
    + `<td class=num>${num(r.linear_corr)}</td><td>${esc(r.caption)}</td>`
    + `<td class=num>${r.sig_p == null ? '' : Number(r.sig_p).toExponential(1)}`
    + `${r.significant ? ' ✓' : ''}</td>`
    + simMethods.map((m) => `<td class=num>${num(r.sim[m])}</td>`).join('') + '</tr>').join('');
  $('count').textContent = `${shown.length} of ${rows.length} units`;
  $('page').textContent = `page ${page + 1} of ${pages}`;
  $('prev').disabled = page === 0;
  $('next').disabled = page >= pages - 1;
}
function apply() {
  const words = $('text').value.toLowerCase().split(/\\s+/).filter((w) => w);
  const category = $('category').value, method = $('method').value;
  const detectors = $('detectors').checked, minIou = parseFloat($('min-iou').value) || 0;
  const significant = $('significant').checked;
  shown = rows.filter((r) => (!detectors || r.detector)
    && (!significant || r.significant)
    && (!category || r.category === category)
    && (!method || r.methods.includes(method))
    && (r.iou === null ? minIou <= 0 : r.iou >= minIou)
    && words.every((w) => r.text.includes(w)));
  shown.sort((a, b) => {
    const x = value(a, sortKey), y = value(b, sortKey);
    if (x === y) return a.unit - b.unit;
    if (x === null || x === '') return 1;
    if (y === null || y === '') return -1;
    return (x < y ? -1 : 1) * sortDir;
  });
  render();
}
document.querySelectorAll('th.sortable').forEach((th) => th.addEventListener('click', () => {
  const key = th.dataset.key;
  sortDir = key === sortKey ? -sortDir : (th.classList.contains('numeric') ? -1 : 1);
  sortKey = key;
  document.querySelectorAll('th.sortable').forEach((other) => other.removeAttribute('data-dir'));
  th.dataset.dir = sortDir > 0 ? 'asc' : 'desc';
  page = 0; apply();
}));
['text', 'category', 'method', 'detectors', 'significant', 'min-iou'].forEach(
  (id) => $(id).addEventListener('input', () => { page = 0; apply(); }));
$('prev').addEventListener('click', () => { page -= 1; render(); });
$('next').addEventListener('click', () => { page += 1; render(); });
apply();
document.body.dataset.readyMs = Math.round(performance.now());
document.body.dataset.ready = '1';
"""

# Search: every unit of every layer of the job, matched on all the words typed.
SEARCH_SCRIPT = """
const index = JSON.parse(document.getElementById('index').textContent).map(
  ([layer, unit, answers]) => ({
    layer, unit, answers, text: answers.join(' | ').toLowerCase(),
    href: encodeURIComponent(`unit-${layer}-${unit}.html`),
  }));
const LIMIT = 200;
const esc = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
const box = document.getElementById('query');
function search() {
  const words = box.value.toLowerCase().split(/\\s+/).filter((w) => w);
  const hits = words.length ? index.filter((u) => words.every((w) => u.text.includes(w))) : [];
  document.getElementById('hits').innerHTML = hits.slice(0, LIMIT).map((u) =>
    `<tr><td>${esc(u.layer)}</td><td class=num><a href="${esc(u.href)}">${u.unit}</a></td>`
    + `<td>${u.answers.map(esc).join('<br>')}</td></tr>`).join('');
  document.getElementById('found').textContent = words.length
    ? `${hits.length} units` + (hits.length > LIMIT ? ` (first ${LIMIT} shown)` : '') : '';
  history.replaceState(null, '', '?q=' + encodeURIComponent(box.value));
}
box.value = new URLSearchParams(location.search).get('q') || '';
box.addEventListener('input', search);
search();
document.body.dataset.ready = '1';
"""

# The live jobs list: refreshed from the server's JSON every two seconds.
JOBS_SCRIPT = """
const esc = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
function row(job) {
  const stages = job.stages.map((s) => `<div>${esc(s.stage)} `
    + `<span class=bar><span style="width:${(100 * s.fraction).toFixed(1)}%"></span></span> `
    + `${s.done}/${s.total} ${esc(s.unit)}</div>`).join('');
  return `<tr><td><a href="${esc(job.href)}">${esc(job.id)}</a></td><td>${esc(job.name)}</td>`
    + `<td class=state>${esc(job.state)}</td><td>${stages}</td><td>${esc(job.eta)}</td>`
    + `<td>${esc(job.created)}</td></tr>`;
}
async function refresh() {
  try {
    const response = await fetch('api/jobs.json', {cache: 'no-store'});
    if (response.ok) {
      const jobs = await response.json();
      document.getElementById('jobs').innerHTML = jobs.map(row).join('');
    }
  } finally {
    setTimeout(refresh, 2000);
  }
}
setTimeout(refresh, 2000);
document.body.dataset.ready = '1';
"""
