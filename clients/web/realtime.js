// The server's realtime WebSocket (/v1/realtime): OpenAI Realtime JSON events plus binary audio frames.
//
// Browsers cannot set headers on a WebSocket, so an API key travels as the subprotocol
// `openai-insecure-api-key.<KEY>` (OpenAI's browser scheme), or as `?api_key=` when the key holds
// characters a subprotocol cannot carry.

const KEY_PROTOCOL = "openai-insecure-api-key.";
const TOKEN = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;

export const FRAME_PCM16 = 1;
export const FRAME_OPUS = 2;
const HEADER = 12;

/** `ws(s)://<this page's host>/v1/realtime` */
export function defaultUrl(loc = window.location) {
  const scheme = loc.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${loc.host}/v1/realtime`;
}

/** {format, responseIndex, frameIndex, payload} of a server binary frame, or null if not one. */
export function parseFrame(buffer) {
  if (buffer.byteLength < HEADER) return null;
  const v = new DataView(buffer);
  if (v.getUint8(0) !== 0x4c || v.getUint8(1) !== 0x46 || v.getUint8(2) !== 1) return null;
  return {
    format: v.getUint8(3),
    responseIndex: v.getUint32(4, true),
    frameIndex: v.getUint32(8, true),
    payload: new Uint8Array(buffer, HEADER),
  };
}

export class RealtimeError extends Error {
  constructor(code, message) {
    super(message);
    this.code = code;
  }
}

/**
 * Events: "event" (detail: a server JSON event), "frame" (detail: a parsed binary frame),
 * "close" (detail: {code, reason, error}).
 */
export class RealtimeConnection extends EventTarget {
  constructor(url, { apiKey = "" } = {}) {
    super();
    this.url = url;
    this.apiKey = apiKey;
    this.ws = null;
    this.session = null;
    this.lastError = null;
  }

  /** Open the socket; resolves with the session of `session.created`, rejects with RealtimeError. */
  connect(timeoutMs = 15000) {
    const protocols = ["realtime"];
    let url = this.url;
    if (this.apiKey) {
      if (TOKEN.test(this.apiKey)) protocols.push(KEY_PROTOCOL + this.apiKey);
      else url += (url.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(this.apiKey);
    }
    return new Promise((resolve, reject) => {
      let settled = false;
      const fail = (err) => {
        if (!settled) {
          settled = true;
          reject(err);
        }
      };
      const timer = setTimeout(() => {
        fail(new RealtimeError("timeout", `no session from ${this.url} within ${timeoutMs / 1000} s`));
        this.close();
      }, timeoutMs);
      let ws;
      try {
        ws = new WebSocket(url, protocols);
      } catch (e) {
        clearTimeout(timer);
        fail(new RealtimeError("bad_url", String(e.message || e)));
        return;
      }
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      ws.onmessage = (e) => {
        if (typeof e.data !== "string") {
          const frame = parseFrame(e.data);
          if (frame) this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
          return;
        }
        let ev;
        try {
          ev = JSON.parse(e.data);
        } catch {
          return;
        }
        if (ev.type === "error") this.lastError = ev.error;
        if (!settled) {
          if (ev.type === "session.created") {
            settled = true;
            clearTimeout(timer);
            this.session = ev.session;
            resolve(ev.session);
          } else if (ev.type === "error") {
            clearTimeout(timer);
            fail(new RealtimeError(ev.error.code, ev.error.message));
          }
        }
        this.dispatchEvent(new CustomEvent("event", { detail: ev }));
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        const detail = { code: e.code, reason: e.reason, error: this.lastError };
        fail(
          new RealtimeError(
            (this.lastError && this.lastError.code) || "connection_closed",
            (this.lastError && this.lastError.message) ||
              `the connection closed (${e.code}${e.reason ? " " + e.reason : ""}); is the server running at ${this.url}?`,
          ),
        );
        this.dispatchEvent(new CustomEvent("close", { detail }));
      };
    });
  }

  get open() {
    return !!this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  send(type, fields = {}) {
    if (!this.open) return false;
    this.ws.send(JSON.stringify({ type, ...fields }));
    return true;
  }

  sendBinary(buffer) {
    if (!this.open) return false;
    this.ws.send(buffer);
    return true;
  }

  close(code = 1000) {
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(code);
  }
}
