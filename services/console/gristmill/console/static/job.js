// A training job's live curves: streams /jobs/<id>/events (Server-Sent Events from the training service's WatchJob)
// and draws every reported metric against the step with Chart.js. Losses on one chart, evaluation metrics on the
// other; learning rate and throughput are left out (another scale). The metrics table keeps each one's latest value. Each canvas's data-points attribute counts the
// points drawn so far, so a test can watch the curve grow.
(function () {
  "use strict";
  var COLOURS = ["#2f6fde", "#d9534f", "#2a9d8f", "#e9a23b", "#7b61ff", "#6c757d", "#c2185b", "#00897b"];
  var SKIPPED = /(^|\s|: )(learning_rate|samples_per_second|tokens_per_second)$/;

  function chart(canvas) {
    return new window.Chart(canvas, {
      type: "line",
      data: { datasets: [] },
      options: {
        animation: false,
        parsing: false,
        normalized: true,
        responsive: true,
        interaction: { mode: "nearest", intersect: false },
        scales: { x: { type: "linear", title: { display: true, text: "step" } } },
        plugins: { legend: { position: "bottom" } },
      },
    });
  }

  function series(target, name) {
    var datasets = target.data.datasets;
    for (var i = 0; i < datasets.length; i++) {
      if (datasets[i].label === name) { return datasets[i]; }
    }
    var colour = COLOURS[datasets.length % COLOURS.length];
    var created = { label: name, data: [], borderColor: colour, backgroundColor: colour, pointRadius: 2 };
    datasets.push(created);
    return created;
  }

  function start() {
    var section = document.getElementById("job-curves");
    if (!section || !window.Chart || !window.EventSource) { return; }
    var canvases = { loss: document.getElementById("loss-chart"), eval: document.getElementById("eval-chart") };
    var charts = { loss: chart(canvases.loss), eval: chart(canvases.eval) };
    var counts = { loss: 0, eval: 0 };
    var status = document.getElementById("job-stream");
    var source = new window.EventSource(section.dataset.events);

    function text(id, value) {
      var element = document.getElementById(id);
      if (element) { element.textContent = value; }
    }

    function latest(name, value) {
      var body = document.querySelector("#job-metrics tbody");
      if (!body) { return; }
      var none = body.querySelector("tr.none");
      if (none) { none.remove(); }
      var row = body.querySelector('tr[data-metric="' + window.CSS.escape(name) + '"]');
      if (!row) {
        row = document.createElement("tr");
        row.dataset.metric = name;
        row.appendChild(document.createElement("td")).textContent = name;
        row.appendChild(document.createElement("td"));
        body.appendChild(row);
      }
      row.cells[1].textContent = Number(value).toPrecision(4);
    }

    function onMetrics(event) {
      var touched = {};
      Object.keys(event.metrics).forEach(function (name) {
        latest(name, event.metrics[name]);
        if (SKIPPED.test(name)) { return; }
        var which = /loss/.test(name) ? "loss" : "eval";
        series(charts[which], name).data.push({ x: event.step, y: event.metrics[name] });
        counts[which] += 1;
        touched[which] = true;
      });
      Object.keys(touched).forEach(function (which) {
        charts[which].update("none");
        canvases[which].dataset.points = String(counts[which]);
      });
      text("job-step", String(event.step));
    }

    function onState(event) {
      var badge = document.getElementById("job-state");
      if (badge) { badge.textContent = event.state; badge.className = "state state-" + event.state; }
      text("job-reason", event.reason);
      if (event.total_steps) {
        text("job-step", String(event.step));
        text("job-total", String(event.total_steps));
        var bar = document.getElementById("job-progress");
        if (bar) { bar.value = event.state === "succeeded" ? 1 : event.step / event.total_steps; }
      }
      if (event.finished) {
        // The stream ends after the terminal state: without close() the browser would reconnect.
        source.close();
        status.textContent = "finished (" + event.state + "): the curves are complete";
      }
    }

    source.onopen = function () { status.textContent = "live"; };
    source.onmessage = function (message) {
      var event = JSON.parse(message.data);
      if (event.kind === "metrics") { onMetrics(event); } else if (event.kind === "state") { onState(event); }
    };
    source.addEventListener("failure", function (message) {
      source.close();
      status.textContent = JSON.parse(message.data).message;
    });
    source.onerror = function () {
      if (source.readyState !== window.EventSource.CLOSED) { status.textContent = "reconnecting…"; }
    };
  }

  document.addEventListener("DOMContentLoaded", start);
})();
