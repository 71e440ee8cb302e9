// The snapshot browser: a session's snapshot of a table, a keyset page at a time.

import { $, h, show, showError } from './dom.js';
import { api, ApiError } from './api.js';
import { tableLabel } from './sessions.js';

export class Snapshot {
  constructor() {
    this.session = null;
    this.next = null;
    this.page = 0;
    $('#snapshot-form').addEventListener('submit', (e) => { e.preventDefault(); this.load(null); });
    $('#snap-next').addEventListener('click', () => this.load(this.next));
  }

  show(session) {
    if (this.session !== session.name) {
      $('#snapshot thead').replaceChildren();
      $('#snapshot tbody').replaceChildren();
      $('#snap-info').textContent = '';
      $('#snap-next').disabled = true;
      showError($('#snap-error'), '');
    }
    this.session = session.name;
    const tables = (session.tables || []).map(tableLabel).filter((t) => !t.endsWith('*')).map((t) => t.split(' ')[0]);
    $('#snap-tables').replaceChildren(...tables.map((t) => h('option', { value: t })));
    if (!$('#snap-table').value && tables.length) $('#snap-table').value = tables[0];
    const status = session.snapshot === 'held' ? 'snapshot held'
      : `snapshot ${session.snapshot}${session.snapshotReason ? ` (${session.snapshotReason})` : ''}: pages cannot be read`;
    $('#snap-info').textContent = status;
  }

  async load(after) {
    if (!this.session) return;
    const table = $('#snap-table').value.trim();
    const limit = Math.max(1, Number($('#snap-limit').value) || 100);
    const q = new URLSearchParams({ limit: String(limit) });
    if (after) q.set('after', after);
    const path = `/v2/sessions/${encodeURIComponent(this.session)}/snapshot/${encodeURIComponent(table)}?${q}`;
    try {
      const page = await api('GET', path);
      this.page = after ? this.page + 1 : 1;
      this.next = page.next;
      this.render(page.rows);
      showError($('#snap-error'), '');
      $('#snap-next').disabled = !page.next;
      $('#snap-info').textContent = `${table}: page ${this.page}, ${page.rows.length} rows${page.next ? '' : ' (last page)'}`;
    } catch (e) {
      const released = e instanceof ApiError && e.status === 409;
      showError($('#snap-error'), released
        ? `The snapshot is no longer available: ${e.message}. A snapshot lives until it is released, idles out or the server restarts; create a new session for a new one.`
        : e.message);
      $('#snap-next').disabled = true;
    }
  }

  render(rows) {
    const names = [];
    for (const r of rows) for (const k of Object.keys(r)) if (!names.includes(k)) names.push(k);
    $('#snapshot thead').replaceChildren(h('tr', {}, names.map((n) => h('th', { text: n }))));
    $('#snapshot tbody').replaceChildren(...rows.map((r) => h('tr', {},
      names.map((n) => h('td', { class: r[n] === null ? 'muted' : '' }, n in r ? show(r[n]) : '')))));
  }
}
