// The viewer's entry point: wires the session list, the live feed and the snapshot
// browser together.

import { $ } from './dom.js';
import { initAuth } from './api.js';
import { Sessions } from './sessions.js';
import { Feed } from './feed.js';
import { Snapshot } from './snapshot.js';

const feed = new Feed();
const snapshot = new Snapshot();
let current = null;

function tab(which) {
  $('#feed-view').hidden = which !== 'feed';
  $('#snapshot-view').hidden = which !== 'snapshot';
  $('#tab-feed').setAttribute('aria-selected', String(which === 'feed'));
  $('#tab-snapshot').setAttribute('aria-selected', String(which === 'snapshot'));
}

function choose(session) {
  current = session.name;
  $('#current').textContent = session.name;
  sessions.select(session.name);
  snapshot.show(session);
}

const sessions = new Sessions({
  onWatch: (s) => { choose(s); tab('feed'); feed.watch(s); },
  onSnapshot: (s) => { choose(s); tab('snapshot'); },
  onList: (list) => {
    const s = list.find((x) => x.name === current);
    if (s) snapshot.show(s);
    else if (current) { feed.stop(); feed.status(`session ${current} is gone`, 'bad'); current = null; }
  },
});

$('#tab-feed').addEventListener('click', () => tab('feed'));
$('#tab-snapshot').addEventListener('click', () => tab('snapshot'));
initAuth();
sessions.start();
