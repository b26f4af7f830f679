// The status page of llama-smart-proxy (GET /ui).
//
// What it keeps to:
// - one source: the page's whole state is the answer of /status, as GET /events sends it first
//   (a "snapshot" event), changed by the events that follow (model, model_removed, gpus, host,
//   reload); nothing else is read, and nothing is guessed between events except clocks (elapsed
//   load time, the countdown to a restart), which tick from the server's own timestamps;
// - live across restarts: when the stream ends (a reload of the listener, a restart of the
//   service) it reconnects with Last-Event-ID; the server answers with the events missed, or with a
//   new snapshot when it cannot (another run of the service), which replaces the state whole;
// - EventSource cannot send an Authorization header, so the streams are read with fetch();
// - the key typed in is kept for this tab only (sessionStorage) and sent as a Bearer token.
"use strict";

const KEY_STORAGE = "llama-smart-proxy.key";
const RECONNECT_MS = 1000;
const LOG_LINES_KEPT = 2000; // lines kept in the log pane; older ones leave the page
const TICK_MS = 250; // how often clocks (elapsed, countdown) are redrawn

const view = {
  models: new Map(),
  gpus: [],
  host: null,
  lastReload: null,
  reloads: null,
  config: "",
  listen: "",
  clockOffset: 0, // server time minus this browser's, in seconds
  lastEventId: null,
};

const $ = (selector, root = document) => root.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name === "style") Object.assign(node.style, value); // CSSOM: the CSP forbids style attributes
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function serverNow() {
  return Date.now() / 1000 + view.clockOffset;
}

function formatBytes(bytes) {
  if (bytes === null || bytes === undefined) return "?";
  const mib = bytes / 2 ** 20;
  if (Math.abs(mib) >= 1024) return `${(mib / 1024).toFixed(1)} GiB`;
  if (Math.abs(mib) >= 10) return `${mib.toFixed(0)} MiB`;
  return `${mib.toFixed(1)} MiB`;
}

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

function formatWhen(unix) {
  const ago = serverNow() - unix;
  const at = new Date((unix - view.clockOffset) * 1000).toLocaleString();
  if (ago < 90) return `${at} (${Math.max(0, Math.round(ago))} s ago)`;
  if (ago < 5400) return `${at} (${Math.round(ago / 60)} min ago)`;
  return at;
}

// distinct colours, dark enough for white text, none of them the red of "failed" or of the
// measured-total mark
const PALETTE = ["#2f6fbf", "#2e8b72", "#7a4fb5", "#b5731f", "#3f8fa8", "#a8468f", "#5d7f2f", "#4a5bb0", "#8a6a3a", "#2f7f9f"];

function modelColor(name) {
  // by the model's place among the names: models side by side never share a colour
  const names = [...view.models.keys()].sort();
  const index = names.indexOf(name);
  return PALETTE[(index < 0 ? names.length : index) % PALETTE.length];
}

// ---- the API key -----------------------------------------------------------------------------

function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

let keyWaiters = [];
function waitForKey() {
  return new Promise((resolve) => keyWaiters.push(resolve));
}

function setupKeyForm() {
  const input = $("#key");
  input.value = apiKey();
  $("#key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (input.value) sessionStorage.setItem(KEY_STORAGE, input.value);
    else sessionStorage.removeItem(KEY_STORAGE);
    const waiting = keyWaiters;
    keyWaiters = [];
    waiting.forEach((resolve) => resolve());
    restartStreams();
  });
}

// ---- server-sent events over fetch() ---------------------------------------------------------

class HttpProblem extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function problemOf(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = `${response.status}: ${body.error.message}`;
  } catch (_) {
    // not JSON: the status line says enough
  }
  return new HttpProblem(response.status, message);
}

