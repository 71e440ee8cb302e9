// The live feed of one session, from /v2/sessions/{name}/watch (a temporary slot of
// this viewer's own; the session's consumer is unaffected). Newest change on top.

import { $, h, show } from './dom.js';
import { api, wsUrl } from './api.js';

const MAX_ROWS = 1000;      // rows kept in the DOM
const MAX_PAUSED = 5000;    // changes buffered while paused
const SPARK_SECONDS = 30;
const KIND_NAMES = { I: 'insert', U: 'update', D: 'delete', T: 'truncate', M: 'message', DDL: 'ddl' };

export class Feed {
  constructor() {
    this.socket = null;
    this.session = null;
    this.paused = false;
    this.buffer = [];
    this.dropped = 0;
    this.tables = new Set();
    this.keyNames = new Map();   // table -> key column names, learned from identities
    this.perSecond = new Array(SPARK_SECONDS).fill(0);
    this.txTime = null;
    $('#pause').addEventListener('click', () => this.togglePause());
    $('#clear').addEventListener('click', () => { $('#feed tbody').replaceChildren(); this.updateEmpty(); });
    $('#filter-table').addEventListener('change', () => this.applyFilters());
    $('#filter-kinds').addEventListener('change', () => this.applyFilters());
    setInterval(() => this.tick(), 1000);
  }

  watch(session) {
    this.stop();
    this.session = session.name;
    this.tables = new Set();
    $('#filter-table').replaceChildren(h('option', { value: '' }, 'all'));
    $('#feed tbody').replaceChildren();
    this.perSecond.fill(0);
    this.buffer = [];
    this.dropped = 0;
    this.connect();
  }

  stop() {
    if (this.socket) {
      this.socket.onclose = null;
      this.socket.close(1000, 'viewer switched session');
      this.socket = null;
    }
  }

  async connect() {
    const name = this.session;
    this.status(`connecting to ${name}…`, '');
    // A browser does not show why a websocket upgrade was refused: ask over HTTP first
    // (this also asks for a token when one is needed).
    try {
      await api('GET', `/v2/sessions/${encodeURIComponent(name)}`);
    } catch (e) {
      this.status(`cannot watch: ${e.message}`, 'bad');
      return;
    }
    if (this.session !== name || this.socket) return;
    const socket = new WebSocket(wsUrl(`/v2/sessions/${encodeURIComponent(name)}/watch`));
    this.socket = socket;
    socket.onopen = () => this.status(`watching ${name}`, 'ok');
    socket.onmessage = (e) => this.onMessage(e.data);
    socket.onclose = (e) => {
      if (this.socket !== socket) return;
      this.socket = null;
      const why = e.reason || (e.code === 1006 ? 'refused (too many viewers?) or lost; retrying' : `code ${e.code}`);
      this.status(`stopped: ${why}`, 'bad');
      // A lost connection comes back; a dropped session or a full house does not.
      if (e.code === 1001 || e.code === 1006) {
        setTimeout(() => { if (this.session === name && !this.socket) this.connect(); }, 3000);
      }
    };
  }

  status(text, kind) {
    const el = $('#feed-status');
    el.textContent = text;
    el.className = `pill ${kind}`;
  }

  onMessage(data) {
    let rec;
    try { rec = JSON.parse(data); } catch { return; }
    if (rec.error) { this.status(`error: ${rec.error}`, 'bad'); return; }
    const now = new Date();
    if (rec.action === 'B') { this.txTime = rec.timestamp ? new Date(rec.timestamp) : null; return; }
    if (rec.action === 'C') { this.txTime = null; return; }
    if (!KIND_NAMES[rec.action]) return;
    this.perSecond[this.perSecond.length - 1] += 1;
    const change = { rec, time: this.txTime || now };
    if (this.paused) {
      this.buffer.push(change);
      if (this.buffer.length > MAX_PAUSED) { this.buffer.shift(); this.dropped += 1; }
      $('#pause').textContent = `Resume (${this.buffer.length} waiting${this.dropped ? `, ${this.dropped} dropped` : ''})`;
      return;
    }
    this.add(change);
  }

  add({ rec, time }) {
    const body = $('#feed tbody');
    body.prepend(this.row(rec, time));
    while (body.childElementCount > MAX_ROWS) body.lastElementChild.remove();
    this.updateEmpty();
  }

  row(rec, time) {
    const table = rec.table ? `${rec.schema}.${rec.table}` : (rec.prefix !== undefined ? `message: ${rec.prefix}` : '');
    if (rec.table && !this.tables.has(table)) {
      this.tables.add(table);
      $('#filter-table').append(h('option', { value: table }, table));
    }
    const identity = Array.isArray(rec.identity) ? rec.identity : [];
    const columns = Array.isArray(rec.columns) ? rec.columns : [];
    if (rec.pk) this.keyNames.set(table, rec.pk.map((c) => c.name));
    // An identity of fewer columns than the row is its key (an index); a whole old row
    // (REPLICA IDENTITY FULL) names no key.
    else if (identity.length && columns.length && identity.length < columns.length) {
      this.keyNames.set(table, identity.map((c) => c.name));
    }
    const { key, keyTitle } = this.key(rec, table, columns, identity);
    const tr = h('tr', { 'data-table': table, 'data-kind': rec.action, class: `k-${rec.action}` },
      h('td', { class: 'time', title: time.toISOString() }, time.toLocaleTimeString(undefined, { hour12: false }) + `.${String(time.getMilliseconds()).padStart(3, '0')}`),
      h('td', { text: table }),
      h('td', {}, h('span', { class: `kind k-${rec.action}` }, KIND_NAMES[rec.action])),
      h('td', { class: 'key', title: keyTitle }, key),
      h('td', { class: 'values' }, this.values(rec, columns, identity)));
    tr.hidden = !this.passes(tr);
    return tr;
  }

