"""``GET /``: the operator's live status page, and with the admin token its admin panel.

One self-contained HTML document (no script, style or font from anywhere else: nodes
run air-gapped) whose script polls ``/status`` every 2 seconds and shows the same facts
as ``loomnet status``: the executor, each model (offered or not, prices, load, speed,
its backends and their breakers), each backend (health, on/off, load, provider spend),
earnings, and a chart of requests and tokens served over the last minutes (kept in the
page, from successive polls).

With the admin token typed in (kept in the tab's ``sessionStorage`` only, sent as a
bearer token), each model gets a "serve from" choice (its chain reordered so the chosen
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
</style>
</head>
<body>
<h1>loomnet executor <span id="peer" class="muted"></span></h1>
<div id="summary">loading /status ...</div>
<div id="admin">
  Admin token: <input id="token" type="password" size="32" autocomplete="off">
  <button id="use-token">Use token</button> <button id="drain">Drain</button>
  <span id="message"></span>
</div>
<h2>Requests and tokens served</h2>
<svg id="chart" width="600" height="120" role="img" aria-label="requests and tokens over time"></svg>
<div class="muted">blue: requests served (total); orange: output tokens (total); last 60 polls</div>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>aliases</th><th>categories</th><th>state</th><th>price in/out</th>
<th>running/queued</th><th>served</th><th>tokens in/out</th><th>tok/s</th><th>TTFT</th><th>backends (chain)</th>
<th>admin</th></tr></thead><tbody></tbody></table>
<h2>Backends</h2>
<table id="backends"><thead><tr><th>backend</th><th>kind</th><th>health</th><th>on</th><th>in flight</th>
<th>last error</th><th>spend</th><th>admin</th></tr></thead><tbody></tbody></table>
<h2>Earnings</h2>
<table id="earnings"><thead><tr><th>period</th><th>receipts</th><th>earned</th><th>paid providers</th>
<th>margin</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const history = [];
let last = null;

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
    tr.appendChild(td);
  }
  return tr;
}
function token() { return sessionStorage.getItem("loomnet-admin-token") || ""; }
function say(text, bad) {
  const m = document.getElementById("message");
  m.textContent = text; m.className = bad ? "bad" : "ok";
}
async function admin(method, path, body) {
  if (!token()) { say("type the admin token first", true); return null; }
  const answer = await fetch(path, {method: method, headers: {"authorization": "Bearer " + token(),
    "content-type": "application/json"}, body: body === undefined ? undefined : JSON.stringify(body)});
  let data = {};
  try { data = await answer.json(); } catch (e) { data = {error: answer.statusText}; }
  if (!answer.ok) { say(method + " " + path + ": " + answer.status + " " + (data.error || ""), true); return null; }
  say(method + " " + path + ": done", false);
  shape = null;  // show the change at once
  poll();
  return data;
}
function button(label, onclick, id) {
  const b = el("button", label); b.onclick = onclick; if (id) b.id = id; return b;
}
function modelAdmin(model) {
  const box = document.createElement("span");
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
  box.appendChild(button("Set price", () => admin("PATCH", "/admin/models/" + encodeURIComponent(model.name),
    {"price-in": Number(pin.value), "price-out": Number(pout.value)}), "set-price-" + model.name));
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
  const tokens = s.models.reduce((sum, m) => sum + m.output_tokens, 0);
  history.push({served: s.served, tokens: tokens});
  if (history.length > 60) history.shift();
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
    const flight = el("span", b.in_flight); flight.id = "flight-" + b.name;
    backends.appendChild(row([b.name, b.kind, el("span", b.healthy ? "healthy" : "DOWN", b.healthy ? "ok" : "bad"),
      b.enabled ? "on" : "OFF", flight, b.last_error, spend, toggle]));
  }
  const earnings = document.querySelector("#earnings tbody"); earnings.replaceChildren();
  for (const e of s.earnings) earnings.appendChild(row([e.period, e.receipts, e.earned, e.paid, e.margin]));
}
function chart() {
  const svg = document.getElementById("chart"); svg.replaceChildren();
  const w = 600, h = 120;
  for (const [key, color] of [["served", "#1f77b4"], ["tokens", "#ff7f0e"]]) {
    const top = Math.max(1, ...history.map(p => p[key]));
    const points = history.map((p, i) => (i * w / 59).toFixed(1) + "," + (h - 5 - p[key] * (h - 10) / top).toFixed(1));
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    line.setAttribute("points", points.join(" ")); line.setAttribute("fill", "none");
    line.setAttribute("stroke", color); line.setAttribute("stroke-width", "2"); line.setAttribute("class", "series-" + key);
    svg.appendChild(line);
  }
}
async function poll() {
  try {
    const answer = await fetch("/status");
    last = await answer.json();
    render(last);
  } catch (e) {
    document.getElementById("summary").textContent = "cannot read /status: " + e;
  }
}
document.getElementById("use-token").onclick = () => {
  sessionStorage.setItem("loomnet-admin-token", document.getElementById("token").value);
  document.getElementById("token").value = "";
  say("token set for this tab", false);
};
document.getElementById("drain").onclick = () => {
  if (confirm("Drain: refuse new requests and let those in flight finish?")) admin("POST", "/admin/drain");
};
poll();
setInterval(poll, 2000);
</script>
</body>
</html>
"""