// Reads one SSE response until it ends; calls onEvent(type, data, id) per event (comments skipped,
// as the spec says). Resolves when the server ends the stream, rejects on an error.
async function readEvents(url, { headers = {}, signal, onOpen, onEvent }) {
  const response = await fetch(url, {
    headers: { Accept: "text/event-stream", ...headers },
    signal,
    cache: "no-store",
  });
  if (!response.ok) throw await problemOf(response);
  if (onOpen) onOpen();
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let event = { type: "message", data: [], id: null };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (event.data.length) onEvent(event.type, JSON.parse(event.data.join("\n")), event.id);
        event = { type: "message", data: [], id: null };
        continue;
      }
      if (line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let text = colon < 0 ? "" : line.slice(colon + 1);
      if (text.startsWith(" ")) text = text.slice(1);
      if (field === "data") event.data.push(text);
      else if (field === "event") event.type = text;
      else if (field === "id") event.id = text;
    }
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let streamsAbort = new AbortController();

function restartStreams() {
  streamsAbort.abort();
  streamsAbort = new AbortController();
  if (logModel) followLog(logModel);
}

let lastLive = null; // when the stream last delivered, for the words shown while it is down

function setConnection(kind, words) {
  const node = $("#connection");
  node.dataset.connection = kind;
  document.body.dataset.connection = kind; // the sheet greys out a view that is not live
  if (kind !== "live" && lastLive) words += ` — showing the state as of ${lastLive.toLocaleTimeString()}`;
  node.textContent = words;
}

async function followEvents() {
  for (;;) {
    const signal = streamsAbort.signal;
    try {
      const headers = authHeaders();
      if (view.lastEventId) headers["Last-Event-ID"] = view.lastEventId;
      await readEvents("/events", {
        headers,
        signal,
        onOpen: () => {
          lastLive = new Date();
          setConnection("live", "live");
        },
        onEvent: applyEvent,
      });
      setConnection("reconnecting", "the service closed the stream; reconnecting…");
    } catch (error) {
      if (signal.aborted) continue; // a new key: start again at once
      if (error instanceof HttpProblem && (error.status === 401 || error.status === 403)) {
        setConnection("key", `${error.message} — enter a key above`);
        await waitForKey();
        continue;
      }
      setConnection("reconnecting", `not connected (${error.message}); retrying…`);
    }
    await sleep(RECONNECT_MS);
  }
}

// ---- the state, from events ------------------------------------------------------------------

function applyEvent(type, data, id) {
  lastLive = new Date();
  if (id) view.lastEventId = id;
  if (typeof data.time === "number") view.clockOffset = data.time - Date.now() / 1000;
  switch (type) {
    case "snapshot":
      view.models = new Map(data.models.map((model) => [model.name, model]));
      view.gpus = data.gpus || [];
      view.host = data.host || null;
      view.lastReload = data.last_reload || null;
      view.reloads = data.reloads || null;
      view.config = data.config || "";
      view.listen = (data.proxy && data.proxy.listen) || "";
      break;
    case "model": {
      const { time: _time, ...model } = data;
      view.models.set(model.name, model);
      break;
    }
    case "model_removed":
      view.models.delete(data.name);
      break;
    case "gpus":
      view.gpus = data.gpus;
      break;
    case "host":
      view.host = data.host;
      break;
    case "reload":
      view.lastReload = data.last_reload;
      view.reloads = data.reloads;
      break;
    default:
      return; // an event this page does not know: newer servers may send more
  }
  scheduleRender();
}

let renderPending = false;
function scheduleRender() {
  if (renderPending) return;
  renderPending = true;
  requestAnimationFrame(() => {
    renderPending = false;
    render();
  });
}

function render() {
  renderHeader();
  renderMemory();
  renderModels();
  renderReload();
  renderLogChoices();
  tick();
}

function overallHealth() {
  // /health's rule (supervisor/proxy/routes.py overall_health): failed and unplaced models
  // cannot be served, every other state can
  const models = [...view.models.values()];
  const servable = models.filter((m) => m.state !== "failed" && m.state !== "unplaced");
  if (!servable.length) return "unavailable";
  return servable.length === models.length ? "ok" : "degraded";
}

function renderHeader() {
  const overall = overallHealth();
  const badge = $("#overall");
  badge.dataset.overall = overall;
  badge.textContent = overall;
  $("#where").textContent = [view.listen, view.config].filter(Boolean).join(" · ");
}

// ---- memory bars ---------------------------------------------------------------------------

