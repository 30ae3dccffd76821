// The project page's charts, drawn with Chart.js from the page's JSON data block (#project-charts): the newest
// version's items per label, and each annotator's agreement with the consensus.
(function () {
  "use strict";
  function bar(canvas, labels, values, label, options) {
    if (!canvas) { return; }
    canvas.dataset.bars = String(values.length);
    return new window.Chart(canvas, {
      type: "bar",
      data: { labels: labels, datasets: [{ label: label, data: values, backgroundColor: "#2f6fde" }] },
      options: Object.assign({ animation: false, plugins: { legend: { display: false } } }, options || {}),
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var block = document.getElementById("project-charts");
    if (!block || !window.Chart) { return; }
    var data = JSON.parse(block.textContent);
    var names = Object.keys(data.labels);
    bar(document.getElementById("labels-chart"), names, names.map(function (n) { return data.labels[n]; }), "items");
    bar(
      document.getElementById("annotators-chart"),
      data.annotators.map(function (a) { return a.id + " (" + a.annotations + ")"; }),
      data.annotators.map(function (a) { return a.agreement; }),
      "agreement with the consensus",
      { scales: { y: { min: 0, max: 1 } } }
    );
  });
})();
