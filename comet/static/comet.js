/*
 * comet.js: the browser client for comet streams. No build step, no dependencies.
 *
 *   const sub = Comet.subscribe("/events", {
 *     transport: "sse",                 // "sse" | "multipart" | "chunked" | "longpoll"
 *     events: ["join", "leave"],        // SSE event names to listen for ("message" always)
 *     lastEventId: "1700000000000-41",  // resume after this id (e.g. the last rendered one)
 *     onEvent(ev) { ... },              // ev = {id, event, data}; data is parsed JSON when it can be
 *     onStatus(status) { ... },         // "connecting" | "open" | "reconnecting" | "closed"
 *     onGap(ev) { ... },                // events were lost for this client: reload state
 *     onDenied(info) { ... },           // {status, reason}: the server refused this stream for good
 *   });
 *   sub.close();
 *
 * On any transport, a broken connection is retried with exponential backoff
 * plus jitter, resuming after the last event id seen (the server's
 * `last_event_id` query parameter), so nothing is lost or shown twice across a
 * reconnect. EventSource's own retry is not used: it cannot back off, and it
 * gives up for good on a non-200 answer (a 503 from admission control).
 *
 * What the server answers decides what happens next: 5xx, 408, 429 and
 * network errors are retried (no sooner than a 503's or 429's Retry-After); a 400 for a cursor the server cannot resume
 * from is a gap (onGap, then the stream restarts from now); any other 4xx
 * (403 from an `authorize` check, 404) ends the subscription with onDenied
 * and status "closed", as retrying cannot help. EventSource does not show
 * the status, so when an SSE connection fails before it ever opened, one
 * fetch of the same URL asks.
 */
