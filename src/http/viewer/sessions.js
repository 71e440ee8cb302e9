// The session list: polled every 1.5 s; create and drop.

import { $, h, bytes, seconds, showError } from './dom.js';
import { api } from './api.js';

const POLL_MS = 1500;

export function tableLabel(t) {
  if (typeof t === 'string') return t;
  let s = t.table;
  if (t.columns) s += ` (${t.columns.join(', ')})`;
  if (t.where) s += ` where ${t.where}`;
  return s;
}

export class Sessions {
  constructor({ onWatch, onSnapshot, onList }) {
    this.onWatch = onWatch;
    this.onSnapshot = onSnapshot;
    this.onList = onList;
    this.selected = null;
    $('#create-form').addEventListener('submit', (e) => { e.preventDefault(); this.create(e.target); });
    // The list's errors come and go with its polls; an action's stays until dismissed.
    $('#action-error').addEventListener('click', () => showError($('#action-error'), ''));
  }

  start() {
    const tick = async () => {
      await this.refresh();
      setTimeout(tick, POLL_MS);
    };
    tick();
  }

  async refresh() {
    try {
      const list = await api('GET', '/v2/sessions');
      this.render(list);
      showError($('#sessions-error'), '');
      $('#conn').textContent = 'connected';
      $('#conn').className = 'pill ok';
      $('#sessions-updated').textContent = `updated ${new Date().toLocaleTimeString(undefined, { hour12: false })}`;
      this.onList(list);
      this.refreshV1(list);
    } catch (e) {
      showError($('#sessions-error'), `Cannot list sessions: ${e.message}`);
      $('#conn').textContent = 'disconnected';
      $('#conn').className = 'pill bad';
    }
  }

  async refreshV1(v2) {
    if (!$('#v1').open) return;
    try {
      const slots = await api('GET', '/v1/sessions');
      const named = new Set(v2.map((s) => s.slotName));
      const body = $('#v1-slots tbody');
      body.replaceChildren(...slots.filter((s) => !named.has(s.slotName)).map((s) => h('tr', {},
        h('td', { text: s.slotName }),
        h('td', { text: s.plugin }),
        h('td', { text: s.active ? `yes (pid ${s.activePid})` : 'no' }),
        h('td', { class: 'num', text: bytes(s.retainedBytes) }),
        h('td', { class: 'num', text: seconds(s.secondsSinceLastAck) }),
        h('td', { text: s.walStatus || '—' }))));
    } catch { /* the v2 list shows the error */ }
  }

  render(list) {
    const body = $('#sessions tbody');
    $('#no-sessions').hidden = list.length > 0;
    // Lag in bytes shows where the server reports it.
    $('#sessions').classList.toggle('no-lag', !list.some((s) => s.lagBytes !== undefined));
    body.replaceChildren(...list.map((s) => this.row(s)));
  }

  row(s) {
    const tables = s.tables ? s.tables.map(tableLabel).join(', ') : 'all tables';
    const client = slotState(s);
    const budget = s.budget ? ` of ${bytes(s.budget.maxRetainedBytes)} (${s.budget.onMaxRetained})` : '';
    const retained = h('td', { class: `num${s.retentionWarning ? ' warn' : ''}`,
      title: (s.retentionWarning ? 'past the retention warning threshold' : `confirmed ${s.confirmedFlushLsn ?? '—'}`)
        + (s.budget ? `; budget ${bytes(s.budget.maxRetainedBytes)}, on exceeding: ${s.budget.onMaxRetained}` : '') },
    bytes(s.retainedBytes), budget, s.retentionWarning ? ' ⚠' : '');
    const snapshot = s.snapshot === 'held' ? 'held' : (s.snapshotReason ? `${s.snapshot}: ${s.snapshotReason}` : s.snapshot);
    const tr = h('tr', { 'data-name': s.name, class: s.name === this.selected ? 'selected' : '' },
      h('td', { class: 'name' }, h('button', { type: 'button', class: 'link', onclick: () => this.onWatch(s) }, s.name),
        h('div', { class: 'muted small', text: s.slotName })),
      h('td', { text: s.plugin }),
      h('td', { class: 'wrap', text: tables }),
      h('td', { class: 'small', text: s.actions.join(', ') }),
      h('td', {}, client, backfillState(s)),
      h('td', { class: 'num lag', title: 'WAL written since the consumer\'s last confirmed position' },
        s.lagBytes === undefined || s.lagBytes === null ? '—' : bytes(s.lagBytes)),
      h('td', { class: 'num', title: s.lastAckLsn ? `last ack ${s.lastAckLsn}` : 'no ack through this server' },
        s.secondsSinceLastAck === null || s.secondsSinceLastAck === undefined ? '—' : `${seconds(s.secondsSinceLastAck)} ago`),
      retained,
      h('td', { class: 'small', text: snapshot }),
      h('td', { class: 'num', text: s.watchers ?? 0 }),
      h('td', { class: 'actions' },
        h('button', { type: 'button', onclick: () => this.onWatch(s) }, 'Watch'),
        h('button', { type: 'button', onclick: () => this.onSnapshot(s) }, 'Snapshot'),
        h('button', { type: 'button', class: 'danger', onclick: () => this.drop(s.name) }, 'Drop')));
    return tr;
  }

