// One device: its state, telemetry charts, commands (with the device's reply), settings,
// revocation, its alerts and calls, and Listen/Talk from the browser when the relay has it.
import { $, ApiError, ago, api, callHtml, esc, events, main, say, start } from "./app.js";
import { alertHtml, liveAlert, wireAlerts } from "./alertview.js";
import { lineChart } from "./chart.js";
import { webCall, webCallsAvailable } from "./talk.js";

const id = decodeURIComponent(location.pathname.split("/")[2] || "");
const base = `/api/v1/devices/${encodeURIComponent(id)}`;
const REFRESH_MS = 30_000;
let device = null;

function summary() {
  const d = device;
  const l = d.levels || {};
  $("#title").textContent = d.name || d.id;
  document.title = `${d.name || d.id} · edge-intercom`;
  $("#summary").innerHTML = `<dl class="facts">` +
    [["Id", d.id], ["Presence", d.presence || "unknown"], ["Last seen", ago(d.last_seen)],
      ["Site", d.site || "–"], ["Group", d.group || "–"], ["Board", d.board || "–"],
      ["Version", d.version || "–"], ["Sound (Leq)", l.sound_leq_dbfs ?? "–"], ["CPU %", l.cpu_percent ?? "–"],
      ["Up since", l.uptime_s === undefined ? "–" : ago(new Date(Date.now() - 1000 * l.uptime_s).toISOString())]]
      .map(([k, v]) => `<div><dt>${k}</dt><dd${k === "Presence" ? ` class="state" data-state="${esc(v)}"` : ""}>${esc(v)}</dd></div>`)
      .join("") + "</dl>";
  for (const key of ["name", "site", "group"]) $(`#edit [name=${key}]`).value = d[key] || "";
}

function charts(telemetry) {
  const at = (r) => Date.parse(r.at);
  const levels = telemetry.filter((r) => r.event === "levels");
  const media = telemetry.filter((r) => (r.event === "call-stats" || r.event === "call-ended") && r.record.media);
  const series = (rows, name, get) => ({ name, points: rows.map((r) => [at(r), get(r.record)]) });
  $("#charts").innerHTML =
    lineChart("Sound level", "dBFS", [
      series(levels, "Leq", (r) => r.sound_leq_dbfs), series(levels, "max", (r) => r.sound_max_dbfs)]) +
    lineChart("Call quality", "% loss · ms", [
      series(media, "loss %", (r) => 100 * (r.media.loss_fraction ?? 0)),
      series(media, "jitter ms", (r) => r.media.jitter_ms ?? null)]) +
    lineChart("CPU and event loop", "% · ms", [
      series(levels, "CPU %", (r) => r.cpu_percent), series(levels, "loop lag ms", (r) => r.loop_lag_ms)]);
}

async function loadDevice() {
  const detail = await api("GET", `${base}?limit=500`);
  const { telemetry, ...rest } = detail;
  device = rest;
  summary();
  charts(telemetry);
}

async function loadAlerts() {
  const { alerts } = await api("GET", `/api/v1/alerts?device=${encodeURIComponent(id)}&limit=20`);
  $("#alerts").innerHTML = alerts.map(alertHtml).join("") || "<li>No alert.</li>";
}

const myCalls = new Set(); // ids of this device's calls: call-answered/-ended events name only the call

async function loadCalls() {
  const { calls } = await api("GET", `/api/v1/calls?device=${encodeURIComponent(id)}&limit=20`);
  for (const c of calls) myCalls.add(c.id);
  $("#calls").innerHTML = calls.map(callHtml).join("") || "<li>No call.</li>";
}

async function command(name, args = {}) {
  const out = $("#reply");
  out.textContent = `${name}: waiting for the device…`;
  try {
    const { reply } = await api("POST", `${base}/commands`, { name, args });
    out.textContent = `${name}: ${reply.ok === false ? "refused" : "ok"}\n${JSON.stringify(reply, null, 2)}`;
    out.dataset.ok = String(reply.ok !== false);
  } catch (err) {
    out.textContent = `${name}: ${err.message}`;
    out.dataset.ok = "false";
  }
}

