/* The report: every run's charts, drawn from the data inlined in the file (no network). */
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  data.runs.forEach(function (r, i) {
    var box = document.getElementById("charts-" + i);
    box.setAttribute("data-charts", String(TH.drawCharts(box, r.chart)));
  });
})();
