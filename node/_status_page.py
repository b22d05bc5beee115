"""``GET /``: the operator's live status page, and with the admin token its admin panel.

One self-contained HTML document (no script, style or font from anywhere else: nodes
run air-gapped) whose script polls ``/status`` every 2 seconds and shows the same facts
as ``loomnet status``: the executor, each model (offered or not, prices, load, speed,
its backends and their breakers), each backend (health, on/off, load, provider spend),
earnings, and a chart of the rates of the last 60 polls: requests served per minute and
output tokens per second, each from the difference between two successive polls over
the executor's uptime between them (answers arriving out of order are dropped; a
counter or uptime that went down is a restart, counted from zero, never plotted
negative).

The admin controls are hidden until the operator has typed the admin token (kept in the
tab's ``sessionStorage`` only, sent as a bearer token) and a first admin call with it
(``GET /admin/backends``) succeeded; a 401 or 429 (``_admin_guard``) says so and hides
them again. Then each model gets a "serve from" choice (its chain reordered so the chosen
backend comes first: ``PATCH /admin/models/<name>``) and price fields, each backend an
enable/disable button, and the executor a drain button; the page says what each call
answered. Everything shown is text set with ``textContent``: nothing from ``/status`` is
ever parsed as HTML.
"""

from __future__ import annotations

__all__ = ["STATUS_PAGE"]