function segment(kind, bytes, total, { label, title, color, model, measured }) {
  const width = total > 0 ? Math.max(0, (100 * bytes) / total) : 0;
  const node = el("div", {
    class: `seg ${kind}`,
    style: color ? { width: `${width}%`, background: color } : { width: `${width}%` },
    title,
    "data-model": model,
    "data-kind": kind,
    "data-bytes": bytes,
  });
  if (measured !== null && measured !== undefined && bytes > 0) {
    node.append(el("div", { class: "measured", style: { width: `${Math.min(100, (100 * measured) / bytes)}%` } }));
  }
  if (label && width > 7) node.append(el("span", { class: "label", text: label }));
  return node;
}

// One bar: reserve (and what others used when the plan was made), each model's planned share
// (measured use of its process as a dark band inside), free; a red mark where the measured total is.
function memoryBar({ total, reserve, shares, measuredTotal, othersMeasured }) {
  const bar = el("div", { class: "bar" });
  bar.append(
    segment("reserve", reserve, total, {
      label: "reserve",
      title: `reserve and other use when the plan was made: ${formatBytes(reserve)}`,
    }),
  );
  let planned = 0;
  for (const share of shares) {
    planned += share.bytes;
    const measured = share.measured;
    const words = [`${share.model}: planned ${formatBytes(share.bytes)}`];
    if (measured !== null && measured !== undefined) words.push(`measured ${formatBytes(measured)}`);
    if (share.pid) words.push(`pid ${share.pid}`);
    bar.append(
      segment("model", share.bytes, total, {
        label: share.model,
        title: words.join(", "),
        color: modelColor(share.model),
        model: share.model,
        measured,
      }),
    );
  }
  if (othersMeasured) {
    bar.append(
      segment("others", othersMeasured, total, {
        label: "others",
        title: `other processes (measured): ${formatBytes(othersMeasured)}`,
      }),
    );
  }
  const free = Math.max(0, total - reserve - planned - (othersMeasured || 0));
  bar.append(segment("free", free, total, { label: `free ${formatBytes(free)}`, title: `not planned for: ${formatBytes(free)}` }));
  if (measuredTotal !== null && measuredTotal !== undefined && total > 0) {
    bar.append(
      el("div", {
        class: "used-marker",
        style: { left: `calc(${Math.min(100, (100 * measuredTotal) / total)}% - 1px)` },
        title: `measured in use: ${formatBytes(measuredTotal)}`,
      }),
    );
  }
  return { bar, planned, free };
}

function pidOf(name) {
  const model = view.models.get(name);
  return model ? model.pid : null;
}

function legend(parts) {
  return el("div", { class: "legend" }, ...parts.map((part) => el("span", {}, ...part)));
}

function renderGpu(gpu) {
  const total = gpu.total_bytes;
  const usable = gpu.usable_bytes ?? total;
  const reserve = Math.max(0, total - usable);
  const measuredByModel = gpu.used_by_model || {};
  const shares = Object.entries(gpu.reserved_by_model || {}).map(([model, bytes]) => ({
    model,
    bytes,
    measured: measuredByModel[model] ?? null,
    pid: pidOf(model),
  }));
  const { bar, planned, free } = memoryBar({
    total,
    reserve,
    shares,
    measuredTotal: gpu.used_bytes,
    othersMeasured: 0,
  });
  const age = gpu.measured_at ? Math.max(0, serverNow() - gpu.measured_at) : null;
  const title = el(
    "div",
    { class: "device-title" },
    el("strong", { text: `GPU ${gpu.index}` }),
    el("span", { text: gpu.name }),
    el("span", { class: "muted", text: `${formatBytes(total)} total` }),
    el("span", { text: `planned ${formatBytes(planned)}` }),
    el("span", {
      text:
        gpu.used_bytes !== null && gpu.used_bytes !== undefined
          ? `measured ${formatBytes(gpu.used_bytes)} in use (NVML${age !== null ? `, ${age.toFixed(0)} s ago` : ""})`
          : "not measured",
    }),
    el("span", { text: `free ${formatBytes(free)}` }),
  );
  const parts = shares.map((s) => [
    el("span", { class: "swatch", style: { background: modelColor(s.model) } }),
    `${s.model} ${formatBytes(s.bytes)}` + (s.measured !== null ? ` (measured ${formatBytes(s.measured)})` : ""),
  ]);
  parts.push([el("span", { class: "swatch reserve" }), `reserve & others ${formatBytes(reserve)}`]);
  if (gpu.used_by_other_processes) parts.push([`other processes ${formatBytes(gpu.used_by_other_processes)}`]);
  if (gpu.used_bytes !== null && gpu.used_bytes !== undefined) {
    parts.push([el("span", { class: "swatch measured" }), "measured per process"]);
    parts.push([el("span", { class: "swatch marker" }), "measured total"]);
  }
  return el("div", { class: "device", "data-device": `gpu-${gpu.index}` }, title, bar, legend(parts));
}

