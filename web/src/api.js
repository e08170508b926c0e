// The one way the console talks to the server: JSON over fetch with the session cookie, errors
// as the API words them, WebSocket URLs of this origin, and the shared event stream.

/** An error answer of the API: its HTTP status and its `message`. */
export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

/** Listeners told when a request finds the session gone (401). */
const signedOutListeners = new Set();
export function onSignedOut(fn) {
  signedOutListeners.add(fn);
  return () => signedOutListeners.delete(fn);
}

async function errorOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && typeof body.message === 'string') message = body.message;
  } catch {
    // Not JSON: keep the status line.
  }
  return new ApiError(response.status, message);
}

/**
 * Sends a request; `body` is sent as JSON unless it is a Blob/File. Answers the parsed JSON, the
 * text, or null for an empty answer. Throws ApiError.
 */
export async function request(method, path, body, { raw = false } = {}) {
  const init = { method, credentials: 'same-origin', headers: {} };
  if (body !== undefined) {
    if (body instanceof Blob) {
      init.body = body;
    } else {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `cannot reach the server: ${e.message}`);
  }
  if (!response.ok) {
    const err = await errorOf(response);
    if (response.status === 401 && !path.startsWith('/auth/')) signedOutListeners.forEach((fn) => fn());
    throw err;
  }
  if (raw) return response;
  if (response.status === 204) return null;
  const type = response.headers.get('content-type') || '';
  return type.includes('json') ? response.json() : response.text();
}

export const get = (path) => request('GET', path);
export const post = (path, body) => request('POST', path, body);
export const put = (path, body) => request('PUT', path, body);
export const del = (path) => request('DELETE', path);

/** `encodeURIComponent` for a path segment. */
export const seg = encodeURIComponent;

/** Reads an NDJSON answer line by line. */
export async function* ndjson(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = '';
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    let nl;
    while ((nl = pending.indexOf('\n')) >= 0) {
      const line = pending.slice(0, nl).trim();
      pending = pending.slice(nl + 1);
      if (line) yield JSON.parse(line);
    }
  }
  if (pending.trim()) yield JSON.parse(pending);
}

/**
 * Uploads a file with progress (fetch has no upload progress): `onProgress(sent, total)`.
 */
export function upload(path, file, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open('PUT', path);
    xhr.withCredentials = true;
    xhr.upload.onprogress = (e) => onProgress(e.loaded, e.total);
    xhr.onerror = () => reject(new ApiError(0, 'the upload broke off'));
    xhr.onload = () => {
      if (xhr.status >= 200 && xhr.status < 300) return resolve();
      let message = `${xhr.status} ${xhr.statusText}`;
      try {
        message = JSON.parse(xhr.responseText).message || message;
      } catch {
        // Not JSON.
      }
      reject(new ApiError(xhr.status, message));
    };
    xhr.send(file);
  });
}

/** A WebSocket to a path of this server (ws: or wss: as the page). */
export function socket(path, protocols) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const ws = new WebSocket(`${scheme}//${location.host}${path}`, protocols);
  ws.binaryType = 'arraybuffer';
  return ws;
}

/** The server's event stream, shared by every page: `subscribe(kind, fn)`. */
const eventListeners = new Set();
let source = null;

function ensureSource() {
  if (source) return;
  // EventSource reconnects by itself after a network error; a 401 (session over) ends it, and
  // the next API call shows the sign-in form.
  source = new EventSource('/events');
  for (const kind of ['sandbox', 'vm', 'operation', 'node']) {
    source.addEventListener(kind, (e) => {
      const event = JSON.parse(e.data);
      eventListeners.forEach((l) => l.kind === kind && l.fn(event));
    });
  }
}

export function subscribe(kind, fn) {
  ensureSource();
  const listener = { kind, fn };
  eventListeners.add(listener);
  return () => eventListeners.delete(listener);
}

export function closeEvents() {
  if (source) source.close();
  source = null;
  eventListeners.clear();
}

/** Bytes in words. */
export function bytes(n) {
  if (n == null) return '';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
