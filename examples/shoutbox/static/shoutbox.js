// The shoutbox page: stream shouts in after the server-rendered history.
(function () {
  "use strict";
  const $ = (id) => document.getElementById(id);
  const list = $("shouts");
  const moderator = list.dataset.moderator === "yes";
  const form = $("shout");
  const csrf = form.elements.csrf.value;

  function shoutItem(id, data) {
    const li = document.createElement("li");
    li.dataset.id = id;
    const who = document.createElement("b");
    who.className = "who";
    who.textContent = data.nick;  // text, never HTML
    const what = document.createElement("span");
    what.className = "what";
    what.textContent = data.text;
    li.append(who, " ", what);
    if (moderator) {
      const del = document.createElement("button");
      del.className = "delete"; del.dataset.id = id; del.textContent = "delete";
      li.append(del);
    }
    return li;
  }

  function onEvent(ev) {
    if (ev.event === "shout") {
      if (list.querySelector('li[data-id="' + CSS.escape(ev.id) + '"]')) return;
      const li = shoutItem(ev.id, ev.data);
      li.classList.add("new");
      list.prepend(li);
      while (list.children.length > 200) list.lastElementChild.remove();
    } else if (ev.event === "delete") {
      const li = list.querySelector('li[data-id="' + CSS.escape(ev.data.target) + '"]');
      if (li) li.remove();
    } else if (ev.event === "mod" && $("notices")) {
      const li = document.createElement("li");
      li.textContent = ev.data.notice;
      $("notices").prepend(li);
    }
  }

  Comet.subscribe("/events", {
    transport: "sse",
    events: ["shout", "delete", "mod"],
    lastEventId: list.dataset.cursor,  // exactly after what the server rendered
    onEvent: onEvent,
    onGap: () => location.reload(),    // too much was missed: start from a fresh render
    onStatus: (s) => { $("status").dataset.status = s; $("status").textContent = s; },
  });

  async function post(url, fields) {
    const response = await fetch(url, { method: "POST", body: new URLSearchParams(Object.assign({ csrf: csrf }, fields)) });
    const doc = await response.json().catch(() => ({ error: "HTTP " + response.status }));
    if (!response.ok) throw new Error(doc.error || "HTTP " + response.status);
    return doc;
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    $("error").textContent = "";
    try {
      await post("/shout", { nick: $("nick").value, text: $("text").value });
      $("text").value = "";
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
