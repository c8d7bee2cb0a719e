// The Weir hub dashboard: reads the admin API and renders the overview, the devices, the
// deployments with their rollout counts, and one device's status and errors.
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

async function device(id) {
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
    <h2>Health</h2><pre>${esc(JSON.stringify(report ? report.health ?? {} : {}, null, 2))}</pre>`;
}

async function render() {
  if (!token()) {
    login.hidden = false;
    view.innerHTML = "";
    return;
  }
  login.hidden = true;
  const route = location.hash.replace(/^#/, "") || "/";
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("active", link.getAttribute("href") === "#" + route);
  }
  try {
    if (route.startsWith("/devices/")) {
      view.innerHTML = await device(decodeURIComponent(route.slice("/devices/".length)));
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
