/* fedq dashboard: fills the pages from the JSON API and keeps them current with a short poll.
 * All data is written with textContent (never as HTML): client ids and reasons come from clients.
 */
(function () {
  "use strict";
  var body = document.body;
  var page = body.getAttribute("data-page");
  var refreshMs = parseInt(body.getAttribute("data-refresh-ms"), 10) || 2000;
  var ENDED_REFRESH_MS = 10000;

  function $(id) { return document.getElementById(id); }

  function num(v, digits) {
    return (v === null || v === undefined || isNaN(v)) ? "–" : Number(v).toFixed(digits === undefined ? 4 : digits);
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  function when(ts) {
    if (!ts) { return "–"; }
    var d = new Date(ts * 1000);
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }

  function ago(ts, now) {
    if (!ts) { return "–"; }
    var s = Math.max(0, now - ts);
    if (s < 60) { return Math.round(s) + " s ago"; }
    if (s < 3600) { return Math.round(s / 60) + " min ago"; }
    if (s < 86400) { return (s / 3600).toFixed(1) + " h ago"; }
    return when(ts);
  }

  function td(tr, content, cls) {
    var cell = document.createElement("td");
    if (content instanceof Node) { cell.appendChild(content); } else { cell.textContent = content; }
    if (cls) { cell.className = cls; }
    tr.appendChild(cell);
    return cell;
  }

  function span(text, cls) {
    var s = document.createElement("span");
    s.textContent = text;
    if (cls) { s.className = cls; }
    return s;
  }

  function setText(id, value) { var n = $(id); if (n) { n.textContent = value; } }

  function fillTable(table, items, colspan, emptyText, addRow) {
    var tbody = table.querySelector("tbody");
    var fresh = document.createElement("tbody");
    if (!items.length) {
      var tr = document.createElement("tr");
      tr.className = "empty";
      td(tr, emptyText).colSpan = colspan;
      fresh.appendChild(tr);
    }
    items.forEach(function (item) {
      var row = document.createElement("tr");
      addRow(row, item);
      fresh.appendChild(row);
    });
    table.replaceChild(fresh, tbody);
  }

  function badge(el, status) {
    el.textContent = status || "?";
    el.className = "badge " + (status || "");
  }

  function showBanner(title, detail) {
    var b = $("banner");
    b.querySelector("strong").textContent = title;
    setText("banner-text", detail || "");
    b.hidden = false;
  }

  function hideBanner() { $("banner").hidden = true; }

  /* Ask url, hand the JSON to render, and ask again after the delay render returns. */
  function poll(url, render) {
    function again(ms) { window.setTimeout(tick, ms); }
    function tick() {
      fetch(url, { cache: "no-store", headers: { "Accept": "application/json" } })
        .then(function (resp) {
          return resp.json().then(function (data) { return { status: resp.status, data: data }; },
            function () { return { status: resp.status, data: { error: "HTTP " + resp.status } }; });
        })
        .then(function (res) {
          if (res.status === 503) {
            showBanner("Redis is unreachable.", String(res.data.error).replace(/^Redis is unreachable: /, "") +
              " — retrying.");
            again(refreshMs);
            return;
          }
          if (res.status !== 200) {
            showBanner("The dashboard answered " + res.status + ".", res.data.error || "");
            again(Math.max(refreshMs, 5000));
            return;
          }
          hideBanner();
          setText("updated", "updated " + when(Date.now() / 1000).slice(11));
          again(render(res.data) || refreshMs);
        })
        .catch(function (err) {
          showBanner("The dashboard server is unreachable.", String(err) + " — retrying.");
          again(refreshMs);
        });
    }
    tick();
  }

  /* --- all runs ------------------------------------------------------------------- */
  var picked = {};
  if (page === "runs") {
    $("compare-btn").addEventListener("click", function () {
      window.location.href = "compare?runs=" + Object.keys(picked).map(encodeURIComponent).join(",");
    });
  }
  function renderRuns(d) {
    fillTable($("runs-table"), d.runs, 9, "no runs in Redis yet", function (tr, run) {
      var pick = document.createElement("input");
      pick.type = "checkbox";
      pick.className = "pick";
      pick.value = run.run_id;
      pick.checked = !!picked[run.run_id];
      pick.setAttribute("aria-label", "compare " + run.run_id);
      pick.addEventListener("change", function () {
        if (pick.checked) { picked[run.run_id] = true; } else { delete picked[run.run_id]; }
        $("compare-btn").disabled = Object.keys(picked).length < 2;
      });
      td(tr, pick);
      var a = document.createElement("a");
      a.href = "runs/" + encodeURIComponent(run.run_id);
      a.textContent = run.run_id;
      td(tr, a, "mono");
      var b = span(""); badge(b, run.status); td(tr, b);
      td(tr, run.joined + " / " + (run.clients === null ? "?" : run.clients), "num");
      var prog = document.createElement("span");
      var bar = document.createElement("span");
      bar.className = "progress small";
      var fill = document.createElement("span");
      fill.className = "bar" + (run.status === "finished" ? " done" : "");
      fill.style.display = "block";
      fill.style.width = (run.rounds ? Math.min(100, 100 * run.round / run.rounds) : 0) + "%";
      bar.appendChild(fill);
      prog.appendChild(bar);
      prog.appendChild(document.createTextNode(run.round + " / " + (run.rounds === null ? "?" : run.rounds)));
      td(tr, prog);
      td(tr, when(run.created_at));
      td(tr, when(run.started_at));
      td(tr, when(run.finished_at));
      td(tr, num(run.final_test_accuracy), "num");
    });
    fillTable($("aggregators-table"), d.aggregators, 5, "no aggregator heartbeat", function (tr, a) {
      td(tr, a.name, "mono");
      td(tr, a.host || "–");
      td(tr, a.pid === undefined ? "–" : String(a.pid), "num");
      if (a.run) {
        var link = document.createElement("a");
        link.href = "runs/" + encodeURIComponent(a.run);
        link.textContent = a.run;
        td(tr, link, "mono");
      } else { td(tr, "idle"); }
      td(tr, ago(a.time, d.time));
    });
    return refreshMs;
  }

  /* --- one run -------------------------------------------------------------------- */
  function phaseText(d) {
    if (d.status === "finished") { return "finished: " + d.round + " of " + d.rounds + " rounds committed"; }
    if (d.status === "failed") { return "failed after " + d.round + " of " + d.rounds + " rounds"; }
    if (d.phase === "join" || !d.phase) {
      return "waiting for clients to join: " + d.joined + " of " + d.clients + " joined";
    }
    if (d.open_round) {
      return "round " + d.open_round.round + " of " + d.rounds + " open: " + d.open_round.pushed.length +
        " of " + d.clients + " updates in (" + d.round + " committed)";
    }
    return d.phase + ": round " + d.round + " of " + d.rounds;
  }

  var PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
                 "#65a30d", "#ea580c"];
  var axis = "round";  // or "time": minutes since the run started

  function xOf(m, t0) {
    if (axis === "time") { return (m.ended_at && t0) ? (m.ended_at - t0) / 60 : null; }
    return m.round;
  }

  function series(rounds, key, t0) {
    var pts = [];
    rounds.forEach(function (m) {
      var x = xOf(m, t0);
      if (m[key] !== null && m[key] !== undefined && x !== null) { pts.push([x, m[key], m.round]); }
    });
    return pts;
  }

  function marksOf(d, t0) {
    return d.events.map(function (e) {
      return { kind: e.kind, text: e.text, x: axis === "time" ? (e.time && t0 ? (e.time - t0) / 60 : null) : e.round };
    });
  }

  function bestOf(d, key, t0) {
    var b = d.test.best[key];
    if (!b) { return null; }
    var m = d.round_metrics.filter(function (r) { return r.round === b.round; })[0];
    if (!m) { return null; }
    var x = xOf(m, t0);
    return x === null ? null : { x: x, y: b.value, round: b.round, text: "best test " + key + " " + b.value.toFixed(4) + ", round " + b.round };
  }

  function dur(seconds) {
    if (seconds === null || seconds === undefined) { return "–"; }
    if (seconds < 90) { return Math.round(seconds) + " s"; }
    if (seconds < 5400) { return Math.round(seconds / 60) + " min"; }
    return (seconds / 3600).toFixed(1) + " h";
  }

  function flatten(obj, prefix, out) {
    Object.keys(obj).forEach(function (k) {
      var v = obj[k], name = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) { flatten(v, name, out); }
      else { out.push([name, Array.isArray(v) ? JSON.stringify(v) : String(v)]); }
    });
    return out;
  }

  function show(v) { return v !== null && typeof v === "object" ? JSON.stringify(v) : String(v); }

  var last = null;  // the latest answer, redrawn when the axis changes

  function drawCharts(d) {
    var rm = d.round_metrics, t0 = d.started_at, marks = marksOf(d, t0);
    var xLabel = axis === "time" ? "minutes since start" : "round";
    window.fedqChart.draw($("chart-accuracy"), { yLabel: "accuracy", xLabel: xLabel, xIsTime: axis === "time",
      marks: marks, best: bestOf(d, "accuracy", t0), series: [
      { name: "train_accuracy", cls: "train", label: "train", points: series(rm, "train_accuracy", t0) },
      { name: "test_accuracy", cls: "test", label: "test", points: series(rm, "test_accuracy", t0) }] });
    window.fedqChart.draw($("chart-loss"), { yLabel: "loss", xLabel: xLabel, clampZero: true, xIsTime: axis === "time",
      marks: marks, best: bestOf(d, "loss", t0), series: [
      { name: "train_loss", cls: "train", label: "train", points: series(rm, "train_loss", t0) },
      { name: "test_loss", cls: "test", label: "test", points: series(rm, "test_loss", t0) }] });
    var ids = Object.keys(d.client_curves).sort();
    ["loss", "accuracy"].forEach(function (key) {
      window.fedqChart.draw($("chart-client-" + key), { yLabel: "local " + key, xLabel: xLabel, clampZero: key === "loss",
        xIsTime: axis === "time", marks: marks, legendValues: false,
        series: ids.map(function (cid, k) {
          var pts = [];
          d.client_curves[cid].forEach(function (p) {
            var x = axis === "time" ? (p.time && t0 ? (p.time - t0) / 60 : null) : p.round;
            if (x !== null && p[key] !== null && p[key] !== undefined) { pts.push([x, p[key], p.round]); }
          });
          return { name: "client " + cid + " " + key, color: PALETTE[k % PALETTE.length], label: cid, points: pts };
        }) });
    });
  }

  Array.prototype.forEach.call(document.querySelectorAll("button.axis-toggle"), function (btn) {
    btn.addEventListener("click", function () {
      axis = btn.getAttribute("data-axis");
      Array.prototype.forEach.call(document.querySelectorAll("button.axis-toggle"), function (b) {
        b.classList.toggle("active", b === btn);
      });
      if (last) { (page === "compare" ? drawCompare : drawCharts)(last); }
    });
  });

  function renderRun(d) {
    last = d;
    var ended = d.status === "finished" || d.status === "failed";
    badge($("status"), d.status);
    var bar = $("progress-bar");
    bar.style.width = (d.rounds ? Math.min(100, 100 * d.round / d.rounds) : 0) + "%";
    bar.className = "bar" + (d.status === "finished" ? " done" : d.status === "failed" ? " failed" : "");
    setText("phase", phaseText(d));
    setText("rounds-done", d.round + " / " + d.rounds);
    // Alive / expected while the run goes on (a dead client stops counting when its heartbeat
    // expires); joined / expected once it has ended.
    setText("clients-joined", ended
      ? d.joined + " / " + d.clients + " joined"
      : d.alive + " / " + d.clients + " alive (" + d.joined + " joined)");
    setText("elapsed", dur(d.progress.elapsed_seconds));
    setText("eta", d.progress.eta_seconds === null ? (ended ? "done" : "–")
      : dur(d.progress.eta_seconds) + " (at " + when(d.progress.eta_at).slice(11) + ")");
    var latest = d.test.latest, best = d.test.best;
    setText("final-acc", latest.accuracy ? num(latest.accuracy.value) : "–");
    setText("final-loss", latest.loss ? num(latest.loss.value) : "–");
    [["accuracy", "best-acc"], ["loss", "best-loss"], ["auc", "best-auc"], ["precision", "best-precision"],
     ["recall", "best-recall"], ["f1", "best-f1"]].forEach(function (kv) {
      var b = best[kv[0]], l = latest[kv[0]];
      setText(kv[1], b ? "best " + num(b.value) + " @ round " + b.round : "");
      if (l && kv[0] !== "accuracy" && kv[0] !== "loss") { setText("latest-" + kv[0], num(l.value)); }
      var box = document.querySelector('#test-metrics [data-metric="' + kv[0] + '"]');
      if (box) { box.hidden = !l; }
    });
    setText("created", when(d.created_at));
    setText("started", when(d.started_at));
    $("resumed-fact").hidden = !d.resumed_at;
    setText("resumed", when(d.resumed_at));
    setText("finished", when(d.finished_at));
    var a = d.aggregator;
    setText("driver", a.id ? a.id + (a.alive ? " (alive" + (a.workers.length ? ", worker " + a.workers.join(", ") : "") + ")"
      : ended ? "" : " (no lease: waiting for a driver)") : "–");
    var reason = $("reason");
    reason.hidden = !d.reason;
    reason.textContent = d.reason ? "reason: " + d.reason : "";
    document.title = "run " + d.run_id + " (" + d.status + ") · fedq dashboard";

    drawCharts(d);
    window.fedqVersions.show(d);  // buffered runs: staleness per model version (versions.js)
    var dl = $("downloads");
    while (dl.firstChild) { dl.removeChild(dl.firstChild); }
    d.downloads.forEach(function (name) {
      var li = document.createElement("li"), link = document.createElement("a");
      link.href = encodeURIComponent(d.run_id) + "/files/" + name;
      link.textContent = name;
      link.setAttribute("download", d.run_id + "-" + name);
      li.appendChild(link);
      dl.appendChild(li);
    });
    if (d.downloads.indexOf("curves.png") >= 0) {
      var li2 = document.createElement("li"), timed = document.createElement("a");
      timed.href = encodeURIComponent(d.run_id) + "/files/curves.png?axis=time";
      timed.textContent = "curves.png (wall-clock axis)";
      timed.setAttribute("download", d.run_id + "-curves-time.png");
      li2.appendChild(timed);
      dl.appendChild(li2);
    }
    $("downloads-section").hidden = !d.downloads.length;
    $("downloads-note").hidden = !d.downloads_note;
    setText("downloads-note", d.downloads_note || "");
    $("overfit").hidden = !d.overfitting;
    setText("overfit", d.overfitting ? "⚠ " + d.overfitting : "");

    setText("events-count", d.events.length ? "(" + d.events.length + ")" : "");
    fillTable($("events-table"), d.events.slice().reverse(), 4, "none", function (tr, e) {
      tr.setAttribute("data-kind", e.kind);
      td(tr, String(e.round), "num");
      td(tr, when(e.time));
      td(tr, span("", "key mark-" + e.kind)).appendChild(document.createTextNode(e.kind));
      td(tr, e.text, "wrap");
    });

    var rm = d.round_metrics;
    fillTable($("clients-table"), d.client_table, 11, "no client joined yet", function (tr, c) {
      tr.setAttribute("data-client", c.client_id);
      td(tr, c.client_id, "mono");
      td(tr, c.shard === null || c.shard === undefined ? "–" : String(c.shard), "num");
      var live = document.createElement("span");
      live.appendChild(span("", "dot " + c.liveness));
      live.appendChild(span(c.liveness, c.liveness === "gone" ? "liveness-gone" : ""));
      td(tr, live, "liveness");
      td(tr, c.host ? c.host + (c.pid ? ":" + c.pid : "") : "–");
      td(tr, ago(c.last_seen, d.time));
      td(tr, c.last_round === null || c.last_round === undefined ? "–" : String(c.last_round), "num");
      td(tr, c.num_examples === null || c.num_examples === undefined ? (c.rows === undefined ? "–" : String(c.rows)) : String(c.num_examples), "num");
      td(tr, num(c.loss), "num");
      td(tr, num(c.accuracy), "num");
      td(tr, num(c.train_seconds, 2), "num");
      var reasons = Object.keys(c.refused_reasons).map(function (k) { return k + " ×" + c.refused_reasons[k]; });
      td(tr, c.refused ? c.refused + " (" + reasons.join(", ") + ")" : "0", c.refused ? "reasons wrap" : "");
    });

    fillTable($("rounds-table"), rm.slice().reverse(), 12, "no round committed yet", function (tr, m) {
      td(tr, String(m.round), "num");
      td(tr, String(m.num_updates), "num");
      td(tr, String(m.num_examples), "num");
      td(tr, num(m.train_loss), "num");
      td(tr, num(m.train_accuracy), "num");
      td(tr, num(m.test_loss), "num");
      td(tr, num(m.test_accuracy), "num");
      td(tr, num(m.seconds, 2), "num");
      var ov = td(tr, num(m.overhead_seconds, 2) + (m.waited_seconds ? "*" : ""), "num");
      if (m.waited_seconds) { ov.title = "waited " + num(m.waited_seconds, 1) + " s for clients that never came (not counted)"; }
      td(tr, m.refused === null || m.refused === undefined ? "–" : String(m.refused), "num");
      td(tr, Object.keys(m.missing || {}).map(function (c) { return c + " (" + m.missing[c] + ")"; }).join(", "), "wrap");
      td(tr, num(m.dp_epsilon, 3), "num");  // "–" unless the run has differential privacy
    });

    setText("refused-count", d.refused_total ? "(" + d.refused_total + ")" : "");
    fillTable($("refused-table"), d.refusals.slice(-200).reverse(), 6, "none", function (tr, x) {
      td(tr, when(x.time));
      td(tr, String(x.client), "mono");
      td(tr, String(x.round), "num");
      td(tr, x.stage || "–");
      td(tr, String(x.reason), "reasons");
      td(tr, x.detail || "", "wrap");
    });

    fillTable($("spec-changes"), d.spec_changes, 3, "a default run", function (tr, c) {
      td(tr, c.key);
      td(tr, show(c.value), "mono wrap");
      td(tr, c.default === undefined ? "–" : show(c.default), "mono wrap");
    });
    if ($("spec-full").open || !$("spec-table").querySelector("tr")) {
      fillTable($("spec-table"), flatten(d.spec || {}, "", []), 2, "no spec", function (tr, kv) {
        td(tr, kv[0]);
        td(tr, kv[1], "mono wrap");
      });
    }
    return ended ? ENDED_REFRESH_MS : refreshMs;
  }

  /* --- compare runs ----------------------------------------------------------------- */
  function renderCompare(d) {
    last = d;
    setText("compare-runs", d.runs.map(function (x) { return x.run_id; }).join(" · "));
    drawCompare(d);
    fillTable($("compare-results"), d.runs, 6, "no runs", function (tr, x) {
      var a = document.createElement("a");
      a.href = "runs/" + encodeURIComponent(x.run_id);
      a.textContent = x.run_id;
      td(tr, a, "mono");
      var b = span(""); badge(b, x.status); td(tr, b);
      td(tr, x.round + " / " + x.rounds);
      var l = x.test.latest.accuracy, ba = x.test.best.accuracy, bl = x.test.best.loss;
      td(tr, l ? num(l.value) : "–", "num");
      td(tr, ba ? num(ba.value) + " (" + ba.round + ")" : "–", "num");
      td(tr, bl ? num(bl.value) + " (" + bl.round + ")" : "–", "num");
    });
    var head = $("compare-spec").querySelector("thead");
    while (head.firstChild) { head.removeChild(head.firstChild); }
    var htr = document.createElement("tr");
    ["setting"].concat(d.runs.map(function (x) { return x.run_id; })).forEach(function (t) {
      var th = document.createElement("th"); th.textContent = t; htr.appendChild(th);
    });
    head.appendChild(htr);
    fillTable($("compare-spec"), d.spec_differences, d.runs.length + 1, "the specs are the same", function (tr, c) {
      td(tr, c.key);
      c.values.forEach(function (v) { td(tr, v === undefined || v === null ? "–" : show(v), "mono wrap"); });
    });
    var ended = d.runs.every(function (x) { return x.status === "finished" || x.status === "failed"; });
    return ended ? ENDED_REFRESH_MS : refreshMs;
  }

  function drawCompare(d) {
    ["accuracy", "loss"].forEach(function (key) {
      window.fedqChart.draw($("compare-" + key), { yLabel: "test " + key, clampZero: key === "loss",
        xLabel: axis === "time" ? "minutes since start" : "round", xIsTime: axis === "time", legendValues: false,
        series: d.runs.map(function (x, k) {
          var pts = [];
          x.curve.forEach(function (m) {
            var px = axis === "time" ? (m.ended_at && x.started_at ? (m.ended_at - x.started_at) / 60 : null) : m.round;
            var v = m["test_" + key];
            if (px !== null && v !== null && v !== undefined) { pts.push([px, v, m.round]); }
          });
          return { name: x.run_id + " test_" + key, color: PALETTE[k % PALETTE.length], label: x.run_id, points: pts };
        }) });
    });
  }

  if (page === "runs") {
    poll("api/runs", renderRuns);
  } else if (page === "run") {
    var runId = body.getAttribute("data-run-id");
    poll("../api/runs/" + encodeURIComponent(runId), function (d) { return renderRun(d); });
  } else if (page === "compare") {
    poll("api/compare" + window.location.search, renderCompare);
  }
})();