  // The key: of the old row for updates and deletes (marked when an update changes it),
  // else of the new one. Its columns are the primary key (wal2json names it), else the
  // replica identity as changes named it, else the first column.
  key(rec, table, columns, identity) {
    const names = this.keyNames.get(table);
    const pick = (cols) => (names ? cols.filter((c) => names.includes(c.name)) : cols.slice(0, 1));
    const text = (cols) => cols.map((c) => `${c.name}=${show(c.value)}`).join(', ');
    const title = names ? 'key' : 'first column (no key named yet)';
    if (!identity.length) return { key: text(pick(columns)), keyTitle: title };
    const oldKey = text(pick(identity));
    const newKey = text(pick(columns));
    if (rec.action === 'U' && newKey && newKey !== oldKey) {
      return { key: h('span', {}, h('span', { class: 'oldkey' }, oldKey), ' → ', newKey), keyTitle: 'the key changed' };
    }
    return { key: oldKey, keyTitle: `old ${title}` };
  }

  values(rec, columns, identity) {
    if (rec.action === 'M') return h('span', {}, show(rec.content));
    if (rec.action === 'DDL') {
      const cols = (rec.columnnames || []).map((n, i) => h('span', { class: 'col' }, h('b', {}, n), ' ', rec.columntypes[i]));
      return h('span', {}, h('b', {}, rec.command), ' ', ...cols);
    }
    if (rec.action === 'T') return h('span', { class: 'muted' }, 'table truncated');
    if (rec.action === 'D') {
      return identity.map((c) => h('span', { class: 'col old' }, h('b', {}, c.name), '=', show(c.value)));
    }
    const old = new Map(identity.map((c) => [c.name, c.value]));
    return columns.map((c) => {
      const changed = rec.action === 'U' && old.has(c.name) && JSON.stringify(old.get(c.name)) !== JSON.stringify(c.value);
      return h('span', { class: `col${changed ? ' changed' : ''}`, title: changed ? `was ${show(old.get(c.name))}` : c.type },
        h('b', {}, c.name), '=', show(c.value));
    });
  }

  passes(tr) {
    const table = $('#filter-table').value;
    const kinds = new Set([...document.querySelectorAll('#filter-kinds input:checked')].map((i) => i.value));
    return (!table || tr.dataset.table === table) && kinds.has(tr.dataset.kind);
  }

  applyFilters() {
    for (const tr of document.querySelectorAll('#feed tbody tr')) tr.hidden = !this.passes(tr);
  }

  togglePause() {
    this.paused = !this.paused;
    $('#pause').classList.toggle('active', this.paused);
    if (!this.paused) {
      for (const c of this.buffer.splice(0)) this.add(c);
      this.dropped = 0;
      $('#pause').textContent = 'Pause';
    } else {
      $('#pause').textContent = 'Resume (0 waiting)';
    }
  }

  updateEmpty() {
    const empty = $('#feed-empty');
    empty.hidden = $('#feed tbody').childElementCount > 0;
    empty.textContent = this.session ? `No changes since watching ${this.session} began.` : 'Choose a session to watch its changes.';
  }

  tick() {
    const rate = this.perSecond[this.perSecond.length - 1];
    this.perSecond.shift();
    this.perSecond.push(0);
    $('#rate').textContent = `${rate} /s`;
    this.drawSpark();
  }

  drawSpark() {
    const canvas = $('#spark');
    const ctx = canvas.getContext('2d');
    const { width, height } = canvas;
    ctx.clearRect(0, 0, width, height);
    const data = this.perSecond.slice(0, -1);
    const max = Math.max(1, ...data);
    const style = getComputedStyle(canvas);
    ctx.strokeStyle = style.getPropertyValue('--spark').trim() || '#3b82f6';
    ctx.fillStyle = style.getPropertyValue('--spark-fill').trim() || 'rgba(59,130,246,0.2)';
    // A bar per second, oldest on the left; the line marks the top of each.
    const w = width / data.length;
    data.forEach((v, i) => {
      const bar = Math.round((v / max) * (height - 3));
      if (bar === 0) return;
      ctx.fillRect(i * w + 1, height - bar, w - 2, bar);
    });
    ctx.fillStyle = ctx.strokeStyle;
    data.forEach((v, i) => {
      const bar = Math.round((v / max) * (height - 3));
      if (bar > 0) ctx.fillRect(i * w + 1, height - bar, w - 2, 2);
    });
  }
}