function renderHost(host) {
  const total = host.total_bytes;
  // what was not usable when the plan was made: the reserve and what other programs held
  const reserve = Math.max(0, total - host.usable_bytes);
  const used = host.used_by_model || {};
  const shares = Object.entries(host.planned_by_model || {}).map(([model, bytes]) => ({
    model,
    bytes,
    measured: used[model] ?? null,
    pid: pidOf(model),
  }));
  const measuredTotal = host.available_bytes !== null && host.available_bytes !== undefined ? total - host.available_bytes : null;
  const { bar, planned } = memoryBar({ total, reserve, shares, measuredTotal, othersMeasured: 0 });
  const age = host.measured_at ? Math.max(0, serverNow() - host.measured_at) : null;
  const title = el(
    "div",
    { class: "device-title" },
    el("strong", { text: "Host RAM" }),
    el("span", { class: "muted", text: `${formatBytes(total)} total` }),
    el("span", { text: `planned ${formatBytes(planned)}` }),
    el("span", {
      text:
        host.available_bytes !== null && host.available_bytes !== undefined
          ? `available ${formatBytes(host.available_bytes)} (measured${age !== null ? `, ${age.toFixed(0)} s ago` : ""})`
          : "not measured",
    }),
  );
  const parts = shares.map((s) => [
    el("span", { class: "swatch", style: { background: modelColor(s.model) } }),
    `${s.model} ${formatBytes(s.bytes)}` + (s.measured !== null ? ` (resident ${formatBytes(s.measured)})` : ""),
  ]);
  parts.push([el("span", { class: "swatch reserve" }), `reserve & others ${formatBytes(reserve)}`]);
  if (measuredTotal !== null) {
    parts.push([el("span", { class: "swatch measured" }), "resident set per process"]);
    parts.push([el("span", { class: "swatch marker" }), "in use on the host"]);
  }
  return el("div", { class: "device", "data-device": "host" }, title, bar, legend(parts));
}

function renderMemory() {
  const box = $("#memory");
  const devices = view.gpus.map(renderGpu);
  if (view.host) devices.push(renderHost(view.host));
  if (!devices.length) devices.push(el("p", { class: "muted", text: "no memory figures yet" }));
  box.replaceChildren(...devices);
}

// ---- models ----------------------------------------------------------------------------------

const STATE_WORDS = {
  ready: "ready",
  starting: "loading",
  stopped: "stopped",
  stopping: "stopping",
  backoff: "restarting",
  failed: "failed",
  unplaced: "not placed",
};

function placementWords(model) {
  if (model.placement === "cpu" || model.placement === "unplaced") return model.placement;
  const gpus = (model.gpus || []).join(", ");
  return `${model.placement} · GPU ${gpus}`;
}

function stateCell(model) {
  const cell = el("td", { "data-field": "state" });
  cell.append(el("span", { class: "badge", "data-state": model.state, text: STATE_WORDS[model.state] || model.state }));
  if (model.state === "starting") {
    const detail = el("span", { class: "detail" });
    if (model.starting_since) detail.append(el("span", { "data-since": model.starting_since }));
    if (model.load_phase) detail.append(` · ${model.load_phase}`);
    if (model.load_progress !== null && model.load_progress !== undefined) {
      detail.append(` ${Math.round(model.load_progress * 100)}%`);
    }
    cell.append(detail);
    if (model.load_progress !== null && model.load_progress !== undefined) {
      cell.append(el("span", { class: "progress" }, el("span", { style: { width: `${model.load_progress * 100}%` } })));
    }
  } else if (model.state === "backoff" && model.retry_at) {
    cell.append(el("span", { class: "detail" }, "next try ", el("span", { "data-until": model.retry_at })));
  }
  return cell;
}

