// Both pages: the connection's real state, in words. comet.js says "open"
// only while the stream is heard from (a heartbeat at least), "reconnecting"
// once it has been silent for about two heartbeats or broke, and "offline"
// while the browser has no network; data-status keeps comet.js's name.
(function () {
  "use strict";
  const words = { connecting: "connecting\u2026", open: "live", reconnecting: "reconnecting\u2026", offline: "offline", closed: "ended" };
  const titles = {
    connecting: "Connecting to the game server.",
    open: "Connected: what you see is current.",
    reconnecting: "The connection broke or went silent: reconnecting. What you see may be out of date.",
    offline: "Your device has no network: the page catches up when it is back.",
    closed: "This page no longer follows the game.",
  };
  let status = "idle";
  let polling = false;  // fell back to long-poll (a proxy holds the stream back)

  function draw() {
    const el = document.getElementById("status");
    el.dataset.status = status;
    el.dataset.transport = polling ? "longpoll" : "stream";
    el.textContent = (words[status] || status) + (polling && status === "open" ? " (long-poll)" : "");
    el.title = (titles[status] || "") + (polling ? " Something on the way (a proxy) holds the stream back, so the page follows it by long-poll." : "");
  }

  window.showStatus = function (s) { status = s; draw(); };
  window.showFallback = function (info) { polling = info.to === "longpoll"; draw(); };
})();
