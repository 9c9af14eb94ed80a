// Folding of the clusters of a graph drawn by cnnc.viz.graph: a click on a cluster's title
// folds it into one box, a click on that box unfolds it. The same rule as fold_geometry
// in graph.py: a folded cluster that nothing lies beside gives up its band, so what is
// below it moves up; edges are redrawn from their unfolded points. It touches only its
// own <svg> (found through document.currentScript), so a page may inline several.
(function () {
  var svg = document.currentScript.closest("svg");
  var H = +svg.dataset.foldedH, base = +svg.dataset.h, cl = {}, anc = {};
  svg.querySelectorAll(".cluster").forEach(function (g) { cl[g.dataset.id] = g; });
  function chain(id) {
    if (anc[id]) return anc[id];
    var out = [], c = id;
    while (c) { out.push(c); c = cl[c].dataset.parent; }
    return (anc[id] = out);
  }
  function path(p) {
    var d = "M" + p[0][0] + "," + p[0][1];
    for (var i = 1; i < p.length; i++) {
      var a = p[i - 1], b = p[i], m = r((a[1] + b[1]) / 2);
      d += a[0] === b[0] ? " L" : " C" + a[0] + "," + m + " " + b[0] + "," + m + " ";
      d += b[0] + "," + b[1];
    }
    return d;
  }
  function r(v) { return Math.round(v * 10) / 10; }
  function draw() {
    var folded = {}, shown = {}, bands = [];
    for (var id in cl) if (cl[id].dataset.folded === "1") folded[id] = 1;
    function hidden(c) {
      if (!c) return false;
      var a = chain(c);
      for (var i = 0; i < a.length; i++) if (folded[a[i]]) return true;
      return false;
    }
    for (var id in folded) {
      var d = cl[id].dataset;
      if (hidden(d.parent)) continue;
      shown[id] = 1;
      if (d.compact === "1") bands.push([+d.y + H, +d.y + +d.h]);
    }
    function ym(y) {
      var cut = 0;
      bands.forEach(function (b) {
        if (y >= b[1]) cut += b[1] - b[0]; else if (y > b[0]) cut += y - b[0];
      });
      return r(y - cut);
    }
    svg.querySelectorAll(".box").forEach(function (g) {
      var d = g.dataset;
      g.classList.toggle("hide", hidden(d.cluster));
      g.setAttribute("transform", "translate(" + d.x + "," + ym(+d.y) + ")");
    });
    for (var id in cl) {
      var g = cl[id], d = g.dataset, rect = g.querySelector("rect");
      var title = g.querySelector(".ctitle"), f = g.querySelector(".folded");
      g.classList.toggle("hide", hidden(d.parent));
      var t = ym(+d.y), b = ym(+d.y + +d.h);
      rect.setAttribute("y", t);
      rect.setAttribute("height", r(b - t));
      title.setAttribute("y", r(t + 15));
      rect.classList.toggle("hide", !!shown[id]);
      title.classList.toggle("hide", !!shown[id]);
      f.classList.toggle("hide", !shown[id]);
      f.setAttribute("transform", "translate(" + f.dataset.x + "," + t + ")");
    }
    svg.querySelectorAll(".edge").forEach(function (e) {
      var d = e.dataset, off = hidden(d.owner);
      e.classList.toggle("hide", off);
      if (off) return;
      var p = JSON.parse(d.pts).map(function (q) { return [q[0], ym(q[1])]; });
      if (d.sb && shown[d.sb]) {
        var fs = cl[d.sb].querySelector(".folded");
        p[0] = [+fs.dataset.cx, r(ym(+cl[d.sb].dataset.y) + H)];
      }
      if (d.db && shown[d.db]) {
        var fd = cl[d.db].querySelector(".folded");
        p[p.length - 1] = [+fd.dataset.cx, ym(+cl[d.db].dataset.y)];
      }
      e.setAttribute("d", path(p));
      if (d.arrow === "1" || (d.db && shown[d.db]))
        e.setAttribute("marker-end", "url(#" + svg.dataset.arrow + ")");
      else e.removeAttribute("marker-end");
    });
    var h = ym(base), vb = svg.getAttribute("viewBox").split(" ");
    vb[3] = h;
    svg.setAttribute("height", h);
    svg.setAttribute("viewBox", vb.join(" "));
  }
  svg.addEventListener("click", function (ev) {
    var t = ev.target.closest(".ctitle, .folded");
    if (!t || !svg.contains(t)) return;
    var g = t.closest(".cluster");
    g.dataset.folded = g.dataset.folded === "1" ? "0" : "1";
    draw();
  });
})();
