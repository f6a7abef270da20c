// Cerebro's dashboard page: polls the JSON API for what changed and redraws the open view.
// Everything is built with DOM calls (no innerHTML from records), so params cannot inject.
"use strict";

const state = {
  experiment: new URLSearchParams(location.search).get("experiment"),
  info: null, revision: null, models: [], history: [], hops: [], lastHop: 0,
  view: "leaderboard", sort: { key: "rank", asc: true }, model: null, detail: null,
  dirty: new Set(["all"]),
};
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#7f7f7f", "#bcbd22", "#17becf"];
const color = (id) => PALETTE[id % PALETTE.length];

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}
const $ = (sel) => document.querySelector(sel);
const fmt = (v) => (v === null || v === undefined ? "–" :
  typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toPrecision(4)) : String(v));

// The API --------------------------------------------------------------------------------
function url(path, params) {
  const q = new URLSearchParams(params || {});
  if (state.experiment) q.set("experiment", state.experiment);
  const s = q.toString();
  return path + (s ? "?" + s : "");
}
async function api(path, params) {
  const r = await fetch(url(path, params), { credentials: "same-origin" });
  if (!r.ok) throw new Error((await r.json().catch(() => ({}))).detail || r.statusText);
  return r.json();
}
async function control(path, body) {
  const headers = { "X-Cerebro-Csrf": "1", "Content-Type": "application/json" };
  const who = $("#who").value.trim();
  if (who) headers["X-Cerebro-User"] = who;
  const r = await fetch(url(path), { method: "POST", credentials: "same-origin", headers,
    body: body === undefined ? "{}" : JSON.stringify(body) });
  const answer = await r.json().catch(() => ({ detail: r.statusText }));
  if (!r.ok) { notice(answer.detail || r.statusText, true); return null; }
  notice(`request #${answer.control} (${answer.op}) recorded for ${answer.who}: ` +
    "applied at the model's next hop boundary");
  state.dirty.add("all");
  return answer;
}
function notice(text, error) {
  const n = $("#notice");
  n.textContent = text;
  n.className = error ? "error" : "";
}

// Polling: only what changed ---------------------------------------------------------------
async function poll() {
  try {
    const info = await api("/api/experiment");
    const old = state.revision;
    const rev = info.revision;
    state.info = info;
    if (!old || old.models !== rev.models || old.epochs !== rev.epochs ||
        old.settled !== rev.settled || old.controls !== rev.controls) {
      state.models = await api("/api/models");
      state.dirty.add("models");
    }
    if (!old || old.epochs !== rev.epochs) {
      if (rev.epochs < state.history.length) state.history = [];  // epochs rolled back
      const more = await api("/api/history", { after: state.history.length });
      state.history = state.history.concat(more);
      state.dirty.add("history");
    }
    while (rev.hops > state.lastHop) {
      const more = await api("/api/hops", { after: state.lastHop });
      if (!more.length) break;
      state.hops = state.hops.concat(more);
      state.lastHop = more[more.length - 1].id;
      state.dirty.add("hops");
    }
    if (old && (old.events !== rev.events || old.settled !== rev.settled)) state.dirty.add("detail");
    state.revision = rev;
    $("#live").className = info.status === "running" ? "on" : "";
    if (state.dirty.size) await render();
  } catch (e) {
    notice(String(e.message || e), true);
  } finally {
    setTimeout(poll, 1500);
  }
}

// Views ----------------------------------------------------------------------------------
async function render() {
  const dirty = state.dirty;
  state.dirty = new Set();
  renderHeader();
  const v = state.view;
  if (v === "leaderboard") renderLeaderboard();
  else if (v === "curves") renderCurves();
  else if (v === "parallel") renderParallel();
  else if (v === "timeline") renderTimeline();
  else if (v === "model") await renderModel(dirty.has("all") || dirty.has("detail") ||
    dirty.has("hops") || dirty.has("models"));
}

function renderHeader() {
  const info = state.info;
  if (!info) return;
  const st = $("#experiment-status");
  st.textContent = info.status;
  st.className = "status status-" + info.status;
  $("#experiment-counts").textContent = Object.entries(info.counts)
    .map(([k, n]) => `${n} ${k}`).join(" · ") + ` · ${info.metric} (${info.mode})`;
  $("#csv-leaderboard").href = url("/api/models.csv");
  $("#csv-history").href = url("/api/history.csv");
  const metrics = metricNames();
  const sel = $("#curve-metric");
  if (sel.options.length !== metrics.length) {
    const keep = sel.value || info.metric;
    sel.replaceChildren(...metrics.map((m) => h("option", { value: m }, m)));
    sel.value = metrics.includes(keep) ? keep : metrics[0] || "";
  }
  const ms = $("#model-select");
  if (ms.options.length !== state.models.length) {
    ms.replaceChildren(...state.models.map((m) => h("option", { value: m.id }, `model ${m.id}`)));
    if (state.model !== null) ms.value = state.model;
  }
}

