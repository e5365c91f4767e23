// Live updates of the activity feed: the user's events arrive over Server-Sent Events (the
// session cookie authenticates the stream); rows change in place and human opens and clicks
// raise a notification. Everything else on the page works without JavaScript.
(function () {
  "use strict";
  var rank = { queued: 0, deferred: 1, sent: 2, bounced: 2, opened: 3, clicked: 4, replied: 5 };

  function toast(text) {
    var box = document.getElementById("toasts");
    var el = document.createElement("div");
    el.className = "toast";
    el.textContent = text;
    box.appendChild(el);
    setTimeout(function () { el.remove(); }, 8000);
  }

  function when(iso) {
    return iso ? new Date(iso).toISOString().replace("T", " ").slice(0, 16) + " UTC" : "";
  }

  function update(ev) {
    var rows = document.querySelectorAll("tr[data-message]");
    var row = null;
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].dataset.message === String(ev.message) && rows[i].dataset.recipient === ev.recipient) { row = rows[i]; break; }
    }
    if (!row) { return; }
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
        if (!first.textContent.trim()) { first.textContent = when(ev.at); }
        row.querySelector(".last-open").textContent = when(ev.at);
      } else {
        var m = row.querySelector(".machine");
        if (!m) { m = document.createElement("span"); m.className = "machine"; m.dataset.n = "0"; row.querySelector(".opens").after(m); }
        m.dataset.n = String(parseInt(m.dataset.n || m.textContent.replace(/\D/g, "") || "0", 10) + 1);
        m.textContent = " +" + m.dataset.n + " machine";
      }
    }
    if (ev.type === "clicked" && human) {
      var cell = row.querySelector(".clicks");
      var line = document.createElement("div");
      line.textContent = ev.url;
      cell.appendChild(line);
    }
  }

  function notify(ev) {
    if (ev.classification !== "human" || ["opened", "clicked", "replied"].indexOf(ev.type) < 0) { return; }
    var text = ev.recipient + " " + ev.type + (ev.url ? ": " + ev.url : "");
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
  document.documentElement.dataset.live = "1";
})();
