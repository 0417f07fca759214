// The mgpumanager dashboard: plain JavaScript, no build step, nothing fetched from elsewhere.
//
// It follows GET /v1/events with fetch() rather than EventSource, which cannot send the
// Authorization header a broker with a token needs. The stream starts with a snapshot (the
// /v1/status document); each event after it is shown in the log and triggers a fresh
// /v1/status (debounced), and /v1/status is also re-read every few seconds for the figures that
// change without an event (the GPU reading, ages). When the stream ends (the broker restarted,
// or dropped this tab for falling behind) the page reconnects by itself.
"use strict";

const TOKEN_KEY = "mgpumanager.token";
const REFRESH_MS = 2000;
const DEBOUNCE_MS = 120;
const LOG_KEEP = 60;
const PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#edc948",
  "#9c755f", "#ff9da7", "#bab0ac"];
const HOLDS_MEMORY = new Set(["loading", "resident", "unloading", "unknown"]);

const $ = (id) => document.getElementById(id);
const state = {
  status: null,
  colors: {},
  rows: {},         // consumer name -> its table row's cells (kept: its buttons stay put)
  outcomes: {},     // consumer name -> {text, ok} of its last Load/Unload
  live: false,
  refreshTimer: null,
  tokenWaiters: [],
};

class TokenRefused extends Error {}

// -- small helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") {
      for (const [p, x] of Object.entries(v)) {
        if (p.startsWith("--")) el.style.setProperty(p, x);
        else el.style[p] = x;
      }
    }
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function mib(n) {
  if (n === null || n === undefined) return "—";
  return Math.round(n).toLocaleString("en-US");
}

function gib(n) {
  return n === null || n === undefined ? "—" : (n / 1024).toFixed(1) + " GiB";
}

function secs(s) {
  if (s === null || s === undefined) return "—";
  if (s < 1) return (s * 1000).toFixed(0) + " ms";
  if (s < 60) return s.toFixed(s < 10 ? 2 : 1) + " s";
  if (s < 3600) return (s / 60).toFixed(1) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function ago(s) {
  return s === null || s === undefined ? "never" : secs(s) + " ago";
}

function clock(unix) {
  return new Date(unix * 1000).toLocaleTimeString("en-GB", { hour12: false });
}

function pill(text, cls) {
  return h("span", { class: "pill " + (cls || text) }, text);
}

function fill(tbody, rows, columns, emptyText) {
  tbody.replaceChildren(...(rows.length ? rows
    : [h("tr", {}, h("td", { class: "empty", colspan: columns }, emptyText))]));
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function authHeaders() {
  const t = token();
  return t ? { Authorization: "Bearer " + t } : {};
}

// Behind a cluster's front (docs/cluster.md), `?host=NAME` shows that host's broker: every
// call goes to /hosts/NAME/..., and the header's selector switches between the hosts.
const HOST = new URLSearchParams(location.search).get("host");
const BASE = HOST ? "/hosts/" + encodeURIComponent(HOST) : "";

async function api(path, init) {
  const res = await fetch(BASE + path, { cache: "no-store", ...init, headers: authHeaders() });
  if (res.status === 401) throw new TokenRefused(await errorMessage(res));
  return res;
}

async function errorMessage(res) {
  try {
    const doc = await res.json();
    return doc.message || doc.error || res.statusText;
  } catch (e) {
    return res.status + " " + res.statusText;
  }
}

function setConn(which, text) {
  const el = $("conn");
  el.dataset.state = which;
  el.textContent = text;
  state.live = which === "live";
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// -- the token --------------------------------------------------------------------------------

function askForToken(message) {
  setConn("token", "token needed");
  $("data").hidden = true;
  $("auth").hidden = false;
  $("auth-error").textContent = token() ? message || "the broker refused this token" : "";
  $("token").focus();
  return new Promise((resolve) => state.tokenWaiters.push(resolve));
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("auth").hidden = true;
  for (const resolve of state.tokenWaiters.splice(0)) resolve();
});

// -- the stream ----------------------------------------------------------------------------------

async function follow() {
  let backoff = 500;
  for (;;) {
    try {
      const res = await api("/v1/events");
      if (!res.ok) throw new Error(await errorMessage(res));
      backoff = 500;
      await readStream(res.body.getReader());
      setConn("reconnecting", "stream ended, reconnecting…");
    } catch (e) {
      if (e instanceof TokenRefused) {
        await askForToken(e.message);
        continue;
      }
      setConn("reconnecting", "broker unreachable, retrying…");
    }
    await sleep(backoff);
    backoff = Math.min(backoff * 2, 5000);
  }
}

async function readStream(reader) {
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      onBlock(block);
    }
  }
}