function metricNames() {
  const names = new Set();
  for (const m of state.models) Object.keys(m.metrics).forEach((k) => names.add(k));
  return [...names].sort();
}
function paramNames() {
  const names = new Set();
  for (const m of state.models) Object.keys(m.params).forEach((k) => names.add(k));
  return [...names].sort();
}
function ranked() {
  const metric = state.info.metric;
  const sign = state.info.mode === "max" ? -1 : 1;
  const score = (m) => m.metrics[metric];
  return [...state.models].sort((a, b) => {
    const sa = score(a), sb = score(b);
    if ((sa === null || sa === undefined) !== (sb === null || sb === undefined))
      return sa === null || sa === undefined ? 1 : -1;
    if ((a.status !== "completed") !== (b.status !== "completed"))
      return a.status !== "completed" ? 1 : -1;
    return sign * ((sa ?? 0) - (sb ?? 0)) || a.id - b.id;
  });
}

function renderLeaderboard() {
  if (!state.info) return;
  const metrics = metricNames();
  const params = paramNames();
  const columns = [["rank", "#"], ["id", "model"], ["status", "status"], ["epochs", "epochs"],
    ["fused", "fused"], ...metrics.map((m) => ["m:" + m, m]), ...params.map((p) => ["p:" + p, p]),
    ["actions", ""]];
  const order = ranked();
  const rank = new Map(order.map((m, i) => [m.id, i + 1]));
  const value = (m, key) => key === "rank" ? rank.get(m.id) : key === "id" ? m.id :
    key === "status" ? m.status : key === "epochs" ? m.epochs_done : key === "fused" ? +m.fused :
    key.startsWith("m:") ? m.metrics[key.slice(2)] : key.startsWith("p:") ? m.params[key.slice(2)] : 0;
  const { key, asc } = state.sort;
  const filter = $("#status-filter").value;
  const rows = order.filter((m) => !filter || m.status === filter).sort((a, b) => {
    const va = value(a, key), vb = value(b, key);
    if (va === vb) return 0;
    if (va === null || va === undefined) return 1;
    if (vb === null || vb === undefined) return -1;
    return (va < vb ? -1 : 1) * (asc ? 1 : -1);
  });
  const head = h("tr", {}, columns.map(([k, label]) => h("th", {
    class: (k === key ? "sorted" + (asc ? " asc" : "") : "") + (k.startsWith("p:") ? " params" : ""),
    "data-key": k,
    onclick: () => {
      if (k === "actions") return;
      state.sort = { key: k, asc: state.sort.key === k ? !state.sort.asc : true };
      renderLeaderboard();
    },
  }, label)));
  $("#leaderboard thead").replaceChildren(head);
  const best = state.info.best;
  $("#leaderboard tbody").replaceChildren(...rows.map((m) => h("tr",
    { "data-model": m.id, "data-status": m.status, class: m.id === best ? "best" : "" },
    h("td", {}, rank.get(m.id)),
    h("td", {}, h("a", { href: "#", onclick: (e) => { e.preventDefault(); openModel(m.id); } },
      m.id)),
    h("td", {}, h("span", { class: "status status-" + m.status }, m.status)),
    h("td", {}, `${m.epochs_done}/${m.max_epochs}`),
    h("td", {}, m.fused ? "yes" : ""),
    metrics.map((k) => h("td", { "data-metric": k }, fmt(m.metrics[k]))),
    params.map((p) => h("td", { class: "params" }, fmt(m.params[p]))),
    h("td", {}, actionButtons(m)),
  )));
}

function actionButtons(m) {
  const buttons = [];
  if (m.status === "running" || m.status === "paused")
    buttons.push(h("button", { "data-action": "stop", "data-model": m.id,
      onclick: () => control(`/api/models/${m.id}/stop`) }, "stop"));
  if (m.status === "stopped" || m.status === "pruned")
    buttons.push(h("button", { "data-action": "resume", "data-model": m.id,
      onclick: () => control(`/api/models/${m.id}/resume`) }, "resume"));
  buttons.push(h("button", { "data-action": "clone", "data-model": m.id,
    onclick: () => openModel(m.id, true) }, "clone…"));
  return buttons;
}