function errorCell(model) {
  const cell = el("td", { class: "error", "data-field": "last_error" });
  if (!model.last_error) return cell;
  const [first, ...rest] = model.last_error.split("\n");
  if (!rest.length) {
    cell.textContent = first;
    return cell;
  }
  cell.append(el("details", {}, el("summary", { text: first }), el("pre", { text: rest.join("\n") })));
  return cell;
}

function actionButtons(model) {
  const cell = el("td", { class: "actions" });
  for (const action of ["load", "unload", "reset"]) {
    const button = el("button", { type: "button", "data-action": action, "data-model": model.name, text: action });
    button.addEventListener("click", () => runAction(action, model.name));
    cell.append(button);
  }
  return cell;
}

function rowSignature(model) {
  // everything a row shows but its clocks: redraw a row only when this changes
  const { in_flight, queued, ...rest } = model;
  return JSON.stringify([rest, in_flight, queued]);
}

function renderModels() {
  const body = $("#models tbody");
  const seen = new Set();
  const names = [...view.models.keys()].sort();
  let previous = null;
  for (const name of names) {
    const model = view.models.get(name);
    seen.add(name);
    let row = body.querySelector(`tr[data-model="${CSS.escape(name)}"]`);
    const signature = rowSignature(model);
    if (!row) {
      row = el("tr", { "data-model": name });
    }
    if (row.dataset.signature !== signature) {
      row.dataset.signature = signature;
      row.dataset.state = model.state;
      const aliases = model.aliases && model.aliases.length ? el("span", { class: "aliases", text: model.aliases.join(", ") }) : null;
      const keep = row.querySelector("td.actions") || actionButtons(model);
      row.replaceChildren(
        el("td", { "data-field": "name" }, el("strong", { text: name }), aliases),
        stateCell(model),
        el("td", { "data-field": "mode", text: model.mode }),
        el("td", { "data-field": "placement", text: placementWords(model) }),
        el("td", { class: "num", "data-field": "pid", text: model.pid ?? "–" }),
        el("td", { class: "num", "data-field": "port", text: model.port ?? "–" }),
        el("td", { class: "num", "data-field": "restarts", text: model.restarts }),
        el("td", { class: "num", "data-field": "requests", text: `${model.in_flight} / ${model.queued}` }),
        el("td", { class: "num", "data-field": "load_seconds", text: model.load_seconds !== null ? formatSeconds(model.load_seconds) : "–" }),
        errorCell(model),
        keep,
      );
    }
    // keep the rows in name order without touching rows already in place
    const wanted = previous ? previous.nextSibling : body.firstChild;
    if (wanted !== row) body.insertBefore(row, wanted);
    previous = row;
  }
  for (const row of [...body.querySelectorAll("tr[data-model]")]) {
    if (!seen.has(row.dataset.model)) row.remove();
  }
}

function tick() {
  const now = serverNow();
  for (const node of document.querySelectorAll("[data-since]")) {
    node.textContent = formatSeconds(Math.max(0, now - Number(node.dataset.since)));
  }
  for (const node of document.querySelectorAll("[data-until]")) {
    const left = Number(node.dataset.until) - now;
    node.textContent = left > 0 ? `in ${formatSeconds(left)}` : "now";
  }
}

// ---- admin actions ---------------------------------------------------------------------------

function showResult(kind, words) {
  const node = $("#action-result");
  node.dataset.result = kind;
  node.textContent = words;
}

async function runAction(action, model) {
  const what = model ? `${action} ${model}` : action;
  const url = model ? `/admin/models/${encodeURIComponent(model)}/${action}` : "/admin/reload";
  showResult("pending", `${what}: asked…`);
  try {
    const response = await fetch(url, { method: "POST", headers: authHeaders(), cache: "no-store" });
    if (!response.ok) {
      const problem = await problemOf(response);
      showResult("refused", `${what}: refused — ${problem.message}`);
      return;
    }
    const body = await response.json();
    const after = body.model && body.model.state ? ` (now ${STATE_WORDS[body.model.state] || body.model.state})` : "";
    showResult("ok", `${what}: done${after}${body.summary ? ` — ${body.summary}` : ""}`);
  } catch (error) {
    showResult("refused", `${what}: failed — ${error.message}`);
  }
}

