/*
 * comet.js: the browser client for comet streams. No build step, no dependencies.
 *
 *   const sub = Comet.subscribe("/events", {
 *     transport: "sse",                 // "sse" | "multipart" | "chunked" | "longpoll"
 *     events: ["join", "leave"],        // SSE event names to listen for ("message" always)
 *     lastEventId: "1700000000000-41",  // resume after this id (e.g. the last rendered one)
 *     onEvent(ev) { ... },              // ev = {id, event, data}; data is parsed JSON when it can be
 *     onStatus(status) { ... },         // "connecting" | "open" | "reconnecting" | "closed"
 *     onGap(ev) { ... },                // events were lost for this client (ev.data.snapshot: the state follows)
 *     onSnapshot(ev) { ... },           // after a gap, the channel's current state (server: hub.snapshot)
 *     onDenied(info) { ... },           // {status, reason}: the server refused this stream for good
 *     withCredentials: true,            // cross-origin: send cookies too (the server sets cors_credentials)
 *     shared: true,                     // one connection for every tab of this browser (below)
 *   });
 *   sub.close();
 *
 * shared: true keeps ONE server connection per browser profile for the same
 * URL, transport and event names, however many tabs follow it: HTTP/1.1
 * allows a browser 6 connections per origin, and each tab's own stream would
 * take one. The tabs elect a leader with the Web Locks API; the leader holds
 * the stream and passes every event, status and refusal to the others over a
 * BroadcastChannel. Every tab gets every event once, in order. When the
 * leading tab closes, the next tab in the lock's queue takes over at once; if
 * it freezes (a frozen background tab, a stuck script), the others notice it
 * no longer answers (0.8 s of silence) and one of them steals the lock. The new
 * leader resumes after the last event id the tabs have seen, so nothing is
 * lost or repeated. A tab that opens later with an older lastEventId gets
 * what it missed from the leader's recent events, or, when they do not reach
 * back that far, from a stream of its own that it closes once it has caught
 * up. Without Web Locks or BroadcastChannel each tab simply
 * opens its own stream. sub.leader says whether this tab holds the stream.
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
  const SNAPSHOT = "comet.snapshot";

  /* The handler an event goes to: onGap, onSnapshot, or else onEvent. */
  function handlerFor(options, ev) {
    const own = ev.event === GAP ? options.onGap : ev.event === SNAPSHOT ? options.onSnapshot : null;
    return own || options.onEvent;
  }

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

  /* An item from any transport -> {id, event, data, channel}. */
  function toEvent(value) {
    if (value && typeof value === "object" && !Array.isArray(value) && "data" in value && "id" in value) {
      return { id: value.id, event: value.event || "message", data: value.data, channel: value.channel || null };
    }
    return { id: null, event: "message", data: value, channel: null };
  }

  /* The cursor of a stream of several channels: "<tag>.<epoch>-<seq>" per
   * channel, joined by "_" (comet.hub.MultiSubscription). */
  const PIECE = /^([0-9a-z]{1,7})\.(\d+)-(\d+)$/;
  function cursorPieces(id) {
    if (typeof id !== "string" || id.indexOf(".") < 0) return null;
    const pieces = new Map();
    for (const piece of id.split("_")) {
      const m = PIECE.exec(piece);
      if (!m) return null;
      pieces.set(m[1], [BigInt(m[2]), BigInt(m[3])]);
    }
    return pieces;
  }

  /* SSE carries a channel in the data: {"channel": ..., "data": ...} (the
   * other transports have a "channel" member of their own). */
  function sseEvent(e) {
    const data = parseData(e.data), id = e.lastEventId || null;
    if (id && data && typeof data === "object" && cursorPieces(id) && Object.keys(data).length === 2 &&
        "channel" in data && "data" in data) {
      return { id: id, event: e.type, data: data.data, channel: data.channel };
    }
    return { id: id, event: e.type, data: data, channel: null };
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
        onEvent: () => {}, onStatus: () => {}, onGap: null, onSnapshot: null, onDenied: null,
        withCredentials: false,
      }, options || {});
      // Cross-origin streams: send cookies and HTTP auth only when asked
      // (the server must allow it: cors_credentials).
      this._credentials = this.options.withCredentials ? "include" : "same-origin";
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
        // A snapshot may carry its gap's id (a restarted server with nothing new): never "already shown".
        if (this.lastEventId && ev.id === this.lastEventId && ev.event !== SNAPSHOT) return; // already shown
        this.lastEventId = ev.id;
      }
      if (this.status !== "open") this._opened();
      try { handlerFor(this.options, ev)(ev); } catch (e) { console.error(e); }
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
          signal: abort.signal, cache: "no-store", credentials: this._credentials, headers: { Accept: "text/event-stream" },
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
      const source = new EventSource(withCursor(this.url, this.lastEventId), { withCredentials: this.options.withCredentials });
      this._source = source;
      const handler = (e) => this._deliver(sseEvent(e));
      let opened = false;
      source.onopen = () => { opened = true; this._opened(); };
      source.onmessage = handler;
      for (const name of new Set([GAP, SNAPSHOT].concat(this.options.events))) source.addEventListener(name, handler);
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
          signal: abort.signal, cache: "no-store", credentials: this._credentials,
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
            signal: abort.signal, cache: "no-store", credentials: this._credentials, headers: { Accept: "application/json" },
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

  /* Event ids are "<a>-<b>" (a hub epoch or a Redis time, then a sequence):
   * -1, 0 or 1 as a is before, equal to or after b; null if either is not one. */
  function compareIds(a, b) {
    const ca = cursorPieces(a), cb = cursorPieces(b);
    if (ca && cb) {  // several channels: ordered when every channel agrees
      let sign = 0;
      for (const [tag, x] of ca) {
        const y = cb.get(tag);
        if (!y) return null;
        const c = x[0] !== y[0] ? (x[0] < y[0] ? -1 : 1) : x[1] !== y[1] ? (x[1] < y[1] ? -1 : 1) : 0;
        if (c && sign && c !== sign) return null;
        sign = sign || c;
      }
      return ca.size === cb.size ? sign : null;
    }
    const pa = /^(\d+)-(\d+)$/.exec(a || ""), pb = /^(\d+)-(\d+)$/.exec(b || "");
    if (!pa || !pb) return null;
    for (const i of [1, 2]) {
      const x = BigInt(pa[i]), y = BigInt(pb[i]);
      if (x !== y) return x < y ? -1 : 1;
    }
    return 0;
  }

  const RECENT = 1000;      // events the leader keeps for tabs that join later
  const PING_AFTER = 300;   // ms of silence from the leader before a tab asks if it is there
  const STEAL_AFTER = 500;  // ms without an answer before a tab takes the stream over

  /* One stream shared by the tabs of a browser profile (shared: true). */
  class SharedSubscription {
    constructor(url, options) {
      this.url = url;
      this.options = Object.assign({
        transport: "sse", events: [], lastEventId: null,
        onEvent: () => {}, onStatus: () => {}, onGap: null, onSnapshot: null, onDenied: null,
      }, options || {});
      this.lastEventId = this.options.lastEventId || null;
      this.status = null;
      this.closed = false;
      this.leader = false;
      this._inner = null;     // the real Subscription, while this tab leads
      this._catchup = null;   // our own stream while we catch up to the leader (a late joiner)
      this._held = null;      // the leader's events held back meanwhile
      this._seen = new Set(); // recent ids delivered here: each event once
      this._seenOrder = [];
      this._recent = [];      // the leader's last events, for tabs that join
      this._me = Math.random().toString(36).slice(2);
      this._round = 0;        // bumped by every lock request; stale outcomes are ignored
      this._release = null;   // resolves the promise that holds the lock
      this._heard = Date.now();
      this._pinged = 0;
      const abs = new URL(url, global.location.href);
      abs.searchParams.delete("last_event_id");
      this.key = "comet " + this.options.transport + " " +
        Array.from(new Set(this.options.events)).sort().join(",") + " " + abs.href;
      this._channel = new global.BroadcastChannel(this.key);
      this._channel.onmessage = (e) => this._message(e.data);
      this._setStatus("connecting");
      this._post({ type: "hello", after: this.lastEventId });
      this._campaign(false);
      this._watch = setInterval(() => this._check(), 100);
    }

    close() {
      if (this.closed) return;
      this.closed = true;
      clearInterval(this._watch);
      if (this._catchup) this._catchup.close();
      this._stepDown();
      if (this._abort) this._abort.abort();
      this._channel.close();
      this._setStatus("closed");
    }

    _post(message) {
      message.from = this._me;
      try { this._channel.postMessage(message); } catch (e) { console.error(e); }
    }

    _setStatus(status) {
      if (status === this.status) return;
      this.status = status;
      try { this.options.onStatus(status); } catch (e) { console.error(e); }
    }

    /* Ask for the lock; steal=true takes it from a leader that stopped answering. */
    _campaign(steal) {
      if (this.closed) return;
      const round = ++this._round;
      if (this._abort) this._abort.abort();
      this._abort = null;
      let options = { steal: true };
      if (!steal) {
        this._abort = new AbortController();
        options = { signal: this._abort.signal };
      }
      global.navigator.locks.request(this.key, options, () => {
        if (this.closed || round !== this._round) return undefined;
        return new Promise((resolve) => { this._release = resolve; this._lead(); });
      }).catch(() => {
        // Aborted (we steal or close) or stolen from us (we froze and others
        // took over): follow, and queue for the next turn.
        if (round !== this._round || this.closed) return;
        this._stepDown();
        this._campaign(false);
      });
    }

    _lead() {
      if (this._catchup) {  // leading now: the leader's own stream reads from our cursor anyway
        const held = this._held;
        this._catchup.close();
        this._catchup = null;
        this._held = null;
        for (const ev of held) this._deliver(ev);
      }
      this.leader = true;
      this._heard = Date.now();
      const own = this.options;
      this._inner = new Subscription(this.url, Object.assign({}, own, {
        lastEventId: this.lastEventId,
        onEvent: (ev) => this._fromServer(ev),
        onGap: (ev) => this._fromServer(ev),
        onSnapshot: (ev) => this._fromServer(ev),  // every tab gets the state, not only the leader
        onStatus: (status) => {
          if (!this.leader) return;  // our own close() while stepping down: not news for the others
          this._post({ type: "status", status: status });
          this._setStatus(status);
        },
        onDenied: (info) => {
          this._post({ type: "denied", info: info });
          this._denied(info);
        },
      }));
    }

    _stepDown() {
      const inner = this._inner;
      this.leader = false;
      this._inner = null;
      if (inner) inner.close();
      if (this._release) { this._release(); this._release = null; }
    }

    _fromServer(ev) {
      if (!this.leader) return;
      this._recent.push(ev);
      if (this._recent.length > RECENT) this._recent.shift();
      this._post({ type: "event", ev: ev });
      this._deliver(ev);
    }

    _deliver(ev) {
      if (ev.id && ev.event === SNAPSHOT) {
        this.lastEventId = ev.id;  // (its id may be its gap's: see Subscription._deliver)
      } else if (ev.id) {
        if (this._seen.has(ev.id)) return;
        this._seen.add(ev.id);
        this._seenOrder.push(ev.id);
        if (this._seenOrder.length > RECENT) this._seen.delete(this._seenOrder.shift());
        this.lastEventId = ev.id;
      }
      try { handlerFor(this.options, ev)(ev); } catch (e) { console.error(e); }
    }

    _denied(info) {
      this.close();
      if (this.options.onDenied) {
        try { this.options.onDenied(info); } catch (e) { console.error(e); }
      } else {
        console.error("comet: " + this.url + " refused with " + info.status + ": " + info.reason);
      }
    }

    _message(m) {
      if (this.closed || !m || m.from === this._me) return;
      if (m.type === "hello" || m.type === "ping") {
        if (this.leader) this._answer(m);
        return;
      }
      if (this.leader && m.type !== "event") return;  // another tab's leftovers from before we took over
      this._heard = Date.now();
      this._pinged = 0;
      if (m.type === "event") {
        if (this._held) this._held.push(m.ev);  // newer than what the catch-up is reading
        else this._deliver(m.ev);
      } else if (m.type === "status") this._setStatus(m.status);
      else if (m.type === "denied") this._denied(m.info);
      else if (m.type === "replay" && m.to === this._me) {
        if (m.behind && !this._catchup) this._catchUp(m.last);
        for (const ev of m.events) this._deliver(ev);
        if (m.status) this._setStatus(m.status);
      }
    }

    /* A tab asks whether we lead (ping), or joins and asks what it missed (hello). */
    _answer(m) {
      if (m.type === "ping") { this._post({ type: "pong" }); return; }
      let events = [], behind = false;
      if (m.after && m.after !== this.lastEventId) {
        const i = this._recent.findIndex((ev) => ev.id === m.after);
        if (i >= 0) events = this._recent.slice(i + 1);
        else {
          const oldest = this._recent.length ? this._recent[0].id : this.lastEventId;
          const order = compareIds(m.after, oldest);
          if (order === null || order < 0) behind = true;  // older than what we kept: it catches up itself
          else events = this._recent.filter((ev) => compareIds(ev.id, m.after) === 1);
        }
      }
      this._post({ type: "replay", to: m.from, events: events, behind: behind, last: this.lastEventId, status: this.status });
    }

    /* Joined with a cursor older than the leader's recent events: read from
     * the server on a connection of our own until we reach where the leader
     * was, holding the leader's newer events back meanwhile, then let it go. */
    _catchUp(until) {
      this._held = [];
      const done = () => {
        if (!this._catchup) return;
        const held = this._held;
        this._catchup.close();
        this._catchup = null;
        this._held = null;
        for (const ev of held) this._deliver(ev);
      };
      const onEvent = (ev) => { this._deliver(ev); if (ev.id && compareIds(ev.id, until) >= 0) done(); };
      this._catchup = new Subscription(this.url, Object.assign({}, this.options, {
        lastEventId: this.lastEventId,
        onEvent: onEvent,
        onGap: (ev) => this._deliver(ev),
        onSnapshot: onEvent,
        onStatus: (status) => { if (status === "open" && compareIds(this.lastEventId, until) >= 0) done(); },
        onDenied: (info) => this._denied(info),
      }));
    }

    /* A follower's watch: a leader that stops answering is taken over. */
    _check() {
      if (this.closed || this.leader) return;
      const quiet = Date.now() - this._heard;
      if (quiet < PING_AFTER) return;
      if (!this._pinged) {
        this._pinged = Date.now();
        this._post({ type: "ping" });
      } else if (Date.now() - this._pinged >= STEAL_AFTER) {
        this._pinged = 0;
        this._heard = Date.now();
        this._campaign(true);
      }
    }
  }

  function subscribe(url, options) {
    const shareable = global.BroadcastChannel && global.navigator && global.navigator.locks && global.location;
    if (options && options.shared && shareable) return new SharedSubscription(url, options);
    return new Subscription(url, options);
  }

  global.Comet = {
    subscribe: subscribe,
    Subscription: Subscription,
    SharedSubscription: SharedSubscription,
    MultipartParser: MultipartParser,
    NDJSONParser: NDJSONParser,
    toEvent: toEvent,
    sseEvent: sseEvent,
    compareIds: compareIds,
    GAP: GAP,
    SNAPSHOT: SNAPSHOT,
  };
})(typeof window !== "undefined" ? window : globalThis);
