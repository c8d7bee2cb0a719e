// The Weir hub dashboard: reads the admin API and renders the overview, the devices, the
// deployments with their rollout counts, and one device's status, errors and shipped data
// (its recent aggregates and a chart of one series with its anomalies marked).
"use strict";

const view = document.getElementById("view");
const login = document.getElementById("login");
const REFRESH_MS = 5000;

function token() { return sessionStorage.getItem("weir-hub-token"); }

async function api(path) {
  const response = await fetch("/api/v1" + path, {
    headers: { Authorization: "Bearer " + token() },
  });
  if (response.status === 401) {
    sessionStorage.removeItem("weir-hub-token");
    throw new Error("unauthorized");
  }
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
  return body;
}

// Read-only SQL over the fleet's shipped data; the answer's rows are objects.
async function sql(query) {
  const response = await fetch("/api/v1/query", {
    method: "POST",
    headers: { Authorization: "Bearer " + token(), "Content-Type": "application/json" },
    body: JSON.stringify({ sql: query, format: "json", max_rows: 500 }),
  });
  if (response.status === 401) {
    sessionStorage.removeItem("weir-hub-token");
    throw new Error("unauthorized");
  }
  const body = await response.json();
  if (!response.ok) {
    throw new Error(typeof body.error === "string" ? body.error
      : (body.error && body.error.message) || response.statusText);
  }
  return body;
}

