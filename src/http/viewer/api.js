// The API client: every request carries the tab's token, if any; a 401 asks for one
// (kept in sessionStorage: this tab only) and retries. Errors are the API's own
// {"error": "..."} messages.

import { $, showError } from './dom.js';

const KEY = 'pgdeltastream.token';

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => { sessionStorage.setItem(KEY, t); $('#forget-token').hidden = false; },
  forget: () => { sessionStorage.removeItem(KEY); $('#forget-token').hidden = true; },
};

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let asking = null;

// Shows the token dialog (once, however many requests wait for it).
function askForToken(why) {
  if (!asking) {
    asking = new Promise((resolve) => {
      const dialog = $('#token-dialog');
      showError($('#token-error'), why);
      $('#token').value = '';
      dialog.addEventListener('close', () => {
        const t = $('#token').value.trim();
        if (t) token.set(t);
        asking = null;
        resolve();
      }, { once: true });
      dialog.showModal();
    });
  }
  return asking;
}

export async function api(method, path, body) {
  for (;;) {
    const headers = { accept: 'application/json' };
    const t = token.get();
    if (t) headers.authorization = `Bearer ${t}`;
    if (body !== undefined) headers['content-type'] = 'application/json';
    const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch { data = null; }
    if (res.status === 401) {
      if (t) token.forget();
      await askForToken(data && data.error ? data.error : 'a token is required');
      continue;
    }
    if (!res.ok) {
      throw new ApiError(res.status, data && data.error ? data.error : `${res.status} ${res.statusText}`);
    }
    return data;
  }
}

// A websocket URL on this origin, with the token as ?access_token= (browsers cannot
// set headers on a websocket).
export function wsUrl(path) {
  const url = new URL(path, window.location.href);
  url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
  const t = token.get();
  if (t) url.searchParams.set('access_token', t);
  return url.toString();
}

export function initAuth() {
  $('#forget-token').hidden = !token.get();
  $('#forget-token').addEventListener('click', () => { token.forget(); window.location.reload(); });
}
