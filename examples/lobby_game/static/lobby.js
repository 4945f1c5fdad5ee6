// The lobby page: join, render every "state" event, click when it says GO.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const lobby = $("game").dataset.lobby;
  const key = "comet-lobby:" + lobby;  // sessionStorage: one player per tab
  let me = JSON.parse(sessionStorage.getItem(key) || "null");
  let sub = null;
  let shown = -1;  // version of the state on screen

  function say(text) { $("message").textContent = text || ""; }

  async function post(action, fields) {
    const body = new URLSearchParams(Object.assign({ name: lobby }, fields));
    const response = await fetch("/" + action, { method: "POST", body: body });
    const doc = await response.json().catch(() => ({ error: "HTTP " + response.status }));
    if (!response.ok) throw new Error(doc.error || "HTTP " + response.status);
    return doc;
  }

  function render(state) {
    // Several server processes may publish two changes in either order;
    // the version says which is newer.
    if (state.version < shown) return;
    shown = state.version;
    $("board").dataset.phase = state.phase;
    $("count").textContent = state.players.length + "/" + state.size;
    const list = $("players");
    list.replaceChildren(...state.players.map((p) => {
      const li = document.createElement("li");
      li.textContent = p.name;  // text, never HTML
      li.classList.toggle("offline", !p.online);
      li.classList.toggle("host", p.name === state.host);
      li.classList.toggle("me", !!me && p.name === me.name);
      li.classList.toggle("out", state.false_starts.includes(p.name));
      return li;
    }));
    const seated = !!me && state.players.some((p) => p.name === me.name);
    if (me && !seated && state.phase === "waiting") {  // our seat was given up: ask again
      sessionStorage.removeItem(key); me = null; say("You left the lobby.");
    }
    $("join").hidden = seated;
    $("leave").hidden = !seated;
    const isHost = seated && state.host === me.name;
    $("start").hidden = !(isHost && (state.phase === "waiting" || state.phase === "finished"));
    $("start").textContent = state.phase === "finished" ? "Play again" : "Start now";
    const play = $("play");
    const phase = $("phase");
    if (state.phase === "waiting") {
      phase.textContent = "Waiting for players (" + state.players.length + "/" + state.size + ")";
      play.disabled = true; play.textContent = "Wait\u2026";
    } else if (state.phase === "countdown") {
      phase.textContent = state.count > 0 ? String(state.count) : "Get ready\u2026";
      play.disabled = !seated; play.textContent = "Wait for GO";
    } else if (state.phase === "go") {
      phase.textContent = "GO!";
      play.disabled = !seated; play.textContent = "CLICK!";
    } else if (state.phase === "finished") {
      phase.textContent = state.winner + " won in " + state.reaction_ms + " ms";
      play.disabled = true; play.textContent = "Round over";
    }
  }

  function connect() {
    if (sub) sub.close();
    const url = "/events/" + encodeURIComponent(lobby) + (me ? "?player=" + encodeURIComponent(me.token) : "");
    sub = Comet.subscribe(url, {
      transport: "sse",
      events: ["state"],
      onEvent: (ev) => { if (ev.event === "state") render(ev.data); },
      // Missed states (the server restarted and forgot, or we fell behind):
      // start over without a cursor, which brings a fresh snapshot, whose
      // version may be lower than what is on screen (a restarted store).
      onGap: () => { shown = -1; connect(); },
      onStatus: (status) => { $("status").dataset.status = status; $("status").textContent = status; },
    });
  }

  async function join(name, token) {
    const seat = await post("join", token ? { player: name, token: token } : { player: name });
    me = seat;
    sessionStorage.setItem(key, JSON.stringify(seat));
    connect();
  }

  $("join").addEventListener("submit", async (e) => {
    e.preventDefault();
    try { say(""); await join($("name").value); } catch (err) { say(err.message); }
  });
  $("play").addEventListener("click", async () => {
    try { say((await post("click", { token: me.token })).message); } catch (err) { say(err.message); }
  });
  $("start").addEventListener("click", async () => {
    try { say(""); await post("start", { token: me.token }); } catch (err) { say(err.message); }
  });
  $("leave").addEventListener("click", async () => {
    try { await post("leave", { token: me.token }); } catch (err) { /* already gone */ }
    sessionStorage.removeItem(key); me = null; say("You left the lobby."); connect();
  });

  if (me) {  // a reload or a new visit from this tab: take the same seat back
    join(me.name, me.token).catch((err) => { sessionStorage.removeItem(key); me = null; say(err.message); connect(); });
  } else {
    connect();
  }
})();