function plotly(id, traces, layout) {
  if (!window.Plotly) return;
  Plotly.react(id, traces, Object.assign({ margin: { t: 30, r: 20 }, hovermode: "closest" }, layout),
    { displaylogo: false, responsive: true });
}

function renderCurves() {
  if (!state.info) return;
  const metric = $("#curve-metric").value || state.info.metric;
  const topk = +$("#curve-topk").value;
  let shown = ranked();
  if (topk) shown = shown.slice(0, topk);
  const ids = new Set(shown.map((m) => m.id));
  const byModel = new Map();
  for (const row of state.history) {
    if (!ids.has(row.model_id)) continue;
    if (!byModel.has(row.model_id)) byModel.set(row.model_id, []);
    byModel.get(row.model_id).push(row);
  }
  const traces = [...byModel.entries()].sort((a, b) => a[0] - b[0]).map(([id, rows]) => ({
    type: "scatter", mode: "lines+markers", name: `model ${id}`,
    x: rows.map((r) => r.epoch), y: rows.map((r) => r.metrics[metric]),
    line: { color: color(id), width: id === state.info.best ? 4 : 2 },
  }));
  plotly("curves", traces, { title: { text: metric + " per epoch" },
    xaxis: { title: { text: "epoch" }, dtick: 1 },
    yaxis: { title: { text: metric }, type: $("#curve-log").checked ? "log" : "linear" } });
}

// Parallel coordinates drawn as SVG lines (plotly's parcoords needs WebGL, which a headless
// or remote browser often lacks): one axis per parameter and the metric, each scaled to [0, 1].
function renderParallel() {
  if (!state.info) return;
  const metric = state.info.metric;
  const models = state.models.filter((m) => m.metrics[metric] !== null && m.metrics[metric] !== undefined);
  const axes = paramNames().map((p) => {
    const values = models.map((m) => m.params[p]);
    if (values.every((v) => typeof v === "number")) {
      const log = values.every((v) => v > 0) && Math.max(...values) / Math.min(...values) > 20;
      return scaled(log ? `${p} (log)` : p, values, log);
    }
    const levels = [...new Set(values.map(String))].sort();
    const axis = scaled(p, values.map((v) => levels.indexOf(String(v))), false);
    axis.ticks = levels.map((l, i) => [levels.length > 1 ? i / (levels.length - 1) : 0.5, l]);
    return axis;
  });
  axes.push(scaled(metric, models.map((m) => m.metrics[metric]), false));
  const score = axes[axes.length - 1].values;
  const lo = Math.min(...score), hi = Math.max(...score);
  const good = (v) => (hi > lo ? (state.info.mode === "max" ? (v - lo) / (hi - lo) : (hi - v) / (hi - lo)) : 1);
  const traces = models.map((m, i) => ({
    type: "scatter", mode: "lines+markers", name: `model ${m.id}`, showlegend: false,
    x: axes.map((_, j) => j), y: axes.map((a) => a.norm[i]),
    line: { color: `hsl(${Math.round(240 - 200 * good(score[i]))}, 70%, 45%)`,
      width: m.id === state.info.best ? 4 : 1.5 },
    hovertext: axes.map((a) => `model ${m.id} · ${a.label} = ${fmt(a.raw[i])}`), hoverinfo: "text",
  }));
  const annotations = [];
  axes.forEach((a, j) => {
    annotations.push({ x: j, y: 1.08, text: `<b>${a.label}</b>`, showarrow: false });
    const ticks = a.ticks || [[0, fmt(a.min)], [1, fmt(a.max)]];
    for (const [y, text] of ticks) annotations.push({ x: j, y, text, showarrow: false, xanchor: "left", xshift: 4, font: { size: 10 } });
  });
  plotly("parallel", traces, { title: { text: `parameters vs ${metric} (${models.length} models; ` +
      "warmer colour: better)" },
    xaxis: { tickvals: axes.map((_, j) => j), ticktext: axes.map(() => ""), showgrid: true,
      gridcolor: "#888", zeroline: false, range: [-0.2, axes.length - 0.6] },
    yaxis: { visible: false, range: [-0.05, 1.15] }, annotations });
}

function scaled(label, values, log) {
  const raw = values;
  const v = log ? values.map(Math.log10) : values;
  const min = Math.min(...v), max = Math.max(...v);
  const norm = v.map((x) => (max > min ? (x - min) / (max - min) : 0.5));
  return { label, raw, values: raw, norm, min: log ? 10 ** min : min, max: log ? 10 ** max : max };
}

