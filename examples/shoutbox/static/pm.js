// Private messages: the room, the user's threads, their own channel and who
// is online, all on ONE stream (/pm/events, signed: its URL comes from
// /pm/url on every connect). Opening a thread resubscribes
// with the longer channel list, resuming from the stream's cursor: the
// channels followed already lose nothing, the new one starts now and its
// last 100 messages come from /pm/thread, merged by message id.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const box = $("pm");
  if (!box) return;
  const room = window.Shoutbox;
  const me = box.dataset.me;
  const MAX = Number(box.dataset.max);
  const counts = { sent: Number(box.dataset.sent), received: Number(box.dataset.received) };
  const threads = new Map();  // peer -> {unread, messages: Map(mid -> message), loaded}
  const online = new Set();
  const clock = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  let open = null;            // the peer whose thread is shown
  let sub = null;
  let cursor = box.dataset.cursor;
  const pending = new Set();  // threads to read once the stream that follows them is open

  const threadOf = (peer) => [me, peer].sort().join(":");
  const peerOf = (channel) => channel.split(":").slice(1).find((n) => n !== me);

  function thread(peer) {
    let t = threads.get(peer);
    if (!t) {
      t = { unread: 0, messages: new Map(), loaded: false };
      threads.set(peer, t);
    }
    return t;
  }

  // -- the one stream ---------------------------------------------------------

  const threadList = () => [...threads.keys()].sort().map(threadOf).join(",");
  let followed = null;  // the thread list of the stream we follow
  let rounds = 0;       // subscriptions made by follow()

  /* A freshly signed URL of the stream on *list* ("url", or "poll": its
   * long-poll twin). comet.js asks on every (re)connect, so the short-lived
   * token in it is always fresh: no refresh loop here. */
  async function signed(list, kind) {
    const response = await fetch("/pm/url" + (list ? "?dm=" + encodeURIComponent(list) : ""), { cache: "no-store" });
    const doc = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (response.status === 403) ended("You are signed out: reload the page.");  // retrying cannot help
    if (!response.ok) throw new Error(doc.error);
    return doc[kind];
  }

  function ended(message) {
    if (sub) sub.close();
    room.onStatus("closed");
    $("pm-error").textContent = message;
    box.classList.add("ended");
  }

  /* (Re)subscribe with every thread we know; the cursor resumes the rest. */
  function follow() {
    const round = ++rounds;  // the subscription replaced here says "closed": not the page's state
    if (sub) {
      cursor = sub.lastEventId || cursor;
      sub.close();
    }
    const list = followed = threadList();
    sub = Comet.subscribe(() => signed(list, "url"), {
      transport: "sse",
      pollUrl: () => signed(list, "poll"),   // behind a proxy that holds streams back
      heartbeat: Number(document.body.dataset.heartbeat),
      shared: true,                  // the user's tabs share it (same threads) ...
      key: "/pm/events?dm=" + list,  // ... which the URL function alone cannot say
      events: room.events.concat(["pm", "thread", "comet.join", "comet.leave"]),
      lastEventId: cursor,
      onEvent: onEvent,
      onGap: onGap,
      onSnapshot: (ev) => { if (ev.channel === "shouts") room.onSnapshot(ev); },  // only the room has one
      onStatus: (s) => {
        if (round !== rounds) return;
        room.onStatus(s);
        if (s !== "open") return;
        for (const peer of pending) load(peer);  // followed from now on: read what came before
        pending.clear();
      },
      onFallback: room.onFallback,
      onDenied: (info) => ended(info.reason + ": reload the page."),
    });
  }

  function onEvent(ev) {
    if (ev.channel === "shouts") room.onEvent(ev.event === "shout" ? Object.assign({}, ev, { id: ev.data.id }) : ev);
    else if (ev.event === "pm") received(peerOf(ev.channel), ev.data);
    else if (ev.event === "thread" && !threads.has(ev.data.peer)) {
      thread(ev.data.peer);
      pending.add(ev.data.peer);  // the message that opened it is in the thread's history
      drawThreads();
      follow();
    } else if (ev.channel === "presence" && ev.event === "comet.join") { online.add(ev.data); drawOnline(); }
    else if (ev.channel === "presence" && ev.event === "comet.leave") { online.delete(ev.data); drawOnline(); }
  }

  function onGap(ev) {
    if (ev.channel === "shouts" || !ev.channel) room.onGap(ev);
    else if (ev.channel.startsWith("dm:")) {
      const t = thread(peerOf(ev.channel));
      t.loaded = false;
      if (open === peerOf(ev.channel)) load(open);
    }
  }

  // -- messages ---------------------------------------------------------------

  function received(peer, m) {
    const t = thread(peer);
    if (t.messages.has(m.mid)) return;
    t.messages.set(m.mid, m);
    if (m.from === me) counts.sent += 1; else counts.received += 1;
    if (m.from !== me && (peer !== open || document.hidden)) t.unread += 1;
    drawCounts();
    drawThreads();
    if (peer === open) { drawMessages(); markRead(); }
  }

  async function load(peer) {
    const response = await fetch("/pm/thread?peer=" + encodeURIComponent(peer), { cache: "no-store" });
    const doc = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (!response.ok) { $("pm-error").textContent = doc.error; return; }
    const t = thread(peer);
    for (const m of doc.messages) if (!t.messages.has(m.mid)) t.messages.set(m.mid, m);
    t.loaded = true;
    if (peer !== open) t.unread = Math.max(t.unread, doc.unread);
    drawThreads();
    // The server counted them all; what the stream brought is counted here already.
    counts.sent = Math.max(counts.sent, doc.counters.sent);
    counts.received = Math.max(counts.received, doc.counters.received);
    drawCounts();
    if (peer === open) drawMessages();
  }

  function markRead() {
    const t = threads.get(open);
    if (!t || document.hidden) return;
    if (t.unread) { t.unread = 0; drawThreads(); }
    room.post("/pm/read", { peer: open }).catch(() => {});  // only a badge is at stake
  }

  function show(peer) {
    open = peer;
    const t = thread(peer);
    $("pm-thread").hidden = false;
    $("pm-text").focus();
    $("pm-with").textContent = peer;
    drawMessages();
    drawThreads();
    markRead();
    if (t.loaded) return;
    if (sub && followed === threadList() && sub.status === "open") load(peer);
    else {
      pending.add(peer);
      if (!sub || followed !== threadList()) follow();  // a thread we did not follow: resubscribe, then read it
    }
  }

  // -- drawing (text, never HTML) -------------------------------------------------

  function drawCounts() {
    $("pm-sent").textContent = counts.sent;
    $("pm-received").textContent = counts.received;
    $("pm-total").textContent = counts.sent + counts.received;
  }

  function drawThreads() {
    const list = $("threads");
    for (const [peer, t] of threads) {
      let li = list.querySelector('li[data-peer="' + CSS.escape(peer) + '"]');
      if (!li) {
        li = document.createElement("li");
        li.dataset.peer = peer;
        const button = document.createElement("button");
        button.type = "button"; button.className = "thread"; button.textContent = peer + " ";
        const badge = document.createElement("span");
        badge.className = "badge"; badge.setAttribute("aria-label", "unread");
        button.append(badge);
        li.append(button);
        list.append(li);
      }
      const badge = li.querySelector(".badge");
      badge.textContent = t.unread;
      badge.hidden = !t.unread;
      li.classList.toggle("open", peer === open);
      li.classList.toggle("online", online.has(peer));
    }
  }

  function drawOnline() {
    const list = $("online");
    list.replaceChildren(...[...online].sort().map((name) => {
      const li = document.createElement("li");
      li.dataset.name = name;
      const button = document.createElement("button");
      button.type = "button"; button.className = "person"; button.textContent = name === me ? name + " (you)" : name;
      button.disabled = name === me;
      li.append(button);
      return li;
    }));
    drawThreads();
  }

  function drawMessages() {
    const list = $("pm-messages");
    const t = thread(open);
    const sorted = [...t.messages.values()].sort((a, b) => a.at - b.at);
    const follow = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    list.replaceChildren(...sorted.slice(-200).map((m) => {
      const li = document.createElement("li");
      li.className = m.from === me ? "mine" : "theirs";
      const time = document.createElement("time");
      time.dateTime = new Date(m.at * 1000).toISOString();
      time.textContent = clock.format(new Date(m.at * 1000));
      const text = document.createElement("span");
      text.className = "what";
      text.textContent = m.text;
      li.append(time, " ", text);
      return li;
    }));
    if (follow) list.scrollTop = list.scrollHeight;
  }

  // -- composing --------------------------------------------------------------

  const text = $("pm-text");
  const formatted = (n) => n.toLocaleString("en-US");

  function checkLength() {
    const n = [...text.value].length;  // characters, as the server counts them (not UTF-16 units)
    $("pm-count").textContent = formatted(n) + " / " + formatted(MAX);
    const over = n > MAX;
    $("pm-count").classList.toggle("over", over);
    $("pm-error").textContent = over ? "Too long: a private message is at most " + formatted(MAX) +
      " characters; this one has " + formatted(n) + "." : "";
    return !over;
  }

  text.addEventListener("input", checkLength);
  text.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      $("pm-form").requestSubmit();
    }
  });

  $("pm-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    if (!checkLength() || !text.value.trim() || !open) return;
    try {
      // Shown when it comes back on the stream (or, if the thread's stream is
      // still opening, in the history read once it is open).
      await room.post("/pm/send", { to: open, text: text.value });
      text.value = "";
      checkLength();
    } catch (err) {
      $("pm-error").textContent = err.message;  // the text stays in the box
    }
  });

  $("pm-open").addEventListener("submit", (e) => {
    e.preventDefault();
    const peer = $("pm-peer").value.trim().toLowerCase();
    if (!/^[a-z0-9][a-z0-9_-]{0,19}$/.test(peer) || peer === me) {
      $("pm-error").textContent = "A name is 1-20 letters a-z, digits, '-' or '_', and not your own.";
      return;
    }
    $("pm-error").textContent = "";
    $("pm-peer").value = "";
    show(peer);
  });

  box.addEventListener("click", (e) => {
    const button = e.target.closest("button.thread, button.person");
    if (!button) return;
    show(button.closest("li").dataset.peer || button.closest("li").dataset.name);
  });

  document.addEventListener("visibilitychange", () => { if (!document.hidden && open) markRead(); });

  for (const li of $("threads").children) {
    thread(li.dataset.peer).unread = Number(li.querySelector(".badge").textContent) || 0;
  }
  for (const li of $("online").children) online.add(li.dataset.name);
  drawThreads();
  follow();
})();
