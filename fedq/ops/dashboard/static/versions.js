/* fedq dashboard: a buffered run's model versions (the run page's "Model versions" section).
 *
 * fedqVersions.show(d) fills the section from d.versions (snapshot's versions.version_rows): a
 * chart of staleness per version (mean and max, in versions behind the newest) and a table of
 * each version's updates, their staleness and base versions, and its clients. The section stays
 * hidden for a sync run, whose d.versions is empty.
 */
(function () {
  "use strict";

  function cell(tr, text, cls) {
    var c = document.createElement("td");
    c.textContent = text;
    if (cls) { c.className = cls; }
    tr.appendChild(c);
  }

  function counts(obj, unit) {
    return Object.keys(obj).map(function (k) { return k + unit + " ×" + obj[k]; }).join(", ");
  }

  function show(d) {
    var rows = d.versions || [];
    document.getElementById("versions-section").hidden = !rows.length;
    if (!rows.length) { return; }
    function pts(key) {
      return rows.filter(function (v) { return v[key] !== null && v[key] !== undefined; })
        .map(function (v) { return [v.version, v[key], v.version]; });
    }
    window.fedqChart.draw(document.getElementById("chart-staleness"), { yLabel: "staleness (versions)",
      xLabel: "version", clampZero: true, series: [
        { name: "staleness_mean", cls: "train", label: "mean", points: pts("staleness_mean") },
        { name: "staleness_max", cls: "test", label: "max", points: pts("staleness_max") }] });
    var table = document.getElementById("versions-table"), body = document.createElement("tbody");
    rows.slice().reverse().forEach(function (v) {
      var tr = document.createElement("tr");
      cell(tr, String(v.version), "num");
      cell(tr, v.num_updates === null ? "–" : String(v.num_updates), "num");
      cell(tr, v.staleness_mean === null ? "–" : v.staleness_mean.toFixed(2), "num");
      cell(tr, v.staleness_max === null ? "–" : String(v.staleness_max), "num");
      cell(tr, counts(v.staleness, " behind"), "wrap");
      cell(tr, counts(v.bases, ""), "wrap");
      cell(tr, v.clients.join(", "), "wrap");
      body.appendChild(tr);
    });
    table.replaceChild(body, table.querySelector("tbody"));
  }

  window.fedqVersions = { show: show };
})();
