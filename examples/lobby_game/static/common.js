// Both pages: the connection status in words (data-status keeps comet.js's name).
window.showStatus = function (status) {
  const words = { connecting: "connecting\u2026", open: "live", reconnecting: "reconnecting\u2026", closed: "offline" };
  const el = document.getElementById("status");
  el.dataset.status = status;
  el.textContent = words[status] || status;
};