function wireCommands() {
  for (const button of document.querySelectorAll("[data-cmd]")) {
    button.addEventListener("click", () => command(button.dataset.cmd));
  }
  $("#cmd-call").addEventListener("submit", (event) => {
    event.preventDefault();
    command("call", { peer: new FormData(event.target).get("peer") });
  });
  $("#cmd-volume").addEventListener("submit", (event) => {
    event.preventDefault();
    command("volume", { level: Number(new FormData(event.target).get("level")) });
  });
}

function wireSettings() {
  $("#edit").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const change = {};
    for (const key of ["name", "site", "group"]) change[key] = form.get(key).trim() || null;
    device = { ...device, ...(await api("PATCH", base, change)), levels: device.levels };
    summary();
    say("Saved.");
  });
  $("#revoke").addEventListener("click", async () => {
    if (!confirm(`Revoke ${id}? It is cut off the broker and must be paired again.`)) return;
    const done = await api("POST", `${base}/revoke`);
    say(`Revoked (${done.revoked_certificates} certificate(s)).`);
  });
}

async function wireTalk() {
  if (!(await webCallsAvailable())) return;
  const panel = $("#talk");
  panel.hidden = false;
  let current = null;
  const buttons = { listen: $("#listen"), talk: $("#speak"), end: $("#hangup-web") };
  const idle = (yes) => {
    buttons.listen.disabled = buttons.talk.disabled = !yes;
    buttons.end.disabled = yes;
    if (yes) delete panel.dataset.state;
  };
  const end = async (text, bad = false) => {
    const call = current;
    current = null;
    try {
      await call?.hangup();
      say(text, bad);
    } catch (err) {
      say(`The relay did not take the hangup: ${err.message}`, true);
    }
    idle(true);
  };
  const begin = async (mode) => {
    idle(false);
    panel.dataset.state = "new";
    say(mode === "talk" ? "Calling the board…" : "Connecting to the board's microphone…");
    try {
      const call = (current = await webCall(id, mode, $("#remote")));
      const state = () => {
        if (current !== call) return;
        panel.dataset.state = call.pc.connectionState;
        if (call.pc.connectionState === "connected") {
          say(mode === "talk" ? "Talking with the board." : "Listening to the board.");
        } else if (call.pc.connectionState === "failed") {
          end("The browser call lost the board (no media path).", true);
        }
      };
      call.pc.addEventListener("connectionstatechange", state);
      state();
      if (call.pc.connectionState !== "connected") say("The board answered; connecting…");
    } catch (err) {
      current = null;
      idle(true);
      say(err instanceof ApiError ? `The board did not take the call: ${err.message}` : err.message, true);
    }
  };
  buttons.listen.addEventListener("click", () => begin("listen"));
  buttons.talk.addEventListener("click", () => begin("talk"));
  buttons.end.addEventListener("click", () => end("Browser call ended."));
}

main(async () => {
  await start();
  wireCommands();
  wireSettings();
  wireAlerts($("#alerts"));
  const mine = (handle) => (event) => { if (event.device === id) handle(event); };
  const reloadCalls = (event) => {
    if (event.caller === id || event.callee === id) myCalls.add(event.call);
    if (myCalls.has(event.call)) loadCalls();
  };
  events({
    presence: mine((event) => {
      Object.assign(device, { presence: event.state, last_seen: new Date().toISOString() });
      summary();
    }),
    alert: mine(async (event) => {
      $("#alerts").insertAdjacentHTML("afterbegin", alertHtml(await liveAlert(event)));
    }),
    "call-started": reloadCalls,
    "call-answered": reloadCalls,
    "call-ended": reloadCalls,
    resync: () => Promise.all([loadDevice(), loadAlerts(), loadCalls()]),
  });
  await Promise.all([loadDevice(), loadAlerts(), loadCalls()]);
  // Telemetry comes in no event: the charts are read again now and then.
  setInterval(() => loadDevice().catch((err) => say(err.message, true)), REFRESH_MS);
  await wireTalk();
});