function onBlock(block) {
  let type = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") type = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return;
  const doc = JSON.parse(data.join("\n"));
  if (type === "snapshot") {
    setConn("live", "live");
    render(doc);
  } else {
    logEvent(doc);
    refreshSoon();
  }
}

function refreshSoon() {
  if (state.refreshTimer !== null) return;
  state.refreshTimer = setTimeout(async () => {
    state.refreshTimer = null;
    await refresh();
  }, DEBOUNCE_MS);
}

async function refresh() {
  try {
    const res = await api("/v1/status");
    if (res.ok) render(await res.json());
  } catch (e) {
    // The stream notices a broker that went away and reconnects; nothing to do here.
  }
}

setInterval(() => {
  if (state.live && !document.hidden) refresh();
}, REFRESH_MS);

// -- rendering ------------------------------------------------------------------------------------

function render(status) {
  state.status = status;
  $("auth").hidden = true;
  $("data").hidden = false;
  Object.keys(status.consumers).forEach((name, i) => {
    if (!(name in state.colors)) state.colors[name] = PALETTE[i % PALETTE.length];
  });
  const gpu = status.gpu;
  $("device").textContent = `${gpu.device} · ${gpu.backend} · v${status.version}`;
  renderMemory(status);
  renderConsumers(status);
  renderScheduler(status);
  renderEvictions(status.recent_evictions);
  renderJobs(status.recent_jobs);
}

// The bar: what each consumer holds (the figure the planner counts, by its source: measured,
// reported or declared), memory no consumer accounts for, what is free, and the safety margin.
function memoryParts(status) {
  const gpu = status.gpu;
  const total = gpu.total_mib;
  const parts = [];
  for (const [name, c] of Object.entries(status.consumers)) {
    if (!HOLDS_MEMORY.has(c.residency)) continue;
    parts.push({ kind: c.vram_source, name, mib: c.vram_mib, residency: c.residency });
  }
  const held = parts.reduce((a, p) => a + p.mib, 0);
  const outside = gpu.used_mib === null ? 0 : Math.max(0, gpu.used_mib - held);
  const free = Math.max(0, total - held - outside);
  const margin = Math.min(gpu.safety_margin_mib, free);
  return { total, parts, outside, free: free - margin, margin };
}

function renderMemory(status) {
  const gpu = status.gpu;
  const m = memoryParts(status);
  const scale = Math.max(m.total, m.parts.reduce((a, p) => a + p.mib, 0) + m.outside);
  const segs = [];
  const legend = [];
  const seg = (cls, mibs, label, title, color, extra) => {
    if (mibs <= 0) return;
    if (mibs / scale < 0.06) label = "";  // too narrow for words: the legend and title tell
    segs.push(h("div", {
      class: "seg " + cls, title, "data-mib": mibs, ...extra,
      style: { flex: `0 0 ${(100 * mibs / scale).toFixed(3)}%`, "--c": color || "" },
    }, label));
  };
  for (const p of m.parts) {
    const color = state.colors[p.name];
    const title = `${p.name}: ${mib(p.mib)} MiB ${p.kind} (${p.residency})`;
    seg(p.kind, p.mib, `${p.name} ${gib(p.mib)}`, title, color, { "data-consumer": p.name });
    const sw = h("i", { class: "swatch " + p.kind, style: { "--c": color } });
    legend.push(h("span", {}, sw, `${p.name} ${mib(p.mib)} MiB ${p.kind}`));
  }
  seg("outside", m.outside, "outside", `held by no consumer: ${mib(m.outside)} MiB`);
  seg("free", m.free, `free ${gib(m.free)}`, `free: ${mib(m.free)} MiB`);
  seg("margin", m.margin, "", `safety margin: ${mib(m.margin)} MiB`);
  if (m.outside > 0) {
    legend.push(h("span", {}, h("i", { class: "swatch outside" }),
      `outside any consumer ${mib(m.outside)} MiB`));
  }
  legend.push(h("span", {}, h("i", { class: "swatch free" }), `free ${mib(m.free)} MiB`));
  legend.push(h("span", {}, h("i", { class: "swatch margin" }),
    `safety margin ${mib(gpu.safety_margin_mib)} MiB`));
  $("bar").replaceChildren(...segs);
  $("legend").replaceChildren(...legend);
  const used = gpu.used_mib === null ? "used unknown" : `${mib(gpu.used_mib)} MiB used`;
  const util = gpu.utilization_pct === null ? "" : ` · ${gpu.utilization_pct}% busy`;
  const error = gpu.error ? ` · reading failed: ${gpu.error}` : "";
  $("figures").textContent =
    `${used} of ${mib(gpu.total_mib)} · headroom ${mib(gpu.headroom_mib)} MiB${util}${error}`;
  renderDevices(status);
}

