// The shoutbox page: stream shouts in after the server-rendered history,
// oldest at the top, newest at the bottom and scrolled into view.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const list = $("shouts");
  const moderator = list.dataset.moderator === "yes";
  const form = $("shout");
  const csrf = form.elements.csrf.value;
  const NICK = "comet-shoutbox:nick";  // localStorage: remembered across visits
  const MINE = "comet-shoutbox:mine";  // ids of this browser's own shouts
  const mine = new Set(JSON.parse(localStorage.getItem(MINE) || "[]"));
  const clock = new Intl.DateTimeFormat([], { hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  const day = new Intl.DateTimeFormat([], { dateStyle: "medium", timeStyle: "short" });

  function stamp(el, at) {
    // The server writes UTC; each viewer reads their own time zone.
    const when = new Date(at);
    el.dateTime = when.toISOString();
    el.textContent = clock.format(when);
    el.title = day.format(when);
  }

  function remember(id) {
    mine.add(id);
    localStorage.setItem(MINE, JSON.stringify([...mine].slice(-200)));
    const li = list.querySelector('li[data-id="' + CSS.escape(id) + '"]');
    if (li) li.classList.add("mine");
  }

  function nearBottom() {
    return list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  }

  function toBottom() {
    list.scrollTop = list.scrollHeight;
  }

  function shoutItem(id, data) {
    const li = document.createElement("li");
    li.dataset.id = id;
    const meta = document.createElement("span");
    meta.className = "meta";
    const who = document.createElement("b");
    who.className = "who";
    who.textContent = data.nick;  // text, never HTML
    meta.append(who, " ");
    if (data.tag) {
      const tag = document.createElement("span");
      tag.className = "tag"; tag.title = "the same tag, the same browser"; tag.textContent = "#" + data.tag;
      meta.append(tag, " ");
    }
    const time = document.createElement("time");
    stamp(time, data.at * 1000);
    meta.append(time);
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = data.text;
    li.append(meta, " ", what);
    if (moderator) {
      const del = document.createElement("button");
      del.className = "delete"; del.dataset.id = id; del.textContent = "delete";
      li.append(del);
    }
    li.classList.toggle("mine", mine.has(id));
    return li;
  }

  function onEvent(ev) {
    if (ev.event === "shout") {
      if (list.querySelector('li[data-id="' + CSS.escape(ev.id) + '"]')) return;
      const follow = nearBottom();  // someone reading older shouts is not yanked down
      const li = shoutItem(ev.id, ev.data);
      li.classList.add("new");
      list.append(li);
      while (list.children.length > 200) list.firstElementChild.remove();
      if (list.firstElementChild && list.firstElementChild.id === "gone-note") list.firstElementChild.remove();
      $("empty").hidden = true;
      if (follow || mine.has(ev.id)) toBottom();
    } else if (ev.event === "delete") {
      const li = list.querySelector('li[data-id="' + CSS.escape(ev.data.target) + '"]');
      if (li) li.remove();
      $("empty").hidden = list.children.length > 0;
    } else if (ev.event === "mod" && $("notices")) {
      const li = document.createElement("li");
      const time = document.createElement("time");
      stamp(time, (ev.data.at || Date.now() / 1000) * 1000);
      li.append(time, " ", ev.data.notice);
      $("notices").prepend(li);
    }
  }

  let floor = null;  // after a gap: the newest id the server no longer holds

  function redraw(snapshot) {
    // The server's current shouts, exact at the snapshot's id. What the page
    // showed stays: shouts the server still has come from the snapshot,
    // shouts deleted meanwhile go, and shouts from before anything the server
    // holds (it restarted, or dropped them) stay, greyed, above a note that
    // says so, instead of vanishing. The form is not touched.
    const follow = nearBottom();
    const fresh = snapshot.data.shouts;
    const served = new Set(fresh.map((s) => s.id));
    const oldest = fresh.length ? fresh[0].id : null;
    const gone = [], older = [];
    for (const li of list.querySelectorAll("li[data-id]")) {
      const id = li.dataset.id;
      if (served.has(id)) continue;
      if (li.classList.contains("gone") || floor && Comet.compareIds(id, floor) !== 1) gone.push(li);
      else if (snapshot.data.more && oldest && Comet.compareIds(id, oldest) === -1) older.push(li);  // beyond the 50
      // else: deleted while this page was away
    }
    for (const li of gone) {
      li.classList.add("gone");
      li.classList.remove("new");
      const del = li.querySelector("button.delete");
      if (del) del.remove();  // the server cannot delete what it no longer has
    }
    const items = [...gone];
    if (gone.length) {
      const note = document.createElement("li");
      note.id = "gone-note"; note.className = "note"; note.setAttribute("role", "note");
      note.textContent = (gone.length === 1 ? "The shout above is" : "The " + gone.length + " shouts above are") +
        " no longer on the server (it restarted, or dropped old shouts): only this page still shows " +
        (gone.length === 1 ? "it." : "them.");
      items.push(note);
    }
    list.replaceChildren(...items, ...older, ...fresh.map((s) => shoutItem(s.id, s)));
    $("empty").hidden = list.children.length > 0;
    floor = null;
    if (follow) toBottom();
  }

  for (const li of list.children) {
    stamp(li.querySelector("time"), Date.parse(li.querySelector("time").dateTime));
    li.classList.toggle("mine", mine.has(li.dataset.id));
  }
  toBottom();
  $("nick").value = localStorage.getItem(NICK) || "";
  if ($("nick").value) $("text").focus(); else $("nick").focus();

  // The connection's real state, in words. comet.js says "open" only while
  // the stream is heard from (a heartbeat at least), "reconnecting" once it
  // has been silent for about two heartbeats or broke, and "offline" while
  // the browser has no network; data-status keeps comet.js's name.
  const words = { connecting: "connecting\u2026", open: "live", reconnecting: "reconnecting\u2026", offline: "offline", closed: "ended" };
  const titles = {
    connecting: "Connecting to the shoutbox.",
    open: "Connected: new shouts appear as they are sent.",
    reconnecting: "The connection broke or went silent: reconnecting. New shouts may be missing until then.",
    offline: "Your device has no network: the page catches up when it is back.",
    closed: "This page no longer follows the shoutbox.",
  };
  let status = "idle";
  let polling = false;  // fell back to long-poll (a proxy holds the stream back)

  function drawStatus() {
    const el = $("status");
    el.dataset.status = status;
    el.dataset.transport = polling ? "longpoll" : "stream";
    el.textContent = (words[status] || status) + (polling && status === "open" ? " (long-poll)" : "");
    el.title = (titles[status] || "") + (polling ? " Something on the way (a proxy) holds the stream back, so the page follows it by long-poll." : "");
  }

  const room = {
    events: ["shout", "delete", "mod"],
    onEvent: onEvent,
    onSnapshot: redraw,                // after a gap: the current shouts, then live ones
    // A gap with no snapshot after it (the server could not make one): a fresh render.
    // With one, the snapshot comes next: what came before resume_id is gone from the server.
    onGap: (ev) => { if (ev.data && ev.data.snapshot) floor = ev.data.resume_id; else location.reload(); },
    onStatus: (s) => { status = s; drawStatus(); },
    onFallback: (info) => { polling = info.to === "longpoll"; drawStatus(); },
  };
  if (!$("pm")) {  // signed in, pm.js follows the room on the page's one stream
    Comet.subscribe("/events", Object.assign({
      transport: "sse",
      shared: true,                      // one connection for all this browser's shoutbox tabs
      lastEventId: list.dataset.cursor,  // exactly after what the server rendered
    }, room));
  }

  async function post(url, fields) {
    let response;
    try {
      response = await fetch(url, { method: "POST", body: new URLSearchParams(Object.assign({ csrf: csrf }, fields)) });
    } catch (err) {  // no answer at all; the browser's "Failed to fetch" tells nobody anything
      throw new Error("Cannot reach the shoutbox right now: your message is still in the box, try again in a moment.");
    }
    const doc = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (!response.ok) throw new Error(doc.error || "the server answered " + response.status);
    return doc;
  }

  room.post = post;
  window.Shoutbox = room;  // for pm.js

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    $("error").textContent = "";
    const nick = $("nick").value.trim();
    try {
      const doc = await post("/shout", { nick: nick, text: $("text").value });
      localStorage.setItem(NICK, nick);
      remember(doc.id);
      toBottom();
      $("text").value = "";
      $("text").focus();
    } catch (err) {
      $("error").textContent = err.message;  // the text stays in the box: nothing is lost
    }
  });

  list.addEventListener("click", async (e) => {
    const button = e.target.closest("button.delete");
    if (!button) return;
    try { await post("/delete", { id: button.dataset.id }); } catch (err) { $("error").textContent = err.message; }
  });
})();