STATUS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>loomnet executor</title>
<link rel="icon" href="data:,">
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.5em; }
table { border-collapse: collapse; } td, th { padding: 3px 10px; border-bottom: 1px solid #ddd; text-align: left; }
.bad { color: #b00; font-weight: bold; } .ok { color: #070; } .muted { color: #777; }
#admin { background: #f6f6f6; padding: 0.5em 1em; margin-top: 1em; }
#message { margin-left: 1em; } svg { border: 1px solid #ddd; background: #fff; }
body:not(.admin-on) .admin-only { display: none !important; }
</style>
</head>
<body>
<h1>loomnet executor <span id="peer" class="muted"></span></h1>
<div id="summary">loading /status ...</div>
<div id="admin">
  Admin token: <input id="token" type="password" size="32" autocomplete="off">
  <button id="use-token">Use token</button> <button id="drain" class="admin-only">Drain</button>
  <span id="message"></span>
</div>
<h2>Requests and tokens served</h2>
<svg id="chart" width="600" height="120" role="img" aria-label="requests per minute and tokens per second"></svg>
<div class="muted">blue: requests served per minute; orange: output tokens per second; each line scaled to its
own peak; last 60 polls. <span id="rates-now"></span></div>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>aliases</th><th>categories</th><th>state</th><th>price in/out</th>
<th>running/queued</th><th>served</th><th>tokens in/out</th><th>tok/s</th><th>TTFT</th><th>backends (chain)</th>
<th class="admin-only">admin</th></tr></thead><tbody></tbody></table>
<h2>Backends</h2>
<table id="backends"><thead><tr><th>backend</th><th>kind</th><th>health</th><th>on</th><th>in flight</th>
<th>last error</th><th>spend</th><th class="admin-only">admin</th></tr></thead><tbody></tbody></table>
<h2>Earnings</h2>
<table id="earnings"><thead><tr><th>period</th><th>receipts</th><th>earned</th><th>paid providers</th>
<th>margin</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const rates = [];  // {requests: per minute, tokens: per second}, one per poll after the first
let last = null, previous = null, asked = 0, answered = 0, adminOn = false;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function row(cells) {
  const tr = document.createElement("tr");
  for (const cell of cells) {
    const td = document.createElement("td");
    if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell === null ? "-" : String(cell);
    if (cell instanceof Element && cell.classList.contains("admin-only")) td.className = "admin-only";
    tr.appendChild(td);
  }
  return tr;
}
function token() { return sessionStorage.getItem("loomnet-admin-token") || ""; }
function say(text, bad) {
  const m = document.getElementById("message");
  m.textContent = text; m.className = bad ? "bad" : "ok";
}
function setAdmin(on) { adminOn = on; document.body.classList.toggle("admin-on", on); }
async function call(method, path, body) {
  const answer = await fetch(path, {method: method, headers: {"authorization": "Bearer " + token(),
    "content-type": "application/json"}, body: body === undefined ? undefined : JSON.stringify(body)});
  let data = {};
  try { data = await answer.json(); } catch (e) { data = {error: answer.statusText}; }
  if (answer.status === 401 || answer.status === 429) {  // a refused token: the controls hide again
    sessionStorage.removeItem("loomnet-admin-token"); setAdmin(false);
    const wait = answer.headers.get("retry-after");
    say(answer.status === 401 ? "the admin token was refused (401): admin controls hidden; type the right one"
      : "too many refused admin tokens from this address (429): try again in " + wait + " s", true);
    return null;
  }
  if (!answer.ok) { say(method + " " + path + ": " + answer.status + " " + (data.error || ""), true); return null; }
  return data;
}
async function admin(method, path, body) {
  if (!adminOn || !token()) { say("type the admin token first", true); return null; }
  const data = await call(method, path, body);
  if (data === null) return null;
  say(method + " " + path + ": done", false);
  shape = null;  // show the change at once
  poll();
  return data;
}
async function verify() {
  // the first admin call with a new token: only its success shows the controls
  if (!token()) { setAdmin(false); return; }
  say("checking the admin token ...", false);
  if (await call("GET", "/admin/backends") === null) return;
  setAdmin(true); say("admin token accepted: admin controls shown", false);
}
function button(label, onclick, id) {
  const b = el("button", label); b.onclick = onclick; if (id) b.id = id; return b;
}
function modelAdmin(model) {
  const box = el("span", null, "admin-only");
  const pick = el("select"); pick.id = "serve-" + model.name;
  for (const b of model.backends) { const o = el("option", b.name); o.value = b.name; pick.appendChild(o); }
  box.appendChild(el("span", "serve from ")); box.appendChild(pick);
  box.appendChild(button("Switch", () => {
    const first = model.backends.find(b => b.name === pick.value);
    const chain = [first, ...model.backends.filter(b => b.name !== pick.value)]
      .map(b => ({backend: b.name, model: b.backend_model}));
    admin("PATCH", "/admin/models/" + encodeURIComponent(model.name), {backends: chain, strategy: "priority"});
  }, "switch-" + model.name));
  const pin = el("input"); pin.size = 6; pin.id = "price-in-" + model.name; pin.value = model.price_in;
  const pout = el("input"); pout.size = 6; pout.id = "price-out-" + model.name; pout.value = model.price_out;
  box.appendChild(el("span", " price ")); box.appendChild(pin); box.appendChild(el("span", "/")); box.appendChild(pout);
  box.appendChild(button("Set price", () => {
    // a cleared field is not a price of 0: refuse it rather than give the model away
    const prices = [pin.value.trim(), pout.value.trim()];
    if (prices.some(p => p === "" || !Number.isFinite(Number(p)) || Number(p) < 0)) {
      say("type both prices (credits per million tokens, 0 or more) before Set price", true); return;
    }
    admin("PATCH", "/admin/models/" + encodeURIComponent(model.name),
      {"price-in": Number(prices[0]), "price-out": Number(prices[1])});
  }, "set-price-" + model.name));
  return box;
}
let shape = null;
function setText(id, text) { const node = document.getElementById(id); if (node) node.textContent = text; }
function render(s) {
  document.getElementById("peer").textContent = s.peer_id;
  const up = Math.round(s.uptime);
  document.getElementById("summary").textContent = s.state + ", up " + up + " s, " + s.peers_connected +
    " peer(s); " + s.slots.running + " running / capacity " + s.slots.capacity + ", " + s.slots.queued +
    " queued; " + s.served + " served, " + s.refused + " refused; listening on " + s.listen.join(", ");
  const sample = {uptime: s.uptime, served: s.served, tokens: s.models.reduce((sum, m) => sum + m.output_tokens, 0)};
  const rate = previous === null ? null : rateOf(previous, sample);
  previous = sample;
  if (rate !== null) { rates.push(rate); if (rates.length > 60) rates.shift(); }
  chart();
  // the tables (and the admin controls in them) are rebuilt only when what they show
  // changes, so a choice being made or a price being typed is not reset by a poll
  const now = JSON.stringify([s.models.map(m => [m.name, m.offered, m.price_in, m.price_out,
    m.backends.map(b => [b.name, b.breaker])]), s.backends.map(b => [b.name, b.enabled, b.healthy,
    b.spend && [b.spend.spent, b.spend.amount, b.spend.exhausted]]), s.earnings.map(e => [e.receipts, e.earned])]);
  if (now === shape) {
    for (const m of s.models) {
      setText("load-" + m.name, m.running + " / " + m.queued); setText("served-" + m.name, m.served);
      setText("tokens-" + m.name, m.input_tokens + " / " + m.output_tokens);
      setText("tps-" + m.name, m.tokens_per_second);
      setText("ttft-" + m.name, m.ttft === null ? "-" : Math.round(m.ttft * 1000) + " ms");
    }
    for (const b of s.backends) setText("flight-" + b.name, b.in_flight);
    return;
  }
  shape = now;
  const models = document.querySelector("#models tbody"); models.replaceChildren();
  for (const m of s.models) {
    const chain = m.backends.map(b => b.name + " (" + b.breaker + ")").join(" > ");
    const cell = (id, text) => { const span = el("span", text); span.id = id; return span; };
    models.appendChild(row([m.name, m.aliases.join(", "), m.categories.join(", "),
      el("span", m.offered ? "offered" : "WITHDRAWN", m.offered ? "ok" : "bad"),
      m.price_in + " / " + m.price_out, cell("load-" + m.name, m.running + " / " + m.queued),
      cell("served-" + m.name, m.served), cell("tokens-" + m.name, m.input_tokens + " / " + m.output_tokens),
      cell("tps-" + m.name, m.tokens_per_second),
      cell("ttft-" + m.name, m.ttft === null ? "-" : Math.round(m.ttft * 1000) + " ms"), chain, modelAdmin(m)]));
  }
  const backends = document.querySelector("#backends tbody"); backends.replaceChildren();
  for (const b of s.backends) {
    let spend = null;
    if (b.spend) spend = b.spend.spent + (b.spend.amount === null ? "" : " of " + b.spend.amount) +
      (b.spend.exhausted ? " (SPENT)" : "");
    const toggle = button(b.enabled ? "Disable" : "Enable", () => admin("POST", "/admin/backends/" +
      encodeURIComponent(b.name) + (b.enabled ? "/disable" : "/enable")), "toggle-" + b.name);
    toggle.className = "admin-only";
    const flight = el("span", b.in_flight); flight.id = "flight-" + b.name;
    backends.appendChild(row([b.name, b.kind, el("span", b.healthy ? "healthy" : "DOWN", b.healthy ? "ok" : "bad"),
      b.enabled ? "on" : "OFF", flight, b.last_error, spend, toggle]));
  }
  const earnings = document.querySelector("#earnings tbody"); earnings.replaceChildren();
  for (const e of s.earnings) earnings.appendChild(row([e.period, e.receipts, e.earned, e.paid, e.margin]));
}
function rateOf(prev, cur) {
  // requests per minute and tokens per second between two polls, over the executor's
  // uptime between them; an uptime that went down is a restart (its counters started
  // from zero), and a counter that went down was reset: it counts from zero, never negative
  if (cur.uptime < prev.uptime) prev = {uptime: 0, served: 0, tokens: 0};
  const seconds = cur.uptime - prev.uptime;
  if (!(seconds > 0)) return null;
  const grown = key => { const d = cur[key] - prev[key]; return d >= 0 ? d : Math.max(0, cur[key]); };
  return {requests: grown("served") * 60 / seconds, tokens: grown("tokens") / seconds};
}
function chart() {
  const svg = document.getElementById("chart"); svg.replaceChildren();
  const w = 600, h = 120;
  for (const [key, color] of [["requests", "#1f77b4"], ["tokens", "#ff7f0e"]]) {
    const top = Math.max(1e-9, ...rates.map(p => p[key]));
    const points = rates.map((p, i) => (i * w / 59).toFixed(1) + "," + (h - 5 - p[key] * (h - 10) / top).toFixed(1));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" ")); line.setAttribute("fill", "none");
    line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2"); line.setAttribute("class", "series-" + key);
    line.setAttribute("data-values", rates.map(p => p[key].toFixed(3)).join(" "));
    svg.appendChild(line);
  }
  const now = rates[rates.length - 1];
  if (now) setText("rates-now", "now: " + now.requests.toFixed(1) + " requests/min, " + now.tokens.toFixed(1) + " tokens/s");
}
async function poll() {
  const mine = ++asked;
  try {
    const answer = await fetch("/status");
    const s = await answer.json();
    if (mine < answered) return;  // an older answer after a newer one: it would read as a reset
    answered = mine; last = s;
    render(last);
  } catch (e) {
    document.getElementById("summary").textContent = "cannot read /status: " + e;
  }
}
document.getElementById("use-token").onclick = () => {
  sessionStorage.setItem("loomnet-admin-token", document.getElementById("token").value);
  document.getElementById("token").value = "";
  verify();
};
document.getElementById("drain").onclick = () => {
  if (confirm("Drain: refuse new requests and let those in flight finish?")) admin("POST", "/admin/drain");
};
poll();
verify();
setInterval(poll, 2000);
</script>
</body>
</html>
"""