// ---- last reload -----------------------------------------------------------------------------

function renderReload() {
  const box = $("#reload");
  const record = view.lastReload;
  const counts = view.reloads ? `${view.reloads.ok || 0} applied, ${view.reloads.failed || 0} refused since start` : "";
  if (!record) {
    box.replaceChildren(el("p", { class: "muted", text: `no reload since the service started${counts ? ` (${counts})` : ""}` }));
    return;
  }
  const verdict = record.ok ? "applied" : "refused";
  const parts = [
    el(
      "p",
      {},
      el("span", { class: "badge", "data-state": record.ok ? "ready" : "failed", "data-reload": verdict, text: verdict }),
      " ",
      el("span", { text: formatWhen(record.time) }),
      counts ? el("span", { class: "muted", text: ` · ${counts}` }) : null,
    ),
    el("p", { class: "summary", text: record.summary }),
  ];
  if (record.deferred && record.deferred.length) {
    parts.push(el("p", { class: "muted", text: `waiting for a later start: ${record.deferred.join("; ")}` }));
  }
  box.replaceChildren(...parts);
}

// ---- logs ------------------------------------------------------------------------------------

let logAbort = null;
let logModel = null;

function renderLogChoices() {
  const select = $("#log-model");
  const names = [...view.models.keys()].sort();
  const current = [...select.options].map((option) => option.value);
  if (JSON.stringify(current) !== JSON.stringify(names)) {
    const chosen = logModel || select.value;
    select.replaceChildren(...names.map((name) => el("option", { value: name, text: name })));
    // keep the model being read; at first, the first one whose server runs
    const running = names.find((name) => view.models.get(name).pid !== null);
    select.value = names.includes(chosen) ? chosen : running || names[0] || "";
  }
  if (select.value && select.value !== logModel) followLog(select.value);
}

function appendLogLines(pane, first, lines, expected) {
  const follow = $("#log-follow").checked;
  if (expected !== null && first > expected) {
    pane.append(el("span", { class: "gap", text: `… ${first - expected} lines no longer kept …\n` }));
  }
  if (lines.length) pane.append(document.createTextNode(lines.join("\n") + "\n"));
  while (pane.childNodes.length > LOG_LINES_KEPT) pane.firstChild.remove();
  pane.dataset.lines = String(Number(pane.dataset.lines || 0) + lines.length);
  if (follow) pane.scrollTop = pane.scrollHeight;
}

async function followLog(model) {
  if (logAbort) logAbort.abort();
  const abort = new AbortController();
  logAbort = abort;
  logModel = model;
  const pane = $("#log-lines");
  pane.replaceChildren();
  pane.dataset.model = model;
  pane.dataset.lines = "0";
  let lastId = null;
  let expected = null;
  while (!abort.signal.aborted) {
    try {
      const headers = authHeaders();
      if (lastId) headers["Last-Event-ID"] = lastId;
      await readEvents(`/logs/${encodeURIComponent(model)}?tail=500`, {
        headers,
        signal: abort.signal,
        onEvent: (type, data, id) => {
          if (type !== "lines") return;
          if (id) lastId = id;
          appendLogLines(pane, data.first, data.lines, expected);
          expected = data.first + data.lines.length;
        },
      });
    } catch (error) {
      if (abort.signal.aborted) return;
      if (error instanceof HttpProblem && error.status === 404) return; // not placed: no output
    }
    await sleep(RECONNECT_MS);
  }
}

// ---- start -----------------------------------------------------------------------------------

function start() {
  setupKeyForm();
  $("#reload-button").addEventListener("click", () => runAction("reload", null));
  $("#log-model").addEventListener("change", (event) => followLog(event.target.value));
  setInterval(tick, TICK_MS);
  followEvents();
}

start();
