/* The live page: draws the charts, refreshes itself, keeps the token out of the address bar.
   Token (sidecar started with --token): open /?token=T once. The server checks it like a Bearer header
   (a browser cannot send a header when it navigates); this script then keeps it in sessionStorage
   (this tab only), removes it from the address bar and history, and sends it as "Authorization: Bearer"
   on every refresh. No cookie: a cookie would ride along on any site's form POST to the sidecar. */
(function () {
  "use strict";
  var PERIOD_MS = 5000;
  var KEY = "trainhealth-token";
  var url = new URL(location.href);
  var token = url.searchParams.get("token");
  if (token !== null) {
    try { sessionStorage.setItem(KEY, token); } catch (e) { /* storage off: keep it in memory */ }
    url.searchParams.delete("token");
    history.replaceState(null, "", url.pathname + url.search + url.hash);
  } else {
    try { token = sessionStorage.getItem(KEY); } catch (e) { token = null; }
  }
  var run = url.searchParams.get("run");

  function status(text, bad) {
    var s = document.getElementById("refresh-status");
    if (s) { s.textContent = text; s.className = bad ? "bad" : ""; }
  }

  function draw() {
    var node = document.getElementById("chart-data");
    var box = document.getElementById("charts");
    if (!node || !box) return;
    var data = JSON.parse(node.textContent);
    var n = TH.drawCharts(box, data.chart);
    box.setAttribute("data-charts", String(n));
    if (data.chosen) run = data.chosen;
  }

  function refresh() {
    var q = "?part=live" + (run ? "&run=" + encodeURIComponent(run) : "");
    var headers = token ? {"Authorization": "Bearer " + token} : {};
    return fetch(q, {headers: headers, cache: "no-store"}).then(function (resp) {
      if (resp.status === 401) { status("the sidecar wants its token: open this page as /?token=TOKEN", true); return; }
      if (!resp.ok) { status("refresh failed: HTTP " + resp.status, true); return; }
      return resp.text().then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        var live = document.getElementById("live");
        if (fresh && live) live.replaceWith(document.importNode(fresh, true));
        draw();
        status("updated " + new Date().toLocaleTimeString(), false);
      });
    }, function () { status("the sidecar does not answer; retrying every " + PERIOD_MS / 1000 + " s", true); });
  }

  document.addEventListener("click", function (ev) {  // choosing a run: no navigation, so the token stays
    var a = ev.target.closest ? ev.target.closest("a[data-run]") : null;
    if (!a) return;
    ev.preventDefault();
    run = a.getAttribute("data-run");
    history.pushState(null, "", "?run=" + encodeURIComponent(run));
    refresh();
  });

  draw();
  setInterval(refresh, PERIOD_MS);
})();