// SQL names and texts built from what the API returned, quoted so they stay names and texts.
function ident(name) { return '"' + String(name).replace(/"/g, '""') + '"'; }
function text(value) { return "'" + String(value).replace(/'/g, "''") + "'"; }

// Everything shown comes from the API; escape it before it goes into markup.
function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({
    "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;",
  })[c]);
}

function when(ms) { return ms ? new Date(ms).toISOString().replace(".000", "") : "—"; }

function tags(map) {
  return Object.entries(map || {})
    .map(([k, v]) => `<span class="tag">${esc(k)}=${esc(v)}</span>`).join("");
}

function rolloutCells(r) {
  return `<td>${r.targeted}</td><td>${r.applied}</td>` +
    `<td class="applied">${r.succeeded}</td><td class="failed">${r.failed}</td>`;
}

async function overview() {
  const status = await api("/status");
  const rows = status.deployments.map((d) =>
    `<tr><td><a href="#/deployments">${esc(d.name)}</a></td><td>${d.version}</td>` +
    `<td>${d.priority}</td><td class="${esc(d.status)}">${esc(d.status)}</td>` +
    rolloutCells(d.rollout) + "</tr>").join("");
  return `<div class="cards">
      <div class="card"><div class="n" id="count-devices">${status.devices}</div>devices</div>
      <div class="card online"><div class="n">${status.online}</div>online</div>
      <div class="card offline"><div class="n">${status.offline}</div>offline</div>
      <div class="card never"><div class="n">${status.never_seen}</div>never seen</div>
    </div>
    <h2>Deployments</h2>
    <table><tr><th>Name</th><th>Version</th><th>Priority</th><th>Status</th><th>Targeted</th>
      <th>Applied</th><th>Succeeded</th><th>Failed</th></tr>${rows}</table>`;
}

async function devices() {
  const list = await api("/devices");
  const rows = list.map((d) =>
    `<tr><td><a href="#/devices/${encodeURIComponent(d.id)}">${esc(d.id)}</a></td>` +
    `<td>${tags(d.tags)}</td><td class="${d.connection}">${d.connection}</td>` +
    `<td>${d.desired ? esc(d.desired.name) + " v" + d.desired.version : "—"}</td>` +
    `<td class="${d.report ? esc(d.report.status) : ""}">${d.report ? esc(d.report.status) : "—"}</td>` +
    `<td>${d.in_sync ? "yes" : "no"}</td><td>${when(d.last_seen_ms)}</td></tr>`).join("");
  return `<h2>Devices (${list.length})</h2>
    <table id="devices"><tr><th>Id</th><th>Tags</th><th>Connection</th><th>Desired</th>
      <th>Reported</th><th>In sync</th><th>Last seen</th></tr>${rows}</table>`;
}

async function deployments() {
  const list = await api("/deployments");
  const rows = list.map((d) =>
    `<tr><td>${esc(d.name)}</td><td>${d.version}</td><td>${d.priority}</td>` +
    `<td><code>${esc(d.target_condition)}</code></td>` +
    `<td class="${esc(d.status)}">${esc(d.status)}</td>` + rolloutCells(d.rollout) +
    `<td>${d.pipelines.map((p) => esc(p.name)).join(", ")}</td></tr>`).join("");
  return `<h2>Deployments (${list.length})</h2>
    <table id="deployments"><tr><th>Name</th><th>Version</th><th>Priority</th><th>Target</th>
      <th>Status</th><th>Targeted</th><th>Applied</th><th>Succeeded</th><th>Failed</th>
      <th>Pipelines</th></tr>${rows}</table>`;
}

// Arrow writes timestamps without a zone; they are UTC.
function millis(value) {
  if (typeof value === "number") return value;
  const parsed = Date.parse(/[zZ]|[+-]\d\d:?\d\d$/.test(value) ? value : value + "Z");
  return Number.isNaN(parsed) ? null : parsed;
}

// One series as an SVG line, its anomalies as red dots.
function chart(points, series) {
  const shown = points.filter((p) => p.t !== null && typeof p.v === "number");
  if (shown.length < 2) return `<p class="muted">Too few points of ${esc(series)} to draw.</p>`;
  const [w, h, pad] = [900, 220, 30];
  const ts = shown.map((p) => p.t), vs = shown.map((p) => p.v);
  const [t0, t1] = [Math.min(...ts), Math.max(...ts)];
  const [v0, v1] = [Math.min(...vs), Math.max(...vs)];
  const x = (t) => pad + (t1 === t0 ? 0 : (t - t0) / (t1 - t0)) * (w - 2 * pad);
  const y = (v) => h - pad - (v1 === v0 ? 0.5 : (v - v0) / (v1 - v0)) * (h - 2 * pad);
  const line = shown.map((p) => `${x(p.t).toFixed(1)},${y(p.v).toFixed(1)}`).join(" ");
  const dots = shown.filter((p) => p.a === true).map((p) =>
    `<circle class="anomaly" cx="${x(p.t).toFixed(1)}" cy="${y(p.v).toFixed(1)}" r="5">` +
    `<title>anomaly at ${esc(when(p.t))}: ${esc(p.v)}</title></circle>`).join("");
  return `<svg id="chart" viewBox="0 0 ${w} ${h}" width="100%" role="img"
      aria-label="${esc(series)} over time">
    <text x="${pad}" y="16" class="axis">${esc(series)}: ${esc(v0.toFixed(2))} to ${esc(v1.toFixed(2))},
      ${esc(when(t0))} to ${esc(when(t1))}</text>
    <polyline class="series" points="${line}"/>${dots}</svg>`;
}

// What a device shipped: pick a table, see its last rows, chart one numeric column.
async function shipped(id, params) {
  const tables = await sql("SELECT table_schema, table_name FROM information_schema.tables " +
    "WHERE table_schema NOT IN ('information_schema', 'public') ORDER BY 1, 2");
  const names = tables.rows.map((r) => r.table_schema + "." + r.table_name);
  if (!names.length) return `<h2>Shipped data</h2><p class="muted">Nothing shipped yet.</p>`;
  const chosen = names.includes(params.get("table")) ? params.get("table") : names[0];
  const [schema, table] = chosen.split(".");
  const from = `${ident(schema)}.${ident(table)} WHERE hub_device = ${text(id)}`;
  const recent = await sql(`SELECT * FROM ${from} ORDER BY hub_arrived_at DESC LIMIT 20`);
  const has = (name) => recent.columns.some((c) => c.name === name);
  const numeric = recent.columns.map((c) => c.name).filter((name) => !name.startsWith("hub_") &&
    /^(U?Int|Float|Decimal)/.test(recent.columns.find((c) => c.name === name).type));
  const series = numeric.includes(params.get("column")) ? params.get("column") : numeric[0];
  const time = ["window_start", "ts", "time"].find(has) || "hub_arrived_at";
  const anomaly = ["is_anomaly", "anomaly"].find(has);
  const link = (t, c) => `#/devices/${encodeURIComponent(id)}?table=${encodeURIComponent(t)}` +
    (c ? `&column=${encodeURIComponent(c)}` : "");
  let drawn = `<p class="muted">No numeric column to chart.</p>`;
  if (series) {
    const points = await sql(`SELECT ${ident(time)} AS t, ${ident(series)} AS v` +
      (anomaly ? `, ${ident(anomaly)} AS a` : "") + ` FROM ${from} ORDER BY t DESC LIMIT 500`);
    drawn = chart(points.rows.reverse().map((r) => ({ t: millis(r.t), v: r.v, a: r.a })), series);
  }
  const head = recent.columns.map((c) => `<th>${esc(c.name)}</th>`).join("");
  const rows = recent.rows.map((r) => "<tr>" + recent.columns.map((c) =>
    `<td>${esc(typeof r[c.name] === "number" ? +r[c.name].toFixed(4) : r[c.name])}</td>`)
    .join("") + "</tr>").join("");
  return `<h2 id="shipped">Shipped data</h2>
    <p>${names.map((n) => n === chosen ? `<b>${esc(n)}</b>`
      : `<a href="${link(n)}">${esc(n)}</a>`).join(" · ")}</p>
    <p>Chart: ${numeric.map((c) => c === series ? `<b>${esc(c)}</b>`
      : `<a href="${link(chosen, c)}">${esc(c)}</a>`).join(" · ")}
      <span class="muted">by ${esc(time)}${anomaly ? ", anomalies from " + esc(anomaly) : ""}</span></p>
    ${drawn}
    <h3>Last ${recent.rows.length} rows</h3>
    <table id="recent"><tr>${head}</tr>${rows}</table>`;
}

async function device(id, params) {
  const d = await api("/devices/" + encodeURIComponent(id));
  const report = d.report;
  return `<h2>Device ${esc(d.id)}</h2>
    <table id="device">
      <tr><th>Tags</th><td>${tags(d.tags)}</td></tr>
      <tr><th>Enabled</th><td>${d.enabled ? "yes" : "no"}</td></tr>
      <tr><th>Connection</th><td class="${d.connection}">${d.connection}
        <span class="muted">(last seen ${when(d.last_seen_ms)})</span></td></tr>
      <tr><th>Desired</th><td>${d.desired ? esc(d.desired.name) + " v" + d.desired.version +
        " (revision " + d.desired.revision + ")" : "no deployment"}</td></tr>
      <tr><th>Reported</th><td class="${report ? esc(report.status) : ""}">${report
        ? esc(report.status) + " (revision " + esc(report.revision ?? "none") + ", " +
          when(d.reported_ms) + ")" : "nothing yet"}</td></tr>
      <tr><th>Error</th><td class="error" id="device-error">${esc(report && report.error)}</td></tr>
      <tr><th>In sync</th><td>${d.in_sync ? "yes" : "no"}</td></tr>
    </table>
    <h2>Health</h2><pre>${esc(JSON.stringify(report ? report.health ?? {} : {}, null, 2))}</pre>
    ${await shipped(d.id, params)}`;
}

async function render() {
  if (!token()) {
    login.hidden = false;
    view.innerHTML = "";
    return;
  }
  login.hidden = true;
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const route = path || "/";
  const params = new URLSearchParams(query || "");
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === "#" + route);
  }
  try {
    if (route.startsWith("/devices/")) {
      view.innerHTML = await device(decodeURIComponent(route.slice("/devices/".length)), params);
    } else if (route === "/devices") {
      view.innerHTML = await devices();
    } else if (route === "/deployments") {
      view.innerHTML = await deployments();
    } else {
      view.innerHTML = await overview();
    }
    document.getElementById("refreshed").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    if (!token()) return render();
    view.innerHTML = `<p class="error">${esc(error.message)}</p>`;
  }
}

login.addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem("weir-hub-token", document.getElementById("token").value.trim());
  render();
});
window.addEventListener("hashchange", render);
// A token can also come in the fragment (#/devices?token=…), for kiosks and scripted
// screenshots. The fragment never reaches the server; the token is moved to session
// storage and the address replaced in place, so it stays out of the history too.
const fromUrl = new URLSearchParams(location.hash.split("?")[1] || "").get("token");
if (fromUrl) {
  sessionStorage.setItem("weir-hub-token", fromUrl);
  history.replaceState(null, "", location.pathname + location.hash.split("?")[0]);
}
render();
setInterval(render, REFRESH_MS);