  select(name) {
    this.selected = name;
    for (const tr of document.querySelectorAll('#sessions tbody tr')) {
      tr.classList.toggle('selected', tr.dataset.name === name);
    }
  }

  async create(form) {
    const data = new FormData(form);
    const body = { name: data.get('name').trim() };
    const tables = data.get('tables').split(',').map((t) => t.trim()).filter(Boolean);
    if (tables.length) body.tables = tables;
    const actions = data.getAll('actions');
    if (actions.length < 5) body.actions = actions;
    if (data.get('plugin')) body.plugin = data.get('plugin');
    if (data.get('ddl')) body.ddl = true;
    try {
      const created = await api('POST', '/v2/sessions', body);
      form.reset();
      $('#create').open = false;
      showError($('#action-error'), '');
      await this.refresh();
      this.onWatch(created);
    } catch (e) {
      showError($('#action-error'), `Cannot create session ${body.name}: ${e.message}`);
    }
  }

  async drop(name) {
    const dialog = $('#confirm-dialog');
    $('#confirm-name').textContent = name;
    dialog.returnValue = '';
    dialog.showModal();
    await new Promise((resolve) => dialog.addEventListener('close', resolve, { once: true }));
    if (dialog.returnValue !== 'drop') return;
    try {
      await api('DELETE', `/v2/sessions/${encodeURIComponent(name)}`);
      showError($('#action-error'), '');
      await this.refresh();
    } catch (e) {
      showError($('#action-error'), `Cannot drop session ${name}: ${e.message}`);
    }
  }
}

// The session's live backfill, if it has had one: how far it got and what is left.
function backfillState(s) {
  const b = s.backfill;
  if (!b) return '';
  const rows = b.tables.reduce((n, t) => n + t.rows, 0);
  const chunks = b.tables.reduce((n, t) => n + t.chunks, 0);
  const tables = b.tables.map((t) => `${t.table}: ${t.rows.toLocaleString()} rows in ${t.chunks} chunks${t.done ? ', done' : ''}`);
  const left = b.state === 'running' ? ` · ~${b.estimatedRemainingRows.toLocaleString()} to go` : '';
  const cls = { running: 'ok', done: '', cancelled: 'warn', failed: 'bad' }[b.state] ?? '';
  return h('div', { class: 'small' }, h('span', {
    class: `pill ${cls} backfill`, title: tables.join('; ') + (b.error ? `; failed: ${b.error}` : ''),
  }, `backfill ${b.state} · ${rows.toLocaleString()} rows · ${chunks} chunk${chunks === 1 ? '' : 's'}${left}`));
}

// The session's client and slot: streaming, idle, or why the slot cannot stream.
function slotState(s) {
  if (s.invalidated) {
    const lost = s.invalidated.lostAfter ? ` after ${s.invalidated.lostAfter}` : '';
    return h('span', { class: 'pill bad', title: `invalidated by ${s.invalidated.by}: changes${lost} are lost; `
      + (s.onInvalidated === 'recreate' ? 'the next stream makes it again' : 'streams answer 410: drop and create again') },
    `invalidated · ${s.invalidated.reason}`);
  }
  if (s.recreated) {
    return h('span', { class: 'pill warn', title: 'made again after an invalidation: clients are told must-refetch' },
      'recreated');
  }
  if (s.streaming) {
    return h('span', { class: 'pill ok', title: `walsender pid ${s.activePid}` }, `streaming · pid ${s.activePid ?? '?'}`);
  }
  const title = s.walStatus === 'unreserved' ? 'at risk: past max_slot_wal_keep_size' : `WAL ${s.walStatus ?? '—'}`;
  return h('span', { class: `pill${s.walStatus === 'unreserved' ? ' warn' : ''}`, title },
    s.slotExists ? (s.failover ? 'idle · failover' : 'idle') : 'slot gone');
}
