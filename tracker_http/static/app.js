// Times in the reader's zone: the configured one (<html data-tz>) or the browser's, which is also
// sent to the server in the "tz" cookie so the next page is rendered in it. <time data-rel>
// shows "3 min ago" with the exact time on hover; <time data-abs> the exact time. Kept current.
(function () {
  "use strict";
  var browserZone = "UTC";
  try { browserZone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC"; } catch (e) { /* old browser */ }
  var zone = document.documentElement.dataset.tz || browserZone;
  if (!document.documentElement.dataset.tz) {
    var have = (document.cookie.match(/(?:^|; )tz=([^;]*)/) || [])[1];
    if (have !== encodeURIComponent(browserZone)) {
      document.cookie = "tz=" + encodeURIComponent(browserZone) + "; path=/; max-age=31536000; SameSite=Strict";
    }
  }
  var fmt;
  try {
    fmt = new Intl.DateTimeFormat("en-US", { timeZone: zone, year: "numeric", month: "2-digit", day: "2-digit",
      hour: "2-digit", minute: "2-digit", hourCycle: "h23", timeZoneName: "short" });
  } catch (e) { zone = "UTC"; fmt = null; }

  function exact(date) {
    if (!fmt) { return date.toISOString().replace("T", " ").slice(0, 16) + " UTC"; }
    var p = {};
    fmt.formatToParts(date).forEach(function (x) { p[x.type] = x.value; });
    return p.year + "-" + p.month + "-" + p.day + " " + p.hour + ":" + p.minute + " " + p.timeZoneName;
  }

  function relative(date) {
    var s = (Date.now() - date.getTime()) / 1000;
    if (s < 45) { return "just now"; }
    if (s < 3600) { return Math.max(1, Math.round(s / 60)) + " min ago"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h ago"; }
    var d = Math.floor(s / 86400);
    return d === 1 ? "yesterday" : d + " days ago";
  }

  function refresh(root) {
    var els = (root || document).querySelectorAll("time[datetime]");
    for (var i = 0; i < els.length; i++) {
      var t = els[i], date = new Date(t.getAttribute("datetime"));
      if (isNaN(date)) { continue; }
      if (t.hasAttribute("data-rel")) { t.textContent = relative(date); t.title = exact(date); }
      else { t.textContent = exact(date); }
    }
    var z = document.getElementById("zone");
    if (z) { z.textContent = zone; }
  }

  window.trackrelayTime = function (iso) {
    var t = document.createElement("time");
    t.setAttribute("datetime", iso);
    t.setAttribute("data-rel", "");
    var date = new Date(iso);
    t.textContent = relative(date);
    t.title = exact(date);
    return t;
  };
  window.trackrelayRefreshTimes = refresh;
  refresh();
  setInterval(refresh, 30000);
})();