// A box with several GPUs: one bar per card (the bar above is the box as a whole), with what
// each consumer holds on it, who is bound to it, and consumers found on it undeclared.
function renderDevices(status) {
  const gpus = status.gpus || [];
  if (gpus.length < 2) {
    $("devices").replaceChildren();
    return;
  }
  const margin = status.gpu.safety_margin_mib;
  $("devices").replaceChildren(...gpus.map((d) => {
    const parts = Object.entries(d.vram_mib).map(([name, v]) => ({
      name, mib: v, kind: (status.consumers[name] || {}).vram_source || "declared",
    }));
    const held = parts.reduce((a, p) => a + p.mib, 0);
    const outside = d.used_mib === null ? 0 : Math.max(0, d.used_mib - held);
    const free = Math.max(0, d.total_mib - held - outside);
    const keep = Math.min(margin, free);
    const scale = Math.max(d.total_mib, held + outside);
    const segs = [];
    const seg = (cls, mibs, label, title, color, extra) => {
      if (mibs <= 0) return;
      if (mibs / scale < 0.06) label = "";
      segs.push(h("div", {
        class: "seg " + cls, title, "data-mib": mibs, ...extra,
        style: { flex: `0 0 ${(100 * mibs / scale).toFixed(3)}%`, "--c": color || "" },
      }, label));
    };
    for (const p of parts) {
      seg(p.kind, p.mib, `${p.name} ${gib(p.mib)}`, `${p.name}: ${mib(p.mib)} MiB ${p.kind}`,
        state.colors[p.name], { "data-consumer": p.name });
    }
    seg("outside", outside, "outside", `held by no consumer: ${mib(outside)} MiB`);
    seg("free", free - keep, `free ${gib(free - keep)}`, `free: ${mib(free - keep)} MiB`);
    seg("margin", keep, "", `safety margin: ${mib(keep)} MiB`);
    const used = d.used_mib === null ? "used unknown" : `${mib(d.used_mib)} MiB used`;
    const undeclared = d.undeclared.length ? ` · undeclared here: ${d.undeclared.join(", ")}` : "";
    const caption = `GPU ${d.index} · ${d.name} · ${used} of ${mib(d.total_mib)} · headroom ` +
      `${mib(d.headroom_mib)} MiB · bound: ${d.consumers.join(", ") || "none"}${undeclared}`;
    return h("div", { class: "device", "data-uuid": d.uuid },
      h("div", { class: "muted", title: d.uuid }, caption),
      h("div", { class: "bar small", role: "img", "aria-label": `GPU ${d.index} memory` },
        ...segs));
  }));
}

function consumerRow(name) {
  const cells = {};
  const cell = (key, cls) => (cells[key] = h("td", { class: cls || "" }));
  const load = h("button", { type: "button", "data-action": "load" }, "Load");
  const unload = h("button", { type: "button", "data-action": "unload" }, "Unload");
  load.addEventListener("click", () => admin(name, "load"));
  unload.addEventListener("click", () => admin(name, "unload"));
  cells.outcome = h("span", { class: "outcome" });
  cells.buttons = [load, unload];
  const tr = h("tr", { "data-consumer": name },
    h("td", { class: "name" }, h("i", { class: "swatch", style: { "--c": state.colors[name] } }),
      name, h("div", { class: "sub" })),
    cell("health"), cell("residency"), cell("vram", "num"), cell("used", "num"),
    cell("times", "num"), cell("queue", "num"), cell("inflight", "num"),
    h("td", { class: "actions" }, load, " ", unload, cells.outcome));
  cells.tr = tr;
  cells.sub = tr.querySelector(".sub");
  return cells;
}

