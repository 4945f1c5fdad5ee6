/*
 * comet.js: the browser client for comet streams. No build step, no dependencies.
 *
 *   const sub = Comet.subscribe("/events", {  // or a function (sync or async) returning the URL
 *     transport: "sse",                 // "sse" | "multipart" | "chunked" | "longpoll"
 *     events: ["join", "leave"],        // SSE event names to listen for ("message" always)
 *     lastEventId: "1700000000000-41",  // resume after this id (e.g. the last rendered one)
 *     onEvent(ev) { ... },              // ev = {id, event, data}; data is parsed JSON when it can be
 *     onStatus(status) { ... },         // "connecting" | "open" | "reconnecting" | "offline" | "closed"
 *     onGap(ev) { ... },                // events were lost for this client (ev.data.snapshot: the state follows)
 *     onSnapshot(ev) { ... },           // after a gap, the channel's current state (server: hub.snapshot)
 *     onDenied(info) { ... },           // {status, reason}: the server refused this stream for good
 *     withCredentials: true,            // cross-origin: send cookies too (the server sets cors_credentials)
 *     shared: true,                     // one connection for every tab of this browser (below)
 *     key: "/dm/events?thread=ann:bob", // shared with a URL function: which stream it is
 *     heartbeat: 15,                    // seconds assumed until the server announces its heartbeat
 *     pollTimeout: 25,                  // long-poll: seconds a poll may take until an answer says (60)
 *     pollUrl: "/events/poll",          // the same stream as long-poll, for buffering proxies (below)
 *     onFallback(info) { ... },         // {from, to, reason}: streaming <-> long-poll; sub.transport
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
 * A dead connection is noticed, not waited for: every comet stream announces
 * its heartbeat (SSE: a `comet.heartbeat` event; fetch transports: the
 * Comet-Heartbeat header; long-poll: the poll timeout, also the answer's
 * `heartbeat`), and a stream with no byte for 2 heartbeats, or a long-poll
 * unanswered past its timeout plus a margin, is dropped and resumed: the
 * status is never "open" on a stream silent for longer. On `online`, on a
 * tab shown again, restored from the back/forward cache or resumed after
 * being frozen, a connection silent for over a heartbeat is replaced at
 * once, without waiting out a backoff (a server's Retry-After still holds);
 * while the browser is offline the
 * status is "offline". A connection that shows no byte within a heartbeat
 * is replaced (later ones wait up to 3 heartbeats); a stream that never
 * showed a byte, silent like that 3 times in a row, is held back by a
 * buffering proxy: with a
 * `pollUrl` the subscription follows on by long-poll from the same cursor
 * (onFallback) and tries streaming again after `retryStreamAfter` ms (5
 * minutes, doubling). A URL function is called on every (re)connect; a 403
 * after the stream had opened calls it once more before it counts as a
 * refusal (an expired token costs one round trip).
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

  /* The cursor of a stream of several channels: "<name>.<epoch>-<seq>" per
   * channel, joined by "_" (comet.hub.MultiSubscription), where <name> is the
   * channel's name percent-encoded (all but ASCII letters, digits, "-" and
   * ":"), so "." and "_" never occur in it: split on "_", then each piece at
   * its last ".". A name over 32 characters is "~" and 26 letters of its
   * hash instead ("~" in a name is always "%7E"): kept as is, after a NUL
   * (no channel name has one), so it never meets a name. Older servers wrote
   * a CRC-32 tag (base 36) as the name, which parses the same way. A map
   * name -> [epoch, seq], or null. */
  const PIECE = /^(~[a-z2-7]{26}|[A-Za-z0-9:%-]*)\.(\d+)-(\d+)$/;
  function cursorPieces(id) {
    if (typeof id !== "string" || id.indexOf(".") < 0) return null;
    const pieces = new Map();
    for (const piece of id.split("_")) {
      const m = PIECE.exec(piece);
      if (!m) return null;
      let name;
      try { name = m[1][0] === "~" ? "\0" + m[1] : decodeURIComponent(m[1]); } catch (e) { return null; }
      if (pieces.has(name)) return null;
      pieces.set(name, [BigInt(m[2]), BigInt(m[3])]);
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

  const DEFAULT_HEARTBEAT = 30;  // seconds assumed until the server announces its own
  const DEFAULT_POLL = 60;       // seconds a long-poll may take until an answer says its poll_timeout
  const DEAD_AFTER = 2;          // heartbeats without a byte on a live stream: it is dead
  const OPEN_SILENT = 2.5;       // heartbeats an "open" stream may be silent, at most
  const STALL_AFTER = 3;         // silent connects in a row (1, 2, then 3 heartbeats each): held back
  const RETRY_STREAM = 300000;   // ms on long-poll before a buffered stream is tried again

  const HELD_BACK = 86400000;  // ms a stream held back by a proxy is remembered (localStorage)

  /* localStorage, where a page may use it; 0 / nothing where not. */
  function recall(key) {
    try { return Number(global.localStorage.getItem(key)) || 0; } catch (e) { return 0; }
  }
  function remember(key, value) {
    try {
      if (value) global.localStorage.setItem(key, String(value));
      else global.localStorage.removeItem(key);
    } catch (e) { /* private mode, no storage: the next page finds out again */ }
  }

  /* Seconds in a Comet-Heartbeat header or field, or null. */
  function seconds(value) {
    const s = typeof value === "number" ? value : parseFloat(value);
    return Number.isFinite(s) && s > 0 ? s : null;
  }

  function online() { return !(global.navigator && global.navigator.onLine === false); }

  class Subscription {
    constructor(url, options) {
      this.url = url;  // a string, or a function (sync or async) returning one, called on every (re)connect
      this.options = Object.assign({
        transport: "sse", events: [], lastEventId: null,
        minDelay: 500, maxDelay: 30000,
        heartbeat: null,   // seconds assumed until the server announces its interval
        pollTimeout: null, // seconds a long-poll may take until an answer says (default 60)
        pollUrl: null,     // the same stream as long-poll: where a buffered stream falls back
        retryStreamAfter: RETRY_STREAM,
        onEvent: () => {}, onStatus: () => {}, onGap: null, onSnapshot: null, onDenied: null, onFallback: null,
        withCredentials: false,
      }, options || {});
      // Cross-origin streams: send cookies and HTTP auth only when asked
      // (the server must allow it: cors_credentials).
      this._credentials = this.options.withCredentials ? "include" : "same-origin";
      this.lastEventId = this.options.lastEventId || null;
      this.transport = this.options.transport;  // in use now: "longpoll" after a fallback
      this.heartbeat = null;                    // seconds the server announced for this transport
      this._pollTimeout = null; // seconds the long-poll answers announced (kept across fallbacks)
      this.status = null;
      this.attempt = 0;
      this.closed = false;
      this._timer = null;     // the next connect (a backoff wait)
      this._abort = null;
      this._source = null;
      this._gen = 0;          // bumped by every connect: a stale connection's news is ignored
      this._retryAfter = 0;   // ms a 503 or 429 asked us to wait
      this._notBefore = 0;    // the time that wait ends: a wake-up does not cut it short
      this._heard = Date.now();  // last sign of life of this connection (its start, headers, any byte)
      this._got = 0;          // of this connection: 0 nothing yet, 1 its headers, 2 body bytes
      this._announced = false;  // an SSE connection that sends comet.heartbeat (so it can be watched)
      this._stalls = 0;       // connections in a row that never got a byte
      this._streamed = false; // a stream connection of ours showed bytes: no proxy holds them back
      this._everOpened = false;
      this._renewed = false;  // a 403 made us ask the URL function once more
      this._streamAgain = 0;  // when a fallen-back subscription tries streaming again
      this._streamProbe = null;  // that try, beside the polls
      this._streamDelay = this.options.retryStreamAfter;
      // Held back on an earlier page (this browser is behind a buffering
      // proxy): poll from the start, and try the stream at once beside the polls.
      this._heldKey = "comet held back " + this.transport + " " + (typeof url === "function" ? String(url) : String(url).split("?")[0]);
      if (this.options.pollUrl && this.transport !== "longpoll" && Date.now() - recall(this._heldKey) < HELD_BACK) {
        this.transport = "longpoll";
        this._callFallback({ from: this.options.transport, to: "longpoll", reason: "the stream was held back on an earlier page" });
      }
      this._wake = (e) => this._woken(e);
      this._offline = () => { if (!this.closed) this._setStatus("offline"); };
      if (global.addEventListener) {
        for (const name of ["online", "pageshow"]) global.addEventListener(name, this._wake);
        global.addEventListener("offline", this._offline);
      }
      if (global.document && global.document.addEventListener) {
        for (const name of ["visibilitychange", "resume"]) global.document.addEventListener(name, this._wake);
      }
      this._tick();
      this._connect();
    }

    close() {
      this.closed = true;
      clearTimeout(this._timer);
      clearTimeout(this._ticker);
      if (this._streamProbe) this._streamProbe.close();
      this._hangUp();
      if (global.removeEventListener) {
        for (const name of ["online", "pageshow"]) global.removeEventListener(name, this._wake);
        global.removeEventListener("offline", this._offline);
      }
      if (global.document && global.document.removeEventListener) {
        for (const name of ["visibilitychange", "resume"]) global.document.removeEventListener(name, this._wake);
      }
      this._setStatus("closed");
    }

    _setStatus(status) {
      if (status === this.status) return;
      this.status = status;
      try { this.options.onStatus(status); } catch (e) { console.error(e); }
    }

    /* Drop the current connection, if any; its late news is ignored. */
    _hangUp() {
      this._gen += 1;
      if (this._source) { this._source.close(); this._source = null; }
      if (this._abort) { this._abort.abort(); this._abort = null; }
    }

    /* The interval this connection is watched with, in ms. */
    _interval() {
      if (this.transport === "longpoll") {
        // Thread-mode servers send the announcing header with the answer
        // only: a poll is never cut before its poll_timeout is known.
        return 1000 * (this._pollTimeout || seconds(this.options.pollTimeout) || DEFAULT_POLL);
      }
      return 1000 * (this.heartbeat || seconds(this.options.heartbeat) || DEFAULT_HEARTBEAT);
    }

    _learn(value) {
      const s = seconds(value);
      if (s) this.heartbeat = s;
    }

    _learnPoll(value) {
      const s = seconds(value);
      if (s) this.heartbeat = this._pollTimeout = s;
    }

    /* Any byte (a heartbeat too) of connection gen. */
    _alive(gen, body) {
      if (gen !== this._gen) return false;
      this._heard = Date.now();
      if (body) {
        this._got = 2;
        this._stalls = 0;
        if (this.transport !== "longpoll") this._streamed = true;
      }
      else if (!this._got) this._got = 1;
      return true;
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

    /* The stream's position moved with no event to show (a heartbeat's id,
     * a long-poll answer's cursor). */
    _cursor(id) {
      if (id === this.lastEventId) return;
      this.lastEventId = id;
      if (this.options.onCursor) {
        try { this.options.onCursor(id); } catch (e) { console.error(e); }
      }
    }

    _opened() {
      this.attempt = 0;
      this._everOpened = true;
      this._renewed = false;
      this._setStatus("open");
    }

    /* The watchdog: a connection silent for too long is dead (or stalled
     * behind a buffering proxy). It runs a few times per heartbeat. */
    _tick() {
      if (this.closed) return;
      const every = Math.max(50, Math.min(1000, this._interval() / 5));
      this._ticker = setTimeout(() => this._tick(), every);
      this._watch();
    }

    /* One look (also on a shared stream's pings: a leading tab in the
     * background has its timers slowed, not its messages). */
    _watch() {
      if (this.closed || this._timer !== null) return;  // between connections: nothing to watch
      const beat = this._interval(), silent = Date.now() - this._heard;
      if (this.transport === "longpoll") {
        // An empty answer is the long-poll's heartbeat: a request that
        // outlives poll_timeout by a margin will not be answered.
        if (silent > beat + Math.max(1000, beat / 2)) this._dead("the long-poll was not answered in time");
      } else if (this._got === 2) {
        // EventSource shows no comments: an SSE stream is watched only once
        // it sends comet.heartbeat events (every comet server does).
        if ((this.transport !== "sse" || this._announced) && silent > DEAD_AFTER * beat) this._dead("the stream went silent");
      } else {
        // A comet stream sends bytes as soon as it opens (its preamble and
        // heartbeat): a connection silent for a heartbeat is dead or held
        // back. It may be an idle kept-alive one that died with the others
        // (the browser cannot tell), so the next waits longer: 1, 2, then 3
        // heartbeats. Headers with no body: the whole 3 (SSE: 2.5).
        // A subscription whose stream has shown bytes before is not behind a
        // buffering proxy: its silent connects are dead sockets, a few in a
        // row (the browser's pool), before the wait grows.
        // An SSE connection is "open" from its headers: silent past 2.5
        // heartbeats (before its first comet.heartbeat too: blackholed right
        // after it opened) it is not open any more.
        const grown = this._streamed ? Math.max(0, this._stalls - 2) : this._stalls;
        const headers = this.transport === "sse" ? OPEN_SILENT : STALL_AFTER;
        const wait = this._got === 1 ? headers : Math.min(STALL_AFTER, 1 + grown);
        if (silent > wait * beat) this._stalled();
      }
    }

    /* Nothing arrived since connecting: the network is gone, or a proxy
     * holds the whole response (it never ends, so it never comes). */
    _stalled() {
      this._stalls += 1;
      const buffered = this._got === 1 || (!this._streamed && this._stalls >= STALL_AFTER && online());
      if (buffered && this.options.pollUrl && this.transport !== "longpoll") {
        this._fallback(this._got === 1 ? "the stream opened but sent nothing" : "no byte of the stream arrived");
      } else {
        // It waited its heartbeats already: back soon, not after a growing backoff.
        this._hangUp();
        this._retry(false, true);
      }
    }

    _dead(reason) {
      this._hangUp();
      this._retry();
    }

    _callFallback(info) {
      if (!this.options.onFallback) return;
      try { this.options.onFallback(info); } catch (e) { console.error(e); }
    }

    /* Follow on by long-poll from the same cursor; try streaming again later. */
    _fallback(reason) {
      const from = this.transport;
      this._hangUp();
      this.transport = "longpoll";
      this.heartbeat = this._pollTimeout;  // what earlier polls taught, if any
      this._stalls = 0;
      this._streamAgain = Date.now() + this._streamDelay;
      this._streamDelay = Math.min(this._streamDelay * 2, 3600000);
      remember(this._heldKey, Date.now());
      this._callFallback({ from: from, to: "longpoll", reason: reason });
      this.attempt = 0;
      this._connectNow();
    }

    /* While polling: open the stream beside the polls; once a byte of it
     * arrives, switch to it (from the same cursor). Still nothing after 3
     * heartbeats: stay on long-poll and try again twice as late. */
    async _probeStream() {
      const transport = this.options.transport, abort = new AbortController();
      let source = null, timer = null, done = false;
      const finish = (through) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        if (source) source.close();
        abort.abort();
        if (this._streamProbe === probe) this._streamProbe = null;
        if (this.closed || this.transport !== "longpoll") return;
        if (!through) {
          this._streamAgain = Date.now() + this._streamDelay;
          this._streamDelay = Math.min(this._streamDelay * 2, 3600000);
          return;
        }
        this._streamDelay = this.options.retryStreamAfter;
        remember(this._heldKey, null);
        this._hangUp();
        this.transport = transport;
        this.heartbeat = null;
        this._callFallback({ from: "longpoll", to: transport, reason: "the stream gets through again" });
        this._connectNow();
      };
      const probe = { close: () => finish(false) };
      this._streamProbe = probe;
      timer = setTimeout(() => finish(false), STALL_AFTER * 1000 * (seconds(this.options.heartbeat) || DEFAULT_HEARTBEAT));
      try {
        let url = this.url;
        if (typeof url === "function") url = await url();
        if (done) return;
        url = withCursor(url, this.lastEventId);
        if (transport === "sse") {
          source = new EventSource(url, { withCredentials: this.options.withCredentials });
          // The heartbeat event comes right after the preamble: a byte of the body.
          source.addEventListener("comet.heartbeat", () => finish(true));
          source.onmessage = () => finish(true);
          source.onerror = () => finish(false);
          return;
        }
        const response = await fetch(url, { signal: abort.signal, cache: "no-store", credentials: this._credentials });
        if (response.status !== 200 || !response.body) { finish(false); return; }
        const { done: ended } = await response.body.getReader().read();
        finish(!ended);
      } catch (e) {
        finish(false);
      }
    }

    /* After a wake-up (online, a tab shown or restored, a frozen tab resumed):
     * a connection silent for longer than a heartbeat is not trusted. */
    _woken(e) {
      if (this.closed) return;
      if (e && e.type === "pageshow" && !e.persisted) return;
      if (e && e.type === "visibilitychange" && global.document.visibilityState !== "visible") return;
      if (!online()) { this._setStatus("offline"); return; }
      // The server said when to come back (admission control, a rate
      // limit): switching tabs does not make that sooner.
      if (this._timer !== null && Date.now() < this._notBefore) return;
      const silent = Date.now() - this._heard;
      const slack = this.transport === "longpoll" ? 500 : 0;
      const blind = this.transport === "sse" && this._got && !this._announced;  // EventSource hides its heartbeats
      if (this._timer !== null || (!blind && silent > this._interval() + slack)) {
        this.attempt = 0;
        this._setStatus("reconnecting");
        this._connectNow();
      } else if (this.status === "offline") {
        this._setStatus(this._got ? "open" : "connecting");
      }
    }

    _connectNow() {
      clearTimeout(this._timer);
      this._timer = null;
      this._retryAfter = 0;
      this._connect();
    }

    /* A non-200 answer: true if it was dealt with here (no plain retry). */
    async _refused(response) {
      const status = response.status;
      const after = response.headers.get("Retry-After");
      if (after && (status === 503 || status === 429)) {
        // The server says when (admission control, a backend outage): not sooner.
        const secs = Number(after);
        const ms = Number.isFinite(secs) ? secs * 1000 : Date.parse(after) - Date.now();
        if (ms > 0) this._retryAfter = Math.min(ms, 300000);
      }
      if (status < 400 || status >= 500 || status === 408 || status === 429) return false;
      let reason = "";
      const gen = this._gen;
      try { reason = (await response.text()).trim(); } catch (e) { /* the reason is a courtesy */ }
      if (this.closed || gen !== this._gen) return true;
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
      if (status === 403 && typeof this.url === "function" && this._everOpened && !this._renewed) {
        // Most likely an expired token in a URL that renews itself: one
        // more URL, at once. A second 403 in a row is a refusal.
        this._renewed = true;
        this._retry(true);
        return true;
      }
      this.close();
      if (this.options.onDenied) {
        try { this.options.onDenied({ status: status, reason: reason }); } catch (e) { console.error(e); }
      } else {
        console.error("comet: " + this._lastUrl + " refused with " + status + ": " + reason);
      }
      return true;
    }

    /* EventSource failed before it opened: fetch the URL once to learn why. */
    async _probe(url, gen) {
      const abort = new AbortController();
      this._abort = abort;
      try {
        const response = await fetch(withCursor(url, this.lastEventId), {
          signal: abort.signal, cache: "no-store", credentials: this._credentials, headers: { Accept: "text/event-stream" },
        });
        if (gen !== this._gen) return;
        if (response.status !== 200 && await this._refused(response)) return;
        abort.abort(); // a stream (or a 5xx): the retry below opens the EventSource again
      } catch (e) {
        if (this.closed || gen !== this._gen) return;
      }
      if (gen !== this._gen) return;
      this._abort = null;
      this._retry();
    }

    _retry(now, soon) {
      if (this.closed) return;
      this._hangUp();
      if (!online()) {
        // No network: wait for the browser's "online" (and try now and then, in case it is wrong).
        this._setStatus("offline");
        clearTimeout(this._timer);
        this._timer = setTimeout(() => this._connectNow(), this.options.maxDelay);
        return;
      }
      this._setStatus("reconnecting");
      // Exponential backoff with full jitter: many clients dropped at once by a
      // restart do not all come back in the same instant.
      const ceiling = Math.min(this.options.maxDelay, this.options.minDelay * Math.pow(2, this.attempt));
      let delay = now ? 0 : soon ? Math.random() * this.options.minDelay / 2 : this.options.minDelay / 2 + Math.random() * ceiling;
      if (this._retryAfter) {
        // Up to 20% later: a crowd told the same Retry-After does not return at once.
        delay = Math.max(delay, this._retryAfter * (1 + Math.random() * 0.2));
        this._retryAfter = 0;
        this._notBefore = Date.now() + delay;
      }
      if (!soon) this.attempt += 1;
      clearTimeout(this._timer);
      this._timer = setTimeout(() => { this._timer = null; this._connect(); }, delay);
    }

    async _connect() {
      if (this.closed) return;
      this._hangUp();
      clearTimeout(this._timer);
      this._timer = null;
      const gen = this._gen;
      this._heard = Date.now();
      this._got = 0;
      this._announced = false;
      if (this.status !== "reconnecting" && this.status !== "offline") this._setStatus("connecting");
      const t = this.transport;
      let url = t === "longpoll" && this.options.transport !== "longpoll" ? this.options.pollUrl : this.url;
      try {
        if (typeof url === "function") url = await url();
      } catch (e) {
        if (gen !== this._gen || this.closed) return;
        console.error(e);
        this._retry();
        return;
      }
      if (gen !== this._gen || this.closed) return;
      this._lastUrl = url;
      if (t === "sse") this._sse(url, gen);
      else if (t === "longpoll") this._longpoll(url, gen);
      else if (t === "multipart" || t === "chunked") this._fetchStream(t, url, gen);
      else throw new Error("unknown transport " + t);
    }

    _sse(url, gen) {
      const source = new EventSource(withCursor(url, this.lastEventId), { withCredentials: this.options.withCredentials });
      this._source = source;
      // EventSource gives an event with no id of its own the last id this
      // connection saw (an event's, or a heartbeat's cursor): such an event
      // is not "already shown", it has no id.
      let told = "";
      const handler = (e) => {
        if (!this._alive(gen, true)) return;
        const ev = sseEvent(e);
        if (e.lastEventId === told && e.type !== SNAPSHOT) ev.id = null;  // (a snapshot may carry its gap's id)
        told = e.lastEventId;
        this._deliver(ev);
      };
      let opened = false;
      source.onopen = () => { if (!this._alive(gen, false)) return; opened = true; this._opened(); };
      source.onmessage = handler;
      for (const name of new Set([GAP, SNAPSHOT].concat(this.options.events))) source.addEventListener(name, handler);
      source.addEventListener("comet.heartbeat", (e) => {
        if (!this._alive(gen, true)) return;
        this._announced = true;
        this._learn(e.data);
        // A heartbeat may say the stream's cursor (a stream with no event
        // yet): a reconnect resumes there, not "from now".
        if (e.lastEventId) this._cursor(e.lastEventId);
        told = e.lastEventId;
        if (this.status !== "open") this._opened();
      });
      source.onerror = () => {
        source.close();
        if (gen !== this._gen || this.closed) return;
        this._source = null;
        if (opened) this._retry();
        else this._probe(url, gen);
      };
    }

    async _fetchStream(transport, url, gen) {
      const abort = new AbortController();
      this._abort = abort;
      try {
        const response = await fetch(withCursor(url, this.lastEventId), {
          signal: abort.signal, cache: "no-store", credentials: this._credentials,
          headers: { Accept: transport === "multipart" ? "multipart/x-mixed-replace" : "application/x-ndjson" },
        });
        if (!this._alive(gen, false)) return;
        if (response.status !== 200 && await this._refused(response)) return;
        if (response.status !== 200 || !response.body) throw new Error("HTTP " + response.status);
        this._learn(response.headers.get("Comet-Heartbeat"));
        let parser;
        if (transport === "multipart") {
          const m = /boundary="?([^";]+)"?/.exec(response.headers.get("Content-Type") || "");
          if (!m) throw new Error("multipart response without boundary");
          parser = new MultipartParser(m[1]);
        } else {
          parser = new NDJSONParser();
        }
        const reader = response.body.getReader();
        for (;;) {
          const { value, done } = await reader.read();
          if (done || !this._alive(gen, true)) break;
          if (this.status !== "open") this._opened();  // the preamble: the stream is through
          for (const item of parser.feed(value)) {
            this._deliver(transport === "multipart" ? partToEvent(item) : toEvent(item));
          }
        }
      } catch (e) {
        if (this.closed) return;
      }
      if (gen !== this._gen) return;
      this._abort = null;
      this._retry(); // the server ended the stream or it broke: come back and resume
    }

    async _longpoll(url, gen) {
      while (!this.closed && gen === this._gen) {
        if (this.options.transport !== "longpoll" && !this._streamProbe && Date.now() >= this._streamAgain) {
          this._probeStream();  // fell back a while ago: is the stream through now?
        }
        const abort = new AbortController();
        this._abort = abort;
        this._heard = Date.now();
        try {
          const response = await fetch(withCursor(url, this.lastEventId), {
            signal: abort.signal, cache: "no-store", credentials: this._credentials, headers: { Accept: "application/json" },
          });
          if (!this._alive(gen, false)) return;
          if (response.status !== 200 && await this._refused(response)) return;
          if (response.status !== 200) throw new Error("HTTP " + response.status);
          this._learnPoll(response.headers.get("Comet-Heartbeat"));
          const doc = await response.json();
          if (!this._alive(gen, true)) return;
          this._learnPoll(doc.heartbeat);
          this._opened();
          for (const item of doc.events) this._deliver(toEvent(item));
          // The answer's cursor, events or not: the next poll starts exactly
          // there (without it, what is published between polls is lost).
          if (doc.cursor) this._cursor(doc.cursor);
        } catch (e) {
          if (this.closed || gen !== this._gen) return;
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
      this.transport = this.options.transport;
      // The tabs that share: same transport, event names and URL (or key).
      let where = this.options.key;
      if (!where && typeof url === "function") {
        // Its source is no name for a stream: "() => signed(thread)" in two tabs may follow two threads.
        throw new Error("shared: true with a URL function needs a key");
      }
      if (!where) {
        const abs = new URL(url, global.location.href);
        abs.searchParams.delete("last_event_id");
        where = abs.href;
      }
      this.key = "comet " + this.options.transport + " " +
        Array.from(new Set(this.options.events)).sort().join(",") + " " + where;
      this._channel = new global.BroadcastChannel(this.key);
      this._channel.onmessage = (e) => this._message(e.data);
      this._setStatus("connecting");
      // A follower woken up (shown, back online) asks the leader to check its
      // stream: a leading tab in the background may have its timers slowed.
      this._wake = (e) => {
        if (this.leader || this.closed) return;
        if (e.type === "pageshow" && !e.persisted) return;
        if (e.type === "visibilitychange" && global.document.visibilityState !== "visible") return;
        this._post({ type: "wake" });
      };
      global.addEventListener("online", this._wake);
      global.addEventListener("pageshow", this._wake);
      global.document.addEventListener("visibilitychange", this._wake);
      global.document.addEventListener("resume", this._wake);
      this._post({ type: "hello", after: this.lastEventId });
      this._campaign(false);
      this._watch = setInterval(() => this._check(), 100);
    }

    close() {
      if (this.closed) return;
      this.closed = true;
      clearInterval(this._watch);
      global.removeEventListener("online", this._wake);
      global.removeEventListener("pageshow", this._wake);
      global.document.removeEventListener("visibilitychange", this._wake);
      global.document.removeEventListener("resume", this._wake);
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
        onFallback: (info) => {
          if (!this.leader) return;
          this._post({ type: "fallback", info: info });
          this._fellBack(info);
        },
        onCursor: (id) => {  // what a tab joining later is told (replay: last)
          if (this.leader) this.lastEventId = id;
        },
      }));
    }

    _fellBack(info) {
      this.transport = info.to;
      if (!this.options.onFallback) return;
      try { this.options.onFallback(info); } catch (e) { console.error(e); }
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
      if (m.type === "wake") {
        if (this.leader && this._inner) this._inner._woken({ type: "wake" });
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
      else if (m.type === "fallback") this._fellBack(m.info);
      else if (m.type === "replay" && m.to === this._me) {
        if (m.behind && !this._catchup) this._catchUp(m.last);
        // No cursor of our own: the leader's is where we are now (should we lead next).
        if (!this.lastEventId && !m.events.length && m.last) this.lastEventId = m.last;
        for (const ev of m.events) this._deliver(ev);
        if (m.status) this._setStatus(m.status);
      }
    }

    /* A tab asks whether we lead (ping), or joins and asks what it missed (hello). */
    _answer(m) {
      if (m.type === "ping") {
        this._post({ type: "pong" });
        if (this._inner) this._inner._watch();
        return;
      }
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
    if (options && options.shared && shareable) {
      // A URL function says where to connect, not which stream it is: two
      // pages may share its source, not its closure. It needs a key to share.
      if (typeof url !== "function" || options.key) return new SharedSubscription(url, options);
      console.warn("comet: shared: true with a URL function needs options.key (which stream this is): not shared");
    }
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
    cursorPieces: cursorPieces,
    GAP: GAP,
    SNAPSHOT: SNAPSHOT,
  };
})(typeof window !== "undefined" ? window : globalThis);
