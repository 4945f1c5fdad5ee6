// The index: the list of open lobbies, kept current by one "lobby" event per change.
(function () {
  "use strict";
  const list = document.getElementById("lobbies");
  const phases = { waiting: "waiting", countdown: "playing", go: "playing", finished: "between rounds" };

  function update(lobby) {
    let li = list.querySelector('li[data-lobby="' + CSS.escape(lobby.lobby) + '"]');
    if (li && Number(li.dataset.version) >= lobby.version) return;  // an older change, late
    if (!lobby.players) {  // the last player left: the lobby is gone
      if (li) li.remove();
    } else {
      if (!li) {
        li = document.createElement("li");
        li.dataset.lobby = lobby.lobby;
        const a = document.createElement("a");
        a.href = "/lobby/" + encodeURIComponent(lobby.lobby);
        a.textContent = lobby.lobby;
        const info = document.createElement("span");
        info.className = "muted";
        li.append(a, " ", info);
        const after = [...list.children].find((other) => other.dataset.lobby > lobby.lobby);
        list.insertBefore(li, after || null);
      }
      li.dataset.version = lobby.version;
      li.querySelector("span").textContent = lobby.players + "/" + lobby.size + " players, " + phases[lobby.phase];
    }
    document.getElementById("none").hidden = list.children.length > 0;
  }

  Comet.subscribe("/updates", {
    transport: "sse",
    pollUrl: "/updates_poll",          // the same stream by long-poll, behind a proxy that holds streams back
    heartbeat: Number(document.body.dataset.heartbeat),  // the server's, until its stream says so itself
    shared: true,                      // one connection for all this browser's tabs
    events: ["lobby"],
    lastEventId: list.dataset.cursor,  // exactly after what the server rendered
    onEvent: (ev) => { if (ev.event === "lobby") update(ev.data); },
    onGap: () => location.reload(),
    onStatus: showStatus,
    onFallback: showFallback,
  });
})();
