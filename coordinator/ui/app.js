// The doppel dashboard: reads the coordinator's JSON API (the same one `doppel` reads) with the
// session cookie, renders the fleet page at /ui/ and a workload page at /ui/workloads/NAME, and
// refreshes both every few seconds. Charts are uPlot's.
//
// `window.doppel` exposes what each chart was drawn from (`charts[name] = {series, points}`),
// so a test in a real browser can hold the chart's points against the API's figures.
"use strict";

const REFRESH_MS = 5000;
const TIMELINE_WINDOW_MS = 30 * 60 * 1000;
const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22"];

window.doppel = { charts: {}, renders: 0, page: null, lastError: null };

// ---- helpers -------------------------------------------------------------------------------

async function api(path) {
  const response = await fetch(path, {
    credentials: "same-origin",
    headers: { Accept: "application/json" },
  });
  if (response.status === 401) {
    window.location.assign("/ui/login");
    throw new Error("the session has ended");
  }
  if (!response.ok) {
    let detail = "";
    try { detail = (await response.json()).error; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${response.status} ${detail}`);
  }
  return response.json();
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(value, digits = 1) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (!Number.isFinite(value)) return "∞";
  return Number(value).toFixed(digits);
}

function when(ms) {
  if (!ms) return "–";
  return new Date(ms).toLocaleString();
}

function table(headers, rows, empty) {
  if (rows.length === 0) return el("p", { class: "empty" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows.map((cells) => el("tr", {}, cells.map((c) =>
      c instanceof Node ? el("td", {}, c)
        : el("td", { class: typeof c === "number" ? "num" : null }, c))))));
}

function card(title, ...body) {
  return el("section", { class: "card" }, el("h2", {}, title), ...body);
}

function workloadLink(name) {
  return el("a", { href: `/ui/workloads/${encodeURIComponent(name)}` }, name);
}

// Records what a chart shows, for tests and for the data table under it.
function publish(name, series) {
  window.doppel.charts[name] = {
    series: series.map((s) => s.label),
    points: Object.fromEntries(series.map((s) => [s.label, s.points])),
  };
}

// Series joined on one sorted x axis, as uPlot's data wants: [xs, ys of each series], null
// where a series has no point at that x.
function joinOnX(series) {
  const xs = [...new Set(series.flatMap((s) => s.points.map((p) => p[0])))].sort((a, b) => a - b);
  const index = new Map(xs.map((x, i) => [x, i]));
  return [xs, ...series.map((s) => {
    const ys = new Array(xs.length).fill(null);
    for (const [x, y] of s.points) ys[index.get(x)] = Number.isFinite(y) ? y : null;
    return ys;
  })];
}

// Dotted horizontal lines (the SLO, capacities) across the plot, labelled at the right end,
// where the y axis cannot hide the label.
function drawHlines(u, hlines) {
  const ctx = u.ctx;
  ctx.save();
  ctx.font = `${11 * devicePixelRatio}px sans-serif`;
  ctx.textAlign = "right";
  ctx.setLineDash([2, 3]);
  for (const h of hlines) {
    const y = u.valToPos(h.y, "y", true);
    if (y < u.bbox.top || y > u.bbox.top + u.bbox.height) continue;
    ctx.strokeStyle = h.color || "#b42318";
    ctx.fillStyle = h.color || "#b42318";
    ctx.beginPath();
    ctx.moveTo(u.bbox.left, y);
    ctx.lineTo(u.bbox.left + u.bbox.width, y);
    ctx.stroke();
    ctx.fillText(h.label, u.bbox.left + u.bbox.width - 4, y - 4);
  }
  ctx.restore();
}

// A time chart: `series` = [{label, points: [[ms, y], ...], color, dash, band}], joined on
// one time axis. `markers` = [{at_ms, label, color}] drawn as vertical lines; `hlines` =
// [{y, label, color}] as horizontal ones.
function timeChart(name, container, { series, yLabel, markers = [], hlines = [], bands = [] }) {
  publish(name, series);
  if (series.every((s) => s.points.length === 0)) {
    container.append(el("p", { class: "empty" }, "No measurements in the window yet."));
    return;
  }
  const data = joinOnX(series);
  data[0] = data[0].map((x) => x / 1000);
  const overlay = {
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.lineWidth = 2 * devicePixelRatio;
        for (const m of markers) {
          const x = u.valToPos(m.at_ms / 1000, "x", true);
          if (x < u.bbox.left || x > u.bbox.left + u.bbox.width) continue;
          ctx.strokeStyle = m.color || "#555";
          ctx.setLineDash([6, 4]);
          ctx.beginPath();
          ctx.moveTo(x, u.bbox.top);
          ctx.lineTo(x, u.bbox.top + u.bbox.height);
          ctx.stroke();
          ctx.fillStyle = m.color || "#555";
          ctx.font = `${11 * devicePixelRatio}px sans-serif`;
          ctx.fillText(m.label, x + 4, u.bbox.top + 12 * devicePixelRatio);
        }
        ctx.restore();
        drawHlines(u, hlines);
      }],
    },
  };
  const yMax = Math.max(0, ...hlines.map((h) => h.y),
    ...series.flatMap((s) => s.points.map((p) => p[1]).filter(Number.isFinite)));
  const opts = {
    width: Math.max(520, container.clientWidth - 10),
    height: 260,
    plugins: [overlay],
    scales: { x: { time: true }, y: { range: [0, yMax > 0 ? yMax * 1.1 : 1] } },
    axes: [{}, { label: yLabel }],
    bands,
    series: [{}, ...series.map((s, i) => ({
      label: s.label,
      stroke: s.color || PALETTE[i % PALETTE.length],
      dash: s.dash,
      fill: s.fill,
      width: 1.5,
      spanGaps: false,
      points: { show: s.points.length < 60 },
    }))],
  };
  // eslint-disable-next-line no-new, new-cap
  new uPlot(opts, data, container);
}

// Latency against load: `series` = [{label, points, color, line}]. Lines (the fitted models)
// are uPlot series joined on one load axis; scatter sets (measured points, knees) may repeat a
// load, which uPlot's joined data cannot hold, so a draw hook plots them.
function xyChart(name, container, { series, xLabel, yLabel, hlines = [] }) {
  publish(name, series);
  const shown = series.filter((s) => s.points.length > 0);
  if (shown.length === 0) {
    container.append(el("p", { class: "empty" }, "No type has a performance model yet."));
    return;
  }
  const finite = (v) => Number.isFinite(v);
  const xMax = Math.max(...shown.flatMap((s) => s.points.map((p) => p[0]).filter(finite)));
  const lines = shown.filter((s) => s.line);
  const scatter = shown.filter((s) => !s.line);
  // Up to half again the SLO or the highest measurement: a fitted curve rises without bound
  // towards saturation and would flatten everything measured into the axis.
  const yMax = 1.5 * Math.max(...hlines.map((h) => h.y),
    ...scatter.flatMap((s) => s.points.map((p) => p[1]).filter(finite)));
  const data = joinOnX(lines);
  const draw = (u) => {
    const ctx = u.ctx;
    ctx.save();
    for (const s of scatter) {
      ctx.fillStyle = s.color;
      const r = (s.size || 5) * devicePixelRatio / 2;
      for (const [x, y] of s.points) {
        if (!finite(x) || !finite(y)) continue;
        ctx.beginPath();
        ctx.arc(u.valToPos(x, "x", true), u.valToPos(y, "y", true), r, 0, 2 * Math.PI);
        ctx.fill();
      }
    }
    ctx.restore();
    drawHlines(u, hlines);
  };
  const opts = {
    width: Math.max(520, container.clientWidth - 10),
    height: 280,
    scales: {
      x: { time: false, range: [0, xMax > 0 ? xMax * 1.05 : 1] },
      y: { range: [0, yMax > 0 ? yMax : 1] },
    },
    axes: [{ label: xLabel }, { label: yLabel }],
    series: [{ label: "load/s" }, ...lines.map((s) => ({
      label: s.label, stroke: s.color, width: 1.5, spanGaps: true, points: { show: false },
    }))],
    plugins: [{ hooks: { draw: [draw] } }],
  };
  // eslint-disable-next-line no-new, new-cap
  new uPlot(opts, data, container);
  container.append(el("p", { class: "muted" }, "Dots: ",
    scatter.flatMap((s, i) => [i ? ", " : "", el("span", { style: `color:${s.color}` }, "●"),
      ` ${s.label}`])));
}

function chartBox() {
  return el("div", { class: "chart" });
}

// ---- the fleet page ------------------------------------------------------------------------

async function renderFleet(app) {
  const [workloads, shadows, warnings, recommendations, actions] = await Promise.all([
    api("/v1/workloads"),
    api("/v1/shadows"),
    api("/v1/warnings"),
    api("/v1/recommendations?limit=50"),
    api("/v1/actions?limit=50"),
  ]);
  const timelines = await Promise.all(workloads.map((w) =>
    api(`/v1/workloads/${encodeURIComponent(w.name)}/timeline?window_ms=120000`)));
  document.getElementById("crumb").textContent = "Fleet";

  const rows = workloads.map((w, i) => {
    const live = timelines[i].series.filter((s) => s.role === "live");
    const last = live.flatMap((s) => s.points).sort((a, b) => a.at_ms - b.at_ms).pop();
    const slo = w.policy.slo;
    const state = !last ? el("span", { class: "muted" }, "no data")
      : last.slo_ms <= slo.max_latency_ms
        ? el("span", { class: "good" }, `met (p${slo.percentile} ${fmt(last.slo_ms)} ms)`)
        : el("span", { class: "bad" }, `breached (p${slo.percentile} ${fmt(last.slo_ms)} ms)`);
    const mine = shadows.filter((s) => s.workload === w.name);
    const cost = mine.reduce((sum, s) => sum + s.price_per_hour, 0);
    const budget = w.policy.budget.shadow_cost_per_hour;
    const openWarnings = warnings.filter((x) => x.workload === w.name && !x.cleared_ms);
    const lastRec = recommendations.find((r) => r.workload === w.name);
    const lastAction = actions.find((a) => a.workload === w.name);
    return [
      workloadLink(w.name),
      w.live.map((l) => l.vm_type).join(", "),
      state,
      openWarnings.length
        ? el("span", { class: "warn" }, openWarnings.map((x) =>
          `${x.vm_type}: lead ${fmt((x.body.lead_secs || 0) / 60, 0)} min`).join("; "))
        : "none",
      lastRec ? `${lastRec.current_vm_type} → ${lastRec.recommended_vm_type} (${lastRec.reason})`
        : "none",
      lastAction ? `${lastAction.from_vm_type} → ${lastAction.to_vm_type}: ${lastAction.state}`
        : "none",
      w.shadows.map((x) => x.vm_type).join(", ") || "none",
      `$${fmt(cost, 3)}/h` + (budget ? ` of $${fmt(budget, 3)}/h` : ""),
      w.policy.mode,
    ];
  });
  app.replaceChildren(
    el("h1", {}, "Fleet"),
    table(["Workload", "Live type", "SLO (last 2 min)", "Warnings", "Last recommendation",
      "Last action", "Shadow types", "Managed shadow cost", "Mode"], rows,
    "No workloads yet: add one with `doppel workload add`."),
    el("h2", {}, "Recent recommendations"),
    table(["When", "Workload", "From", "To", "Reason"], recommendations.slice(0, 10).map((r) =>
      [when(r.created_ms), r.workload, r.current_vm_type, r.recommended_vm_type, r.reason]),
    "None yet."),
  );
  window.doppel.fleet = { workloads: workloads.map((w) => w.name), rows: rows.length };
}

// ---- the workload page ---------------------------------------------------------------------

function seriesName(s) {
  return `${s.role} ${s.vm_type}`;
}

function latencyChart(box, timeline) {
  const series = [];
  timeline.series.forEach((s, i) => {
    const color = PALETTE[i % PALETTE.length];
    series.push({ label: `${seriesName(s)} p50`, color, dash: [4, 3],
      points: s.points.map((p) => [p.at_ms, p.p50_ms]) });
    series.push({ label: `${seriesName(s)} p99`, color,
      points: s.points.map((p) => [p.at_ms, p.p99_ms]) });
  });
  timeChart("latency", box, {
    series,
    yLabel: "latency, ms",
    markers: timeline.moves.map((m) => ({ at_ms: m.at_ms, label: `moved to ${m.to_vm_type}`,
      color: "#444" })),
    hlines: [{ y: timeline.slo_max_latency_ms, label: `SLO p${timeline.slo_percentile}` }],
  });
}

function loadChart(box, timeline, forecastView) {
  const offered = timeline.offered_load.map((p) => [p.at_ms, p.per_s]);
  const f = forecastView.forecast;
  const points = f ? f.points : [];
  const series = [
    { label: "offered load (live)", color: "#1d2330", points: offered },
    { label: "forecast median", color: "#1f77b4", dash: [5, 4],
      points: points.map((p) => [p.at_ms, p.median]) },
    { label: "forecast 80% low", color: "#9ecae1", points: points.map((p) => [p.at_ms, p.lo80]) },
    { label: "forecast 80% high", color: "#9ecae1",
      points: points.map((p) => [p.at_ms, p.hi80]) },
  ];
  const count = f ? f.current_count || 1 : 1;
  const hlines = (f ? f.types : []).map((t, i) => ({
    y: t.capacity_at_slo_per_s * count,
    label: `capacity ${t.vm_type} ×${count}: ${fmt(t.capacity_at_slo_per_s * count, 0)}/s`,
    color: PALETTE[(i + 2) % PALETTE.length],
  }));
  const markers = forecastView.warnings.filter((w) => !w.cleared_ms).map((w) => ({
    at_ms: w.body.expected_breach_ms || w.raised_ms,
    label: `warning: breach in ${fmt((w.body.lead_secs || 0) / 60, 1)} min`,
    color: "#b54708",
  }));
  timeChart("load", box, {
    series,
    yLabel: "exchanges/s",
    hlines,
    markers,
    // The prediction band: filled between the 80 % high (series 4) and low (series 3).
    bands: points.length ? [{ series: [4, 3], fill: "rgba(31,119,180,0.12)" }] : [],
  });
  window.doppel.capacities = hlines.map((h) => ({ label: h.label, y: h.y }));
}

function curveChart(box, forecastView) {
  const f = forecastView.forecast;
  const types = f ? f.types : [];
  const series = [];
  types.forEach((t, i) => {
    const color = PALETTE[i % PALETTE.length];
    series.push({ label: `${t.vm_type} measured`, color, points: t.measured || [] });
    series.push({ label: `${t.vm_type} model`, color, line: true, points: t.model_curve || [] });
    const knee = t.knee_load_per_s || t.capacity_at_slo_per_s;
    if (Number.isFinite(knee) && f.slo_max_latency_ms !== undefined) {
      series.push({ label: `${t.vm_type} knee`, color, size: 11,
        points: [[knee, f.slo_max_latency_ms]] });
    }
  });
  xyChart("curve", box, {
    series,
    xLabel: "load per instance, exchanges/s",
    yLabel: "latency at the SLO percentile, ms",
    hlines: f && f.slo_max_latency_ms !== undefined
      ? [{ y: f.slo_max_latency_ms, label: "SLO" }] : [],
  });
}

function errorChart(box, timeline) {
  timeChart("errors", box, {
    series: timeline.series.map((s, i) => ({
      label: `${seriesName(s)} errors`,
      color: PALETTE[i % PALETTE.length],
      points: s.points.map((p) => [p.at_ms, p.error_rate * 100]),
    })),
    yLabel: "failed exchanges, %",
  });
}

async function renderWorkload(app, name) {
  const enc = encodeURIComponent(name);
  const [spec, timeline, forecastView, shadows, recommendations, actions, patterns] =
    await Promise.all([
      api(`/v1/workloads/${enc}`),
      api(`/v1/workloads/${enc}/timeline?window_ms=${TIMELINE_WINDOW_MS}`),
      api(`/v1/workloads/${enc}/forecast`),
      api(`/v1/shadows?workload=${enc}&all=true`),
      api("/v1/recommendations?limit=100"),
      api("/v1/actions?limit=100"),
      api(`/v1/workloads/${enc}/patterns`),
    ]);
  // Each shadow's history (its state changes), newest shadows first, at most 20.
  const recent = [...shadows].sort((a, b) => b.created_ms - a.created_ms).slice(0, 20);
  const histories = await Promise.all(recent.map((s) =>
    api(`/v1/shadows/${encodeURIComponent(s.id)}/events`)));
  const history = new Map(recent.map((s, i) => [s.id, histories[i]]));
  document.getElementById("crumb").replaceChildren(
    el("a", { href: "/ui/" }, "Fleet"), " / ", name);
  const f = forecastView.forecast;
  if (f) f.slo_max_latency_ms = spec.policy.slo.max_latency_ms;

  const boxes = { latency: chartBox(), load: chartBox(), curve: chartBox(), errors: chartBox() };
  const active = shadows.filter((s) => ["requested", "creating", "running", "paused"]
    .includes(s.state));
  const cost = active.reduce((sum, s) => sum + s.price_per_hour, 0);
  const budget = spec.policy.budget.shadow_cost_per_hour;
  const mine = recommendations.filter((r) => r.workload === name);
  const myActions = actions.filter((a) => a.workload === name);
  const plan = patterns.plan;

  app.replaceChildren(
    el("h1", {}, name),
    el("p", {},
      `Live on ${spec.live.map((l) => l.vm_type).join(", ")} · SLO p${spec.policy.slo.percentile}`
      + ` ≤ ${spec.policy.slo.max_latency_ms} ms · mode ${spec.policy.mode}`
      + (f ? ` · forecast model ${f.model}, decision ${f.decision}` : "")),
    el("div", { class: "grid" },
      card("Latency over time, live and each shadow type", boxes.latency),
      card("Offered load, forecast and capacities", boxes.load),
      card("Latency against load per type", boxes.curve),
      card("Error rates per type", boxes.errors)),
    card(`Shadow pool: ${active.length} active, $${fmt(cost, 3)}/h`
      + (budget ? ` of $${fmt(budget, 3)}/h budget` : ""),
    table(["Id", "Type", "State", "Origin", "$/h", "Created", "History", "Error"],
      shadows.map((s) => [s.id, s.vm_type, s.state, s.origin, s.price_per_hour,
        when(s.created_ms),
        (history.get(s.id) || []).map((e) =>
          `${e.state} ${new Date(e.at_ms).toLocaleTimeString()}`).join(" → "),
        s.error || ""]), "No shadows.")),
    card("Recommendations and actions",
      table(["When", "From", "To", "Reason", "Evidence"], mine.map((r) => [
        when(r.created_ms), r.current_vm_type, r.recommended_vm_type, r.reason,
        el("details", {}, el("summary", {}, "body"),
          el("pre", {}, JSON.stringify(r.body, null, 2)))]), "No recommendations yet."),
      el("h2", {}, "Actions"),
      table(["Started", "From", "To", "State", "Verified", "Live at SLO, ms"], myActions.map((a) =>
        [when(a.started_ms), a.from_vm_type, a.to_vm_type, a.state, when(a.verified_ms),
          fmt(a.live_latency_ms)]), "No actions.")),
    card("Warnings",
      table(["Raised", "Type", "Lead", "Probability", "Cleared"], forecastView.warnings.map((w) => [
        when(w.raised_ms), w.vm_type, `${fmt((w.body.lead_secs || 0) / 60, 1)} min`,
        fmt(w.body.probability, 2), w.cleared_ms ? when(w.cleared_ms) : "open"]), "None.")),
    card("Learned pattern mix",
      plan ? table(["Pattern", "Flows/s", "Share, %", "Class", "Mirror rate"], plan.patterns.map(
        (p) => [p.pattern, fmt(p.flows_per_s, 2), fmt(p.share * 100, 1), p.class,
          fmt(p.rate, 3)]), "No patterns learned yet.")
        : el("p", { class: "empty" },
          patterns.learning ? "Learning: no plan yet." : "Mirroring is not learned for this workload.")),
  );
  latencyChart(boxes.latency, timeline);
  loadChart(boxes.load, timeline, forecastView);
  curveChart(boxes.curve, forecastView);
  errorChart(boxes.errors, timeline);
  window.doppel.workload = name;
}

// ---- routing and refresh -------------------------------------------------------------------

async function render() {
  const app = document.getElementById("app");
  const path = window.location.pathname;
  const match = path.match(/^\/ui\/workloads\/([^/]+)$/);
  try {
    if (match) {
      window.doppel.page = "workload";
      await renderWorkload(app, decodeURIComponent(match[1]));
    } else {
      window.doppel.page = "fleet";
      await renderFleet(app);
    }
    window.doppel.lastError = null;
    document.getElementById("updated").textContent =
      `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    // Shown on the page (the console stays for the browser's own errors).
    window.doppel.lastError = String(error.message || error);
    const banner = el("div", { class: "error-banner" },
      `Could not refresh: ${window.doppel.lastError}`);
    app.querySelector(".error-banner")?.remove();
    app.prepend(banner);
  }
  window.doppel.renders += 1;
}

// One render at a time: a slow answer delays the next refresh rather than racing it.
let rendering = false;
async function refresh() {
  if (rendering) return;
  rendering = true;
  try { await render(); } finally { rendering = false; }
}

refresh();
setInterval(refresh, REFRESH_MS);
