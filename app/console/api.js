// The console's only way to the service: the public REST API (spec/api.md), same origin, Bearer key.
// Everything here a script can do with curl.

const KEY_STORE = "hdm.apiKey";

export class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.code = err.code || `http_${status}`;
    this.param = err.param || null;
  }
}

function randomHex(bytes) {
  const a = new Uint8Array(bytes);
  crypto.getRandomValues(a); // available on plain http too (randomUUID is not)
  return Array.from(a, (b) => b.toString(16).padStart(2, "0")).join("");
}

export const api = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  onUnauthorized: null, // set by the app: a 401 anywhere sends the user back to the key form

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY_STORE, key);
    else sessionStorage.removeItem(KEY_STORE);
  },

  headers(extra = {}) {
    const h = { ...extra };
    if (this.key) h.Authorization = `Bearer ${this.key}`;
    return h;
  },

  async request(method, path, body, extra = {}) {
    const headers = this.headers(extra);
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const r = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    const data = await r.json().catch(() => null);
    if (!r.ok) {
      const e = new ApiError(r.status, data);
      if (r.status === 401 && this.onUnauthorized) this.onUnauthorized(e);
      throw e;
    }
    return data;
  },
  get(path) { return this.request("GET", path); },
  post(path, body) {
    // Idempotency-Key: a retried click can never create a second job (spec: conventions)
    return this.request("POST", path, body === undefined ? {} : body, { "Idempotency-Key": `console-${randomHex(16)}` });
  },
  del(path) { return this.request("DELETE", path); },

  /** multipart/form-data (a File and text fields); the browser sets the boundary. */
  async upload(path, form) {
    const r = await fetch(path, { method: "POST", headers: this.headers(), body: form });
    const data = await r.json().catch(() => null);
    if (!r.ok) {
      const e = new ApiError(r.status, data);
      if (r.status === 401 && this.onUnauthorized) this.onUnauthorized(e);
      throw e;
    }
    return data;
  },

  /** Files need the key too, so <img src> cannot point at them: fetch the bytes, hand out a blob: URL. */
  async blobUrl(path) {
    const r = await fetch(path, { headers: this.headers() });
    if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
    return URL.createObjectURL(await r.blob());
  },

  /**
   * Follows GET {path}/events as Server-Sent Events. EventSource cannot send an Authorization header, so this
   * reads the stream with fetch(). Resumes after `after` (the last event id seen), reconnects on a dropped
   * connection, and resolves with the last id when the server ends the stream (the job is final) or on abort.
   */
  async follow(path, { after = 0, onEvent, signal }) {
    let last = after;
    for (let attempt = 0; !signal?.aborted; attempt++) {
      try {
        const r = await fetch(`${path}?after=${last}`, {
          headers: this.headers({ Accept: "text/event-stream" }), signal,
        });
        if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
        const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return last;
          buf += value;
          let cut;
          while ((cut = buf.indexOf("\n\n")) >= 0) {
            const ev = parseEvent(buf.slice(0, cut));
            buf = buf.slice(cut + 2);
            if (ev) {
              last = ev.id ?? last;
              onEvent(ev);
            }
          }
        }
      } catch (e) {
        if (signal?.aborted) return last;
        if (e instanceof ApiError && e.status < 500) throw e;
        await new Promise((res) => setTimeout(res, Math.min(1000 * 2 ** attempt, 8000)));
      }
    }
    return last;
  },
};

function parseEvent(block) {
  let id = null, type = "message", data = "";
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
    if (field === "id") id = Number(val);
    else if (field === "event") type = val;
    else if (field === "data") data += (data ? "\n" : "") + val;
  }
  if (!data) return null;
  try {
    return { id, type, data: JSON.parse(data) };
  } catch {
    return null;
  }
}

/** A file URL from a job object (absolute, built from the server's base URL) as a same-origin path. */
export function apiPath(url) {
  return new URL(url, location.href).pathname;
}
