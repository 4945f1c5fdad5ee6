// The lobby page: join, render every "state" event, click when it says GO.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const lobby = $("game").dataset.lobby;
  const heartbeat = Number(document.body.dataset.heartbeat);
  const key = "comet-lobby:" + lobby;  // sessionStorage: one player per tab
  let me = JSON.parse(sessionStorage.getItem(key) || "null");
  let sub = null;
  let rounds = 0;      // subscriptions made by connect()
  let opening = null;  // while nobody is here: the index stream, to see the lobby open
  let shown = -1;      // version of the state on screen
  let round = null;    // the round on screen: a new one clears the last one's message

  function say(text) { $("message").textContent = text || ""; }

  async function post(action, fields) {
    const body = new URLSearchParams(Object.assign({ name: lobby }, fields));
    let response;
    try {
      response = await fetch("/" + action, { method: "POST", body: body });
    } catch (err) {  // no answer at all: the browser's "Failed to fetch" tells a player nothing
      throw new Error("Cannot reach the game server. Check your connection and try again.");
    }
    const doc = await response.json().catch(() => ({ error: "the server answered " + response.status }));
    if (!response.ok) throw new Error(doc.error || "the server answered " + response.status);
    return doc;
  }

  function playerItem(p, state) {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = p.name;  // text, never HTML
    li.append(name);
    const tag = (cls, text) => { const t = document.createElement("span"); t.className = "tag " + cls; t.textContent = text; li.append(" ", t); };
    if (me && p.name === me.name) tag("you", "you");
    if (p.name === state.host) tag("host", "host");
    if (!p.online) tag("away", "away");
    if (state.false_starts.includes(p.name)) tag("out", "sits out");
    const wins = (state.wins || {})[p.name] || 0;
    const score = document.createElement("span");
    score.className = "wins";
    score.textContent = wins === 1 ? "1 win" : wins + " wins";
    li.append(score);
    li.classList.toggle("offline", !p.online);
    li.classList.toggle("host", p.name === state.host);
    li.classList.toggle("me", !!me && p.name === me.name);
    li.classList.toggle("out", state.false_starts.includes(p.name));
    return li;
  }

  function render(state) {
    // Several server processes may publish two changes in either order;
    // the version says which is newer.
    if (state.version < shown) return;
    shown = state.version;
    if (round !== null && state.round !== round && state.phase === "countdown") say("");
    round = state.round;
    const open = state.players.length > 0;
    $("board").dataset.phase = state.phase;
    $("count").textContent = state.players.length + "/" + state.size;
    $("players").replaceChildren(...state.players.map((p) => playerItem(p, state)));
    const seated = !!me && state.players.some((p) => p.name === me.name);
    if (me && !seated && (state.phase === "waiting" || state.phase === "finished")) {  // our seat was given up
      sessionStorage.removeItem(key); me = null; say("You left the lobby.");
    }
    const isHost = seated && state.host === me.name;
    const between = state.phase === "waiting" || state.phase === "finished";
    const full = state.players.length >= state.size;
    $("you").hidden = !seated;
    if (seated) { $("me-name").textContent = me.name; $("me-host").hidden = !isHost; }
    $("join").hidden = seated || !between || full;
    $("leave").hidden = !seated;
    $("start").hidden = !(isHost && between);
    $("start").textContent = state.phase === "finished" ? "Play again" : "Start the game";
    const play = $("play");
    const phase = $("phase");
    const host = state.host;
    let hint = "";
    play.className = "play hold";
    if (!open) {
      phase.textContent = "Nobody is here yet: join to open this lobby";
      play.disabled = true; play.textContent = "Wait\u2026";
    } else if (state.phase === "waiting") {
      phase.textContent = "Waiting for players (" + state.players.length + "/" + state.size + ")";
      hint = isHost ? "You are the host: start when everyone is in (a full lobby starts by itself)."
        : seated ? "Waiting for the host, " + host + ", to start." : full ? "This lobby is full." : "Join to play.";
      play.disabled = true; play.textContent = "Wait\u2026";
    } else if (state.phase === "countdown") {
      phase.textContent = state.count > 0 ? String(state.count) : "Get ready\u2026";
      // Still clickable, on purpose: clicking now is a false start (the rules say so).
      play.disabled = !seated; play.textContent = "wait for GO\u2026";
      if (!seated) hint = "A round is being played: you can join as soon as it ends.";
    } else if (state.phase === "go") {
      phase.textContent = "GO!";
      play.disabled = !seated; play.textContent = "CLICK!"; play.className = "play go";
      if (!seated) hint = "A round is being played: you can join as soon as it ends.";
    } else if (state.phase === "finished") {
      phase.textContent = state.winner + " won in " + state.reaction_ms + " ms";
      play.disabled = true; play.textContent = "Round over";
      hint = isHost ? "Press Play again when everyone is ready; newcomers can join now."
        : seated ? "Waiting for the host, " + host + ", to start the next round."
        : full ? "This lobby is full." : "Join now to play the next round.";
    }
    $("board").dataset.count = state.phase === "countdown" ? String(state.count) : "";
    $("hint").textContent = hint;
  }

  function closedLobby(rendered) {
    // The server says nobody is in this lobby (never opened, or the last
    // player left while this page was away): show it empty, offer to join.
    if (me) { sessionStorage.removeItem(key); me = null; say("You left the lobby."); }
    shown = -1;
    render({ lobby: lobby, phase: "waiting", count: null, round: 0, size: Number($("count").textContent.split("/")[1]),
             host: null, winner: null, reaction_ms: null, false_starts: [], players: [], wins: {}, version: -1 });
    $("status").textContent = "not open";
    watchForOpening(rendered === true);
  }

  function watchForOpening(fromRender) {
    // Someone else may open this lobby while we look at it (a friend sent
    // the link): follow the index and come in then. From the page's render
    // if that is what showed it empty; else from now (earlier events are
    // from before the server said "nobody here").
    if (opening) return;
    opening = Comet.subscribe("/updates", {
      transport: "sse",
      pollUrl: "/updates_poll",
      heartbeat: heartbeat,
      shared: true,
      events: ["lobby"],
      lastEventId: fromRender ? $("game").dataset.cursor : null,
      onEvent: (ev) => {
        if (ev.event !== "lobby" || ev.data.lobby !== lobby || !ev.data.players || sub && !sub.closed) return;
        stopWatching();
        connect();
      },
      onGap: () => { stopWatching(); connect(); },  // missed something: just look again
    });
  }

  function stopWatching() {
    if (opening) { opening.close(); opening = null; }
  }

  function connect() {
    stopWatching();
    const round = ++rounds;  // the subscription replaced here says "closed": not the page's state
    if (sub) sub.close();
    const query = me ? "?player=" + encodeURIComponent(me.token) : "";
    sub = Comet.subscribe("/events/" + encodeURIComponent(lobby) + query, {
      transport: "sse",
      pollUrl: "/poll/" + encodeURIComponent(lobby) + query,  // behind a proxy that holds streams back
      heartbeat: heartbeat,  // the server's, until its stream says so itself
      shared: true,  // a player's tabs of this lobby share one connection
      events: ["state"],
      onEvent: (ev) => { if (ev.event === "state") render(ev.data); },
      // Missed states (we fell behind, or the lobby was opened anew): the
      // server follows the gap with the whole state (hub.snapshot), whose
      // version may be lower than what is on screen (a restarted store).
      onSnapshot: (ev) => { shown = -1; render(ev.data); },
      // A gap with no state after it: start over without a cursor, which
      // brings a fresh state (or the 404 of a lobby nobody is in).
      onGap: (ev) => { if (!(ev.data && ev.data.snapshot)) { shown = -1; connect(); } },
      onDenied: () => closedLobby(false),
      onStatus: (s) => { if (round === rounds) showStatus(s); },
      onFallback: showFallback,
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
  } else if ($("game").dataset.open === "yes") {
    connect();
  } else {
    closedLobby(true);
  }
})();
