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
  function renderRuns(d) {
    fillTable($("runs-table"), d.runs, 8, "no runs in Redis yet", function (tr, run) {
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

  function series(rounds, key) {
    var pts = [];
    rounds.forEach(function (m) { if (m[key] !== null && m[key] !== undefined) { pts.push([m.round, m[key]]); } });
    return pts;
  }

  function flatten(obj, prefix, out) {
    Object.keys(obj).forEach(function (k) {
      var v = obj[k], name = prefix ? prefix + "." + k : k;
      if (v !== null && typeof v === "object" && !Array.isArray(v)) { flatten(v, name, out); }
      else { out.push([name, Array.isArray(v) ? JSON.stringify(v) : String(v)]); }
    });
    return out;
  }

  function renderRun(d) {
    var ended = d.status === "finished" || d.status === "failed";
    badge($("status"), d.status);
    var bar = $("progress-bar");
    bar.style.width = (d.rounds ? Math.min(100, 100 * d.round / d.rounds) : 0) + "%";
    bar.className = "bar" + (d.status === "finished" ? " done" : d.status === "failed" ? " failed" : "");
    setText("phase", phaseText(d));
    setText("rounds-done", d.round + " / " + d.rounds);
    // Alive / expected while the run goes on (a dead client stops counting when its heartbeat
    // expires); joined / expected once it has ended.
    setText("clients-joined", d.status === "finished" || d.status === "failed"
      ? d.joined + " / " + d.clients + " joined"
      : d.alive + " / " + d.clients + " alive (" + d.joined + " joined)");
    setText("final-acc", num(d.final.test_accuracy));
    setText("final-loss", num(d.final.test_loss));
    setText("created", when(d.created_at));
    setText("started", when(d.started_at));
    setText("finished", when(d.finished_at));
    var agg = d.aggregators.length ? d.aggregators.map(function (a) { return a.name + " (alive)"; }).join(", ")
      : (d.driver ? d.driver + (ended ? "" : " (no heartbeat)") : "–");
    setText("driver", agg);
    var reason = $("reason");
    reason.hidden = !d.reason;
    reason.textContent = d.reason ? "reason: " + d.reason : "";
    document.title = "run " + d.run_id + " (" + d.status + ") · fedq dashboard";

    var rm = d.round_metrics;
    window.fedqChart.draw($("chart-accuracy"), { yLabel: "accuracy", series: [
      { name: "train_accuracy", cls: "train", label: "train", points: series(rm, "train_accuracy") },
      { name: "test_accuracy", cls: "test", label: "test", points: series(rm, "test_accuracy") }] });
    window.fedqChart.draw($("chart-loss"), { yLabel: "loss", clampZero: true, series: [
      { name: "train_loss", cls: "train", label: "train", points: series(rm, "train_loss") },
      { name: "test_loss", cls: "test", label: "test", points: series(rm, "test_loss") }] });

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

    fillTable($("rounds-table"), rm.slice().reverse(), 10, "no round committed yet", function (tr, m) {
      td(tr, String(m.round), "num");
      td(tr, String(m.num_updates), "num");
      td(tr, String(m.num_examples), "num");
      td(tr, num(m.train_loss), "num");
      td(tr, num(m.train_accuracy), "num");
      td(tr, num(m.test_loss), "num");
      td(tr, num(m.test_accuracy), "num");
      td(tr, num(m.seconds, 2), "num");
      td(tr, m.refused === null || m.refused === undefined ? "–" : String(m.refused), "num");
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

    fillTable($("spec-table"), flatten(d.spec || {}, "", []), 2, "no spec", function (tr, kv) {
      td(tr, kv[0]);
      td(tr, kv[1], "mono wrap");
    });
    return ended ? ENDED_REFRESH_MS : refreshMs;
  }

  if (page === "runs") {
    poll("api/runs", renderRuns);
  } else if (page === "run") {
    var runId = body.getAttribute("data-run-id");
    poll("../api/runs/" + encodeURIComponent(runId), function (d) { return renderRun(d); });
  }
})();