function renderConsumers(status) {
  const tbody = $("consumers").tBodies[0];
  const names = Object.keys(status.consumers);
  for (const name of Object.keys(state.rows)) {
    if (!names.includes(name)) delete state.rows[name];
  }
  const trs = names.map((name) => {
    const c = status.consumers[name];
    const r = state.rows[name] || (state.rows[name] = consumerRow(name));
    r.sub.textContent = `${c.type} · priority ${c.priority}${c.pinned ? " · pinned" : ""}`;
    const health = c.healthy === null ? pill("not probed", "unloaded")
      : c.healthy ? pill("healthy", "ok")
      : c.health_state === "stopped" ? pill("stopped", "unloaded") : pill("failing", "bad");
    r.health.replaceChildren(health);
    r.health.title = c.health_detail;
    const models = c.resident_models.length
      ? h("div", { class: "sub" }, c.resident_models.join(", ")) : null;
    const busy = c.busy_outside ? h("div", { class: "sub" }, "busy outside the broker") : null;
    r.residency.replaceChildren(...[pill(c.residency), models, busy].filter(Boolean));
    r.residency.title = c.residency_detail;
    r.vram.textContent = `${mib(c.vram_mib)} ${c.vram_source}`;
    r.vram.title = `declared ${mib(c.vram_declared_mib)} MiB` +
      (c.vram_measured_mib === null ? "" : `, measured ${mib(c.vram_measured_mib)} MiB`);
    r.used.textContent = ago(c.last_used_s_ago);
    r.times.textContent = `${secs(c.last_load_s)} / ${secs(c.last_unload_s)}`;
    r.queue.textContent = c.queue_depth;
    r.inflight.textContent = c.in_flight;
    const outcome = state.outcomes[name];
    r.outcome.textContent = outcome ? outcome.text : "";
    r.outcome.className = "outcome " + (outcome ? (outcome.ok ? "ok" : "bad") : "");
    for (const b of r.buttons) b.disabled = Boolean(outcome && outcome.pending);
    return r.tr;
  });
  if (trs.some((tr, i) => tbody.children[i] !== tr) || tbody.children.length !== trs.length) {
    tbody.replaceChildren(...trs);
  }
}

async function admin(name, action) {
  state.outcomes[name] = { text: action === "load" ? "loading…" : "unloading…", ok: true,
    pending: true };
  if (state.status) renderConsumers(state.status);
  let outcome;
  try {
    const res = await api(`/v1/admin/consumers/${encodeURIComponent(name)}/${action}`,
      { method: "POST" });
    if (res.ok) {
      const doc = await res.json();
      outcome = { text: `${action}: ${doc.residency}`, ok: true };
    } else {
      outcome = { text: `${action} failed: ${await errorMessage(res)}`, ok: false };
    }
  } catch (e) {
    outcome = { text: `${action} failed: ${e instanceof TokenRefused ? "token refused"
      : "broker unreachable"}`, ok: false };
  }
  state.outcomes[name] = outcome;
  await refresh();
  if (state.status) renderConsumers(state.status);
}

function renderScheduler(status) {
  const s = status.scheduler;
  $("policy").textContent = `policy ${s.policy}${s.accepting ? "" : " · not accepting"}`;
  const running = s.running.map((j) => `${j.label || "job " + j.job} (${secs(j.run_s)})`);
  $("holder").replaceChildren(s.holder
    ? h("span", {}, "Holding the GPU: ", h("b", {}, s.holder),
      running.length ? h("span", { class: "muted" }, " — " + running.join(", ")) : "")
    : h("span", { class: "muted" }, "Nothing holds the GPU."));
  // position: jobs expected to start before it; expected start: from the measured run times
  // and swap costs ("—" while a run time it depends on is not known yet).
  const rows = s.waiting.map((j) => h("tr", {},
    h("td", { class: "num" }, j.position === null ? "—" : j.position + 1),
    h("td", {}, "#" + j.job), h("td", {}, j.label || "—"), h("td", {}, j.consumer),
    h("td", { class: "num" }, j.priority), h("td", { class: "num" }, secs(j.waited_s)),
    h("td", { class: "num" }, j.expected_start_s === null ? "—" : "in " + secs(j.expected_start_s))));
  fill($("queue").tBodies[0], rows, 7, "nobody waits");
  const counters = [
    ["completed", s.completed], ["upstream errors", s.upstream_error], ["failed", s.failed],
    ["cancelled", s.cancelled],
    ["timed out", s.timed_out], ["swaps", s.swaps], ["evictions", s.evictions],
    ["eviction failures", s.eviction_failures], ["load failures", s.load_failures],
    ["handoffs", s.handoffs], ["swap time", secs(s.swap_seconds)],
    ["last wait", s.last_wait_ms === null ? "—" : secs(s.last_wait_ms / 1000)],
    ["last run", s.last_run_ms === null ? "—" : secs(s.last_run_ms / 1000)],
  ];
  $("counters").replaceChildren(...counters.map(([k, v]) =>
    h("div", {}, h("dt", {}, k), h("dd", {}, v))));
}