(function (global) {
  "use strict";

  const GAP = "comet.gap";

  function parseData(text) {
    if (typeof text !== "string") return text;
    try { return JSON.parse(text); } catch (e) { return text; }
  }

  function withCursor(url, id) {
    if (!id) return url;
    const u = new URL(url, global.location ? global.location.href : undefined);
    u.searchParams.set("last_event_id", id);
    return u.toString();
  }

  /* Incremental parser of multipart/x-mixed-replace bodies, per RFC 2046: a
   * body ends at the next CRLF--boundary, whatever its Content-Length (comet
   * sends each part's headers ahead, with the previous part, so browsers show
   * it at once). Heartbeats are skipped: Comet-Heartbeat header lines before
   * the first part, empty parts, bytes before the first delimiter. */
  class MultipartParser {
    constructor(boundary) {
      this.delimiter = new TextEncoder().encode("--" + boundary);
      this.crlfDelimiter = new Uint8Array(this.delimiter.length + 2);
      this.crlfDelimiter.set([13, 10]); this.crlfDelimiter.set(this.delimiter, 2);
      this.buf = new Uint8Array(0);
      this.state = "preamble"; // then "headers", "body"; "delimiter" while a delimiter line is incomplete
      this.headers = {};
      this.scanned = 0;
      this.ended = false;
    }
    feed(chunk) {
      const merged = new Uint8Array(this.buf.length + chunk.length);
      merged.set(this.buf); merged.set(chunk, this.buf.length);
      this.buf = merged;
      const out = [];
      for (;;) {
        const part = this._next();
        if (!part) return out;
        if (part.body.length) out.push(part);
      }
    }
    _indexOf(needle, from) {
      const b = this.buf;
      outer: for (let i = from; i <= b.length - needle.length; i++) {
        for (let j = 0; j < needle.length; j++) if (b[i + j] !== needle[j]) continue outer;
        return i;
      }
      return -1;
    }
    _next() {
      for (;;) {
        if (this.ended) return null;
        if (this.state === "delimiter") {
          if (!this._delimiterLine()) return null;
        } else if (this.state === "preamble") {
          const at = this._indexOf(this.delimiter, 0);
          if (at < 0) return null;
          this.buf = this.buf.subarray(at);
          if (!this._delimiterLine()) return null;
        } else if (this.state === "headers") {
          const eol = this._indexOf(new Uint8Array([13, 10]), 0);
          if (eol < 0) return null;
          const line = new TextDecoder("latin1").decode(this.buf.subarray(0, eol));
          this.buf = this.buf.subarray(eol + 2);
          if (line === "") { this.state = "body"; this.scanned = 0; continue; }
          const k = line.indexOf(":");
          const name = (k > 0 ? line.slice(0, k) : line).trim().toLowerCase();
          if (name !== "comet-heartbeat" && k > 0) this.headers[name] = line.slice(k + 1).trim();
        } else {
          const end = this._indexOf(this.crlfDelimiter, this.scanned);
          if (end < 0) {
            this.scanned = Math.max(0, this.buf.length - this.crlfDelimiter.length + 1);
            return null;
          }
          const body = this.buf.slice(0, end), headers = this.headers;
          this.buf = this.buf.subarray(end + 2);
          this.headers = {};
          this._delimiterLine();
          return { contentType: headers["content-type"] || "text/plain", headers: headers, body: body };
        }
      }
    }
    _delimiterLine() {
      // "--boundary" is at the start of buf: consume it and the rest of its line.
      const rest = this.buf.subarray(this.delimiter.length);
      if (rest.length >= 2 && rest[0] === 45 && rest[1] === 45) { this.ended = true; return false; }
      let eol = -1;
      for (let i = 0; i + 1 < rest.length; i++) if (rest[i] === 13 && rest[i + 1] === 10) { eol = i; break; }
      if (eol < 0) { this.state = "delimiter"; return false; }
      for (let i = 0; i < eol; i++) {
        if (rest[i] !== 32 && rest[i] !== 9) throw new Error("multipart stream out of sync");
      }
      this.buf = rest.subarray(eol + 2);
      this.state = "headers";
      return true;
    }
  }

  /* Incremental NDJSON parser: complete lines as JSON values (or strings);
   * blank lines (heartbeats) are skipped; a line split across chunks waits. */
  class NDJSONParser {
    constructor() { this.text = ""; this.decoder = new TextDecoder("utf-8"); }
    feed(chunk) {
      this.text += this.decoder.decode(chunk, { stream: true });
      const lines = this.text.split("\n");
      this.text = lines.pop();
      return lines.filter((l) => l.trim() !== "").map(parseData);
    }
  }

  /* An item from any transport -> {id, event, data}. */
  function toEvent(value) {
    if (value && typeof value === "object" && !Array.isArray(value) && "data" in value && "id" in value) {
      return { id: value.id, event: value.event || "message", data: value.data };
    }
    return { id: null, event: "message", data: value };
  }

  function partToEvent(part) {
    const type = part.contentType.split(";")[0].trim();
    if (type === "application/json") return toEvent(JSON.parse(new TextDecoder().decode(part.body)));
    if (type.startsWith("text/")) return { id: null, event: "message", data: new TextDecoder().decode(part.body) };
    return { id: null, event: "part", data: new Blob([part.body], { type: part.contentType }) };
  }

  class Subscription {
    constructor(url, options) {
      this.url = url;
      this.options = Object.assign({
        transport: "sse", events: [], lastEventId: null,
        minDelay: 500, maxDelay: 30000,
        onEvent: () => {}, onStatus: () => {}, onGap: null, onDenied: null,
      }, options || {});
      this.lastEventId = this.options.lastEventId || null;
      this.status = null;
      this.attempt = 0;
      this.closed = false;
      this._timer = null;
      this._abort = null;
      this._source = null;
      this._retryAfter = 0;  // ms a 503 or 429 asked us to wait
      this._connect();
    }

    close() {
      this.closed = true;
      clearTimeout(this._timer);
      if (this._source) this._source.close();
      if (this._abort) this._abort.abort();
      this._setStatus("closed");
    }

    _setStatus(status) {
      if (status === this.status) return;
      this.status = status;
      try { this.options.onStatus(status); } catch (e) { console.error(e); }
    }

    _deliver(ev) {
      if (ev.id) {
        if (this.lastEventId && ev.id === this.lastEventId) return; // already shown
        this.lastEventId = ev.id;
      }
      if (this.status !== "open") this._opened();
      if (ev.event === GAP && this.options.onGap) {
        try { this.options.onGap(ev); } catch (e) { console.error(e); }
        return;
      }
      try { this.options.onEvent(ev); } catch (e) { console.error(e); }
    }

    _opened() { this.attempt = 0; this._setStatus("open"); }

    /* A non-200 answer: true if it was dealt with here (no plain retry). */
    async _refused(response) {
      const status = response.status;
      const after = response.headers.get("Retry-After");
      if (after && (status === 503 || status === 429)) {
        // The server says when (admission control, a backend outage): not sooner.
        const seconds = Number(after);
        const ms = Number.isFinite(seconds) ? seconds * 1000 : Date.parse(after) - Date.now();
        if (ms > 0) this._retryAfter = Math.min(ms, 300000);
      }
      if (status < 400 || status >= 500 || status === 408 || status === 429) return false;
      let reason = "";
      try { reason = (await response.text()).trim(); } catch (e) { /* the reason is a courtesy */ }
      if (this.closed) return true;
      if (status === 400 && this.lastEventId) {
        // The cursor cannot be resumed from (another server's, or corrupted):
        // say what the server would have said with a gap, start from now.
        const gap = { id: null, event: GAP, data: { last_id: this.lastEventId, resume_id: null, reason: reason } };
        this.lastEventId = null;
        const handler = this.options.onGap || this.options.onEvent;
        try { handler(gap); } catch (e) { console.error(e); }
        this._retry(true);
        return true;
      }
      this.close();
      if (this.options.onDenied) {
        try { this.options.onDenied({ status: status, reason: reason }); } catch (e) { console.error(e); }
      } else {
        console.error("comet: " + this.url + " refused with " + status + ": " + reason);
      }
      return true;
    }

    /* EventSource failed before it opened: fetch the URL once to learn why. */
    async _probe() {
      const abort = new AbortController();
      this._abort = abort;
      try {
        const response = await fetch(withCursor(this.url, this.lastEventId), {
          signal: abort.signal, cache: "no-store", headers: { Accept: "text/event-stream" },
        });
        if (response.status !== 200 && await this._refused(response)) return;
        abort.abort(); // a stream (or a 5xx): the EventSource retry below takes it from here
      } catch (e) {
        if (this.closed) return;
      }
      if (this._abort === abort) this._abort = null;
      this._retry();
    }

    _retry(now) {
      if (this.closed) return;
      this._setStatus("reconnecting");
      // Exponential backoff with full jitter: many clients dropped at once by a
      // restart do not all come back in the same instant.
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * Math.pow(2, this.attempt));
      let delay = now ? 0 : this.options.minDelay / 2 + Math.random() * ceiling;
      if (this._retryAfter) {
        // Up to 20% later: a crowd told the same Retry-After does not return at once.
        delay = Math.max(delay, this._retryAfter * (1 + Math.random() * 0.2));
        this._retryAfter = 0;
      }
      this.attempt += 1;
      clearTimeout(this._timer);
      this._timer = setTimeout(() => this._connect(), delay);
    }

    _connect() {
      if (this.closed) return;
      if (this.status !== "reconnecting") this._setStatus("connecting");
      const t = this.options.transport;
      if (t === "sse") this._sse();
      else if (t === "longpoll") this._longpoll();
      else if (t === "multipart" || t === "chunked") this._fetchStream(t);
      else throw new Error("unknown transport " + t);
    }

    _sse() {
      const source = new EventSource(withCursor(this.url, this.lastEventId));
      this._source = source;
      const handler = (e) => this._deliver({ id: e.lastEventId || null, event: e.type, data: parseData(e.data) });
      let opened = false;
      source.onopen = () => { opened = true; this._opened(); };
      source.onmessage = handler;
      for (const name of new Set([GAP].concat(this.options.events))) source.addEventListener(name, handler);
      source.onerror = () => {
        source.close();
        if (this._source === source) this._source = null;
        if (this.closed) return;
        if (opened) this._retry();
        else this._probe();
      };
    }

    async _fetchStream(transport) {
      const abort = new AbortController();
      this._abort = abort;
      try {
        const response = await fetch(withCursor(this.url, this.lastEventId), {
          signal: abort.signal, cache: "no-store",
          headers: { Accept: transport === "multipart" ? "multipart/x-mixed-replace" : "application/x-ndjson" },
        });
        if (response.status !== 200 && await this._refused(response)) return;
        if (response.status !== 200 || !response.body) throw new Error("HTTP " + response.status);
        let parser;
        if (transport === "multipart") {
          const m = /boundary="?([^";]+)"?/.exec(response.headers.get("Content-Type") || "");
          if (!m) throw new Error("multipart response without boundary");
          parser = new MultipartParser(m[1]);
        } else {
          parser = new NDJSONParser();
        }
        this._opened();
        const reader = response.body.getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          for (const item of parser.feed(value)) {
            this._deliver(transport === "multipart" ? partToEvent(item) : toEvent(item));
          }
        }
      } catch (e) {
        if (this.closed) return;
      }
      if (this._abort === abort) this._abort = null;
      this._retry(); // the server ended the stream or it broke: come back and resume
    }

    async _longpoll() {
      while (!this.closed) {
        const abort = new AbortController();
        this._abort = abort;
        try {
          const response = await fetch(withCursor(this.url, this.lastEventId), {
            signal: abort.signal, cache: "no-store", headers: { Accept: "application/json" },
          });
          if (response.status !== 200 && await this._refused(response)) return;
          if (response.status !== 200) throw new Error("HTTP " + response.status);
          const doc = await response.json();
          this._opened();
          for (const item of doc.events) this._deliver(toEvent(item));
          if (doc.cursor) this.lastEventId = doc.cursor;
        } catch (e) {
          if (this.closed) return;
          this._retry();
          return;
        }
      }
    }
  }

  global.Comet = {
    subscribe: (url, options) => new Subscription(url, options),
    Subscription: Subscription,
    MultipartParser: MultipartParser,
    NDJSONParser: NDJSONParser,
    toEvent: toEvent,
    GAP: GAP,
  };
})(typeof window !== "undefined" ? window : globalThis);