function renderTimeline() {
  const byModel = new Map();
  for (const hop of state.hops) {
    if (!byModel.has(hop.model_id)) byModel.set(hop.model_id, []);
    byModel.get(hop.model_id).push(hop);
  }
  const traces = [...byModel.entries()].sort((a, b) => a[0] - b[0]).map(([id, hops]) => ({
    type: "bar", orientation: "h", name: `model ${id}`,
    marker: { color: color(id), opacity: hops.map((x) => (x.kind === "train" ? 1 : 0.45)) },
    y: hops.map((x) => `worker ${x.worker}`), base: hops.map((x) => x.start),
    x: hops.map((x) => Math.max(x.end - x.start, 0.001)),
    hovertext: hops.map((x) => `model ${id} · ${x.kind} shard ${x.shard} · epoch ${x.epoch}` +
      (x.unit !== null ? ` · unit ${x.unit}` : "")),
    hoverinfo: "text",
  }));
  plotly("timeline", traces, { barmode: "overlay",
    title: { text: `${state.hops.length} units (training hops solid, validation passes pale)` },
    xaxis: { title: { text: "seconds since the experiment started" } },
    yaxis: { categoryorder: "category descending" } });
}

function openModel(id, cloning) {
  state.model = id;
  state.cloning = !!cloning;
  $("#model-select").value = id;
  show("model");
}

async function renderModel(refetch) {
  if (state.model === null && state.models.length) state.model = ranked()[0].id;
  if (state.model === null) return;
  if (refetch || !state.detail || state.detail.summary.id !== state.model)
    state.detail = await api(`/api/models/${state.model}`);
  const d = state.detail, m = d.summary;
  $("#model-actions").replaceChildren(...actionButtons(m));
  const parent = m.parent !== null ? h("a", { href: "#", onclick: (e) => {
    e.preventDefault(); openModel(m.parent); } }, `model ${m.parent}`) : "–";
  const children = d.children.length ? d.children.map((c) => h("a", { href: "#",
    onclick: (e) => { e.preventDefault(); openModel(c); } }, ` model ${c}`)) : "–";
  const body = $("#model-body");
  const keepForm = body.querySelector("#clone-form");
  const editing = keepForm && keepForm.dataset.model === String(m.id) && keepForm.contains(document.activeElement);
  const curves = h("div", { id: "model-curves", class: "plot" });
  const sections = [
    h("h2", {}, `model ${m.id} `, h("span", { class: "status status-" + m.status }, m.status)),
    h("div", { class: "grid2" },
      h("div", {},
        h("h3", {}, "parameters"),
        h("table", {}, Object.entries(m.params).map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, fmt(v))))),
        h("p", {}, `origin: ${m.origin} · parent: `, parent, " · clones:", children),
        h("p", {}, `epochs ${m.epochs_done}/${m.max_epochs}` + (m.fused ? " · fused" : "") +
          (d.best_epoch !== null ? ` · best epoch ${d.best_epoch}` : "")),
        editing ? keepForm : cloneForm(m),
        epochsForm(m)),
      curves),
    d.error ? h("div", {}, h("h3", {}, "error"), h("pre", {}, d.error)) : null,
    h("h3", {}, `hops (${d.hops.length})`),
    table(["epoch", "kind", "shard", "worker", "unit", "start", "end"],
      d.hops.slice(-40).reverse().map((x) => [x.epoch, x.kind, x.shard, x.worker, x.unit, x.start, x.end])),
    h("h3", {}, "checkpoints"),
    table(["epoch", "path", "bytes", "pruned"], d.checkpoints.map((c) => [c.epoch, c.path, c.bytes, c.pruned])),
    h("h3", {}, "requests and events"),
    table(["op", "who", "state", "outcome", "error"], d.controls.map((c) =>
      [c.op, c.who, c.state, JSON.stringify(c.outcome), c.error])),
    table(["time", "kind", "detail"], d.events.map((e) => [e.time, e.kind, JSON.stringify(e.detail)])),
  ];
  body.replaceChildren(...sections.filter(Boolean));
  const metrics = Object.keys(m.metrics);
  plotly("model-curves", metrics.map((k) => ({ type: "scatter", mode: "lines+markers", name: k,
    x: d.history.map((r) => r.epoch), y: d.history.map((r) => r.metrics[k]) })),
  { title: { text: "history" }, xaxis: { dtick: 1, title: { text: "epoch" } } });
}

function table(columns, rows) {
  return h("table", {}, h("tr", {}, columns.map((c) => h("th", {}, c))),
    rows.map((r) => h("tr", {}, r.map((v) => h("td", {}, fmt(v))))));
}