function renderEvictions(evictions) {
  const rows = evictions.map((e) => h("tr", {},
    h("td", {}, clock(e.time)),
    h("td", {}, e.target || h("span", { class: "muted" }, "unload asked")),
    h("td", { class: "victims" }, e.victims.join(", ")),
    h("td", { class: "num" }, e.need_mib === null ? "—" : mib(e.need_mib)),
    h("td", { class: "num" }, e.headroom_mib === null ? "—" : mib(e.headroom_mib)),
    h("td", { title: e.detail }, pill(e.outcome))));
  fill($("evictions").tBodies[0], rows, 6, "no eviction yet");
}

function renderJobs(jobs) {
  const rows = jobs.map((j) => h("tr", {},
    h("td", {}, clock(j.time)), h("td", {}, j.label || "—"), h("td", {}, j.consumer),
    h("td", { class: "num" }, secs(j.wait_s)), h("td", { class: "num" }, secs(j.run_s)),
    h("td", {}, pill(j.status ? `${j.outcome} ${j.status}` : j.outcome, j.outcome))));
  fill($("jobs").tBodies[0], rows, 6, "no job yet");
}

// -- the event log --------------------------------------------------------------------------------

function describe(e) {
  const job = (x) => `#${x.job} ${x.label || ""}`.trim();
  switch (e.type) {
    case "job.queued": return `${job(e)} → ${e.consumer}, priority ${e.priority}`;
    case "job.granted":
      return `${job(e)} → ${e.consumer} after ${secs(e.wait_s)}${e.swap ? ", swap" : ""}`;
    case "job.finished":
      return `${job(e)} ${e.outcome}${e.status ? " " + e.status : ""}: waited ${secs(e.wait_s)}, ran ${secs(e.run_s)}`;
    case "eviction.planned":
      return `${e.target} needs ${mib(e.need_mib)} MiB, headroom ${mib(e.headroom_mib)}: ` +
        `evicting ${e.victims.join(", ")}`;
    case "eviction.confirmed":
      return `${e.consumer}${e.model ? "/" + e.model : ""} unloaded` +
        `${e.for_consumer ? " for " + e.for_consumer : ""}` +
        `${e.unload_s !== undefined && e.unload_s !== null ? " in " + secs(e.unload_s) : ""}`;
    case "eviction.failed": return `${e.consumer}: ${e.reason}`;
    case "load.started": return `${e.consumer} (${mib(e.vram_mib)} MiB)`;
    case "load.ready":
      return `${e.consumer}${e.lazy ? " (loads on its first job)" : " in " + secs(e.load_s)}`;
    case "load.failed": return `${e.consumer}${e.model ? "/" + e.model : ""}: ${e.reason}`;
    case "residency.changed":
      return `${e.consumer}: ${e.previous} → ${e.residency} (${e.reason})`;
    case "health.changed":
      return `${e.consumer}: ${e.healthy ? "healthy"
        : e.health_state === "stopped" ? "stopped" : "failing"} (${e.detail})`;
    default: return JSON.stringify(e);
  }
}

function logEvent(e) {
  const list = $("log");
  list.prepend(h("li", { "data-type": e.type },
    h("time", {}, clock(e.time)), h("span", { class: "type" }, e.type),
    h("span", {}, describe(e))));
  while (list.children.length > LOG_KEEP) list.lastChild.remove();
}

async function hostSelector() {
  if (!HOST) return;
  const res = await fetch("/v1/status", { cache: "no-store", headers: authHeaders() });
  if (!res.ok) return;
  const doc = await res.json();
  if (!Array.isArray(doc.hosts)) return;
  const select = $("hosts");
  select.replaceChildren(...doc.hosts.map((x) => h("option",
    { value: x.name, selected: x.name === HOST }, x.name + (x.up ? "" : " (down)"))));
  select.hidden = false;
  select.addEventListener("change", () => {
    location.search = "?host=" + encodeURIComponent(select.value);
  });
}

hostSelector();
follow();
