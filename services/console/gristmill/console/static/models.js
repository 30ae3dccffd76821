// The registry and serving pages' bar charts (a model's main metric per version, a deployment's traffic split),
// drawn with Chart.js from the page's JSON data blocks: each <script type="application/json" class="chart-data">
// names its canvas in data-canvas and holds {metric, labels, values}.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    if (!window.Chart) { return; }
    document.querySelectorAll("script.chart-data").forEach(function (block) {
      var canvas = document.getElementById(block.dataset.canvas);
      if (!canvas) { return; }
      var data = JSON.parse(block.textContent);
      canvas.dataset.bars = String(data.values.length);
      new window.Chart(canvas, {
        type: "bar",
        data: { labels: data.labels, datasets: [{ label: data.metric, data: data.values, backgroundColor: "#2f6fde" }] },
        options: { animation: false, plugins: { legend: { display: false } } },
      });
    });
  });
})();