function paramInputs(values) {
  const space = state.info.space || {};
  const names = [...new Set([...Object.keys(space), ...Object.keys(values)])];
  return names.map((name) => {
    const dim = space[name];
    const v = values[name];
    if (dim && dim.kind === "choice") {
      return h("label", {}, name + " ", h("select", { name: "param-" + name },
        dim.values.map((c) => h("option", { value: JSON.stringify(c),
          selected: JSON.stringify(c) === JSON.stringify(v) }, String(c)))));
    }
    const hint = dim ? `${dim.kind} [${dim.low}, ${dim.high}]` : "";
    return h("label", { title: hint }, name + " ", h("input", { name: "param-" + name,
      value: v === undefined ? "" : JSON.stringify(v), size: 10, placeholder: hint }));
  });
}
function readParams(form) {
  const params = {};
  for (const el of form.querySelectorAll("[name^='param-']")) {
    if (el.value === "") continue;
    let v = el.value;
    try { v = JSON.parse(v); } catch (e) { /* a plain string */ }
    params[el.name.slice(6)] = v;
  }
  return params;
}

function cloneForm(m) {
  const form = h("form", { id: "clone-form", class: "panel", "data-model": m.id },
    h("h3", {}, `clone model ${m.id}`),
    h("div", { class: "params" }, paramInputs(m.params)),
    h("label", {}, h("input", { type: "checkbox", name: "warm_start", checked: true }),
      " warm start (from its exact state)"),
    h("label", {}, "epochs ", h("input", { type: "number", name: "epochs", min: 1, size: 4 })),
    h("button", { type: "submit", id: "clone-submit" }, "Clone"));
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const epochs = form.querySelector("[name=epochs]").value;
    const answer = await control(`/api/models/${m.id}/clone`, {
      params: readParams(form), warm_start: form.querySelector("[name=warm_start]").checked,
      epochs: epochs === "" ? null : +epochs });
    if (answer) form.dataset.sent = String(answer.control);
  });
  if (state.cloning) setTimeout(() => form.scrollIntoView(), 0);
  return form;
}

function epochsForm(m) {
  const form = h("form", { id: "epochs-form", class: "panel" },
    h("label", {}, "epoch budget ", h("input", { type: "number", name: "epochs", min: 1,
      value: m.max_epochs, size: 4 })),
    h("button", { type: "submit" }, "Set epochs"));
  form.addEventListener("submit", (e) => {
    e.preventDefault();
    control(`/api/models/${m.id}/epochs`, { epochs: +form.querySelector("[name=epochs]").value });
  });
  return form;
}

function show(view) {
  state.view = view;
  for (const b of document.querySelectorAll("#tabs button"))
    b.classList.toggle("active", b.dataset.view === view);
  for (const s of document.querySelectorAll(".view"))
    s.classList.toggle("active", s.id === "view-" + view);
  state.dirty.add("all");
  render();
}

async function setup() {
  for (const b of document.querySelectorAll("#tabs button"))
    b.addEventListener("click", () => show(b.dataset.view));
  for (const id of ["#status-filter"]) $(id).addEventListener("change", renderLeaderboard);
  for (const id of ["#curve-metric", "#curve-topk", "#curve-log"])
    $(id).addEventListener("change", renderCurves);
  $("#model-select").addEventListener("change", (e) => openModel(+e.target.value));
  $("#who").value = localStorage.getItem("cerebro-who") || "";
  $("#who").addEventListener("change", (e) => localStorage.setItem("cerebro-who", e.target.value));
  const add = $("#add-form");
  $("#add-open").addEventListener("click", () => {
    const first = state.models.length ? state.models[0].params : {};
    add.querySelector(".params").replaceChildren(...paramInputs(first));
    add.classList.remove("hidden");
  });
  add.querySelector(".cancel").addEventListener("click", () => add.classList.add("hidden"));
  add.addEventListener("submit", async (e) => {
    e.preventDefault();
    const epochs = add.querySelector("[name=epochs]").value;
    if (await control("/api/models", { params: readParams(add), epochs: epochs === "" ? null : +epochs }))
      add.classList.add("hidden");
  });
  try {
    const list = await api("/api/experiments");
    const sel = $("#experiment-select");
    sel.replaceChildren(...list.map((e) => h("option", { value: e.key }, `${e.name} (${e.key})`)));
    if (!state.experiment && list.length) state.experiment = list[list.length - 1].key;
    sel.value = state.experiment;
    sel.classList.toggle("hidden", list.length < 2);
    sel.addEventListener("change", () => { location.search = "?experiment=" + encodeURIComponent(sel.value); });
  } catch (e) {
    notice(String(e.message || e), true);
  }
  poll();
}

document.addEventListener("DOMContentLoaded", setup);
