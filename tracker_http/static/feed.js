// Live updates of the activity feed: the user's events arrive over Server-Sent Events (the
// session cookie authenticates the stream); a new message is fetched as its card and put on
// top, rows change in place and human opens and clicks raise a notification naming the message.
// Everything else on the page works without JavaScript.
(function () {
  "use strict";
  var rank = { queued: 0, deferred: 1, sent: 2, bounced: 2, opened: 3, clicked: 4, replied: 5 };
  var feed = document.getElementById("feed");
  var pending = {};

  function toast(text) {
    var box = document.getElementById("toasts");
    var el = document.createElement("div");
    el.className = "toast";
    el.setAttribute("role", "status");
    el.textContent = text;
    box.appendChild(el);
    setTimeout(function () { el.remove(); }, 8000);
  }

  function setTime(cell, iso) {
    cell.textContent = "";
    cell.appendChild(window.trackrelayTime ? window.trackrelayTime(iso) : document.createTextNode(iso));
  }

  function findRow(ev) {
    var rows = document.querySelectorAll("tr[data-message]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].dataset.message === String(ev.message) && rows[i].dataset.recipient === ev.recipient) { return rows[i]; }
    }
    return null;
  }

  function addCard(id) {
    if (!feed || !feed.dataset.liveNew || pending[id] || document.querySelector("article[data-message='" + id + "']")) { return; }
    pending[id] = fetch("/messages/" + id + "/card", { credentials: "same-origin" }).then(function (r) {
      return r.ok ? r.text() : "";
    }).then(function (html) {
      if (!html || document.querySelector("article[data-message='" + id + "']")) { return; }
      var box = document.createElement("div");
      box.innerHTML = html;
      var card = box.querySelector("article");
      if (!card) { return; }
      var cards = feed.querySelectorAll("article[data-message]"), before = null;
      for (var i = 0; i < cards.length; i++) { if (Number(cards[i].dataset.message) < id) { before = cards[i]; break; } }
      feed.insertBefore(card, before);
      card.classList.add("new");
      var empty = document.getElementById("empty");
      if (empty) { empty.remove(); }
      if (window.trackrelayRefreshTimes) { window.trackrelayRefreshTimes(card); }
    }).catch(function () { /* the next event tries again */ }).then(function () { delete pending[id]; });
  }

  function update(ev) {
    var row = findRow(ev);
    if (!row) {
      if (ev.type === "queued" || ev.type === "sent") { addCard(ev.message); }
      return;
    }
    var status = row.querySelector(".status");
    var human = ev.classification === "human";
    var next = (ev.type === "opened" || ev.type === "clicked" || ev.type === "replied") ? (human ? ev.type : null) : ev.type;
    if (next && rank[next] >= (rank[status.textContent] || 0)) {
      status.textContent = next;
      status.className = "status s-" + next;
    }
    if (ev.type === "opened") {
      if (human) {
        var opens = row.querySelector(".opens");
        opens.textContent = String(parseInt(opens.textContent || "0", 10) + 1);
        var first = row.querySelector(".first-open");
        if (!first.textContent.trim()) { setTime(first, ev.at); }
        setTime(row.querySelector(".last-open"), ev.at);
      } else {
        var kind = ev.classification === "self" ? "self" : "machine", label = kind === "self" ? " you" : " machine";
        var m = row.querySelector("." + kind);
        if (!m) { m = document.createElement("span"); m.className = kind; m.dataset.n = "0"; row.querySelector(".opens").after(m); }
        m.dataset.n = String(parseInt(m.dataset.n || m.textContent.replace(/\D/g, "") || "0", 10) + 1);
        m.textContent = " +" + m.dataset.n + label;
      }
    }
    if (ev.type === "clicked" && human) {
      var cell = row.querySelector(".clicks");
      var line = document.createElement("div");
      line.className = "url";
      line.textContent = ev.url;
      cell.appendChild(line);
    }
  }

  function subjectOf(ev) {
    var card = document.querySelector("article[data-message='" + ev.message + "']");
    return card ? card.dataset.subject : null;
  }

  function notify(ev) {
    if (ev.classification !== "human" || ["opened", "clicked", "replied"].indexOf(ev.type) < 0) { return; }
    var subject = subjectOf(ev);
    var text = ev.recipient + " " + ev.type + (subject ? " \u201c" + subject + "\u201d" : "") + (ev.url ? ": " + ev.url : "");
    toast(text);
    if (window.Notification && Notification.permission === "granted") {
      try { new Notification("trackrelay", { body: text }); } catch (e) { /* not allowed here */ }
    }
  }

  var button = document.getElementById("notify");
  if (button) {
    if (!window.Notification || Notification.permission !== "default") { button.hidden = true; }
    button.addEventListener("click", function () {
      Notification.requestPermission().then(function () { button.hidden = true; });
    });
  }

  if (!window.EventSource) { return; }
  var source = new EventSource("/api/v1/events/stream");
  ["queued", "sent", "deferred", "bounced", "opened", "clicked", "replied"].forEach(function (type) {
    source.addEventListener(type, function (msg) {
      var ev = JSON.parse(msg.data);
      update(ev);
      notify(ev);
    });
  });
  source.addEventListener("open", function () { document.documentElement.dataset.live = "1"; });
  document.documentElement.dataset.live = "1";
})();
