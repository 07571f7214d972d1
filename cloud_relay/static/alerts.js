// Alerts: a timeline with filters (device, type, severity, time), pages of 50, live
// arrivals, acknowledge and play the clip; a chart of alerts per day per type.
import { $, api, events, main, say, start } from "./app.js";
import { alertHtml, liveAlert, wireAlerts } from "./alertview.js";
import { dayBars } from "./chart.js";

const PAGE = 50;
let next = null;
let filters = {};

function query() {
  const q = new URLSearchParams({ limit: String(PAGE) });
  for (const [k, v] of Object.entries(filters)) if (v) q.set(k, v);
  if (next) q.set("before", next);
  return q;
}

async function page(first) {
  if (first) next = null;
  const reply = await api("GET", `/api/v1/alerts?${query()}`);
  const html = reply.alerts.map(alertHtml).join("");
  if (first) $("#alerts").innerHTML = html || "<li>No alert matches.</li>";
  else $("#alerts").insertAdjacentHTML("beforeend", html);
  next = reply.next;
  $("#more").hidden = next === null;
}

async function chart() {
  const q = filters.device ? `?days=14&device=${encodeURIComponent(filters.device)}` : "?days=14";
  const { days, counts } = await api("GET", `/api/v1/alert-counts${q}`);
  $("#per-day").innerHTML = dayBars("Alerts per day (UTC), last 14 days", days, counts);
}

function readFilters() {
  const form = new FormData($("#filters"));
  const time = (v) => (v ? new Date(v).toISOString() : "");
  filters = { device: form.get("device").trim(), kind: form.get("kind").trim(), severity: form.get("severity"),
    since: time(form.get("since")), until: time(form.get("until")) };
}

/** Whether a live alert passes the filters (a time window ending in the past: no). */
function matches(a) {
  return (!filters.device || a.device === filters.device) && (!filters.kind || a.kind === filters.kind) &&
    (!filters.severity || a.severity === filters.severity) && !filters.until;
}

main(async () => {
  await start();
  wireAlerts($("#alerts"));
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    readFilters();
    Promise.all([page(true), chart()]).catch((err) => say(err.message, true));
  });
  $("#more").addEventListener("click", () => page(false));
  events({
    alert: async (event) => {
      const a = await liveAlert(event);
      if (!matches(a)) return;
      const list = $("#alerts");
      if (!list.querySelector("[data-alert]")) list.innerHTML = "";
      list.insertAdjacentHTML("afterbegin", alertHtml(a));
      chart();
    },
    resync: () => Promise.all([page(true), chart()]),
  });
  readFilters();
  await Promise.all([page(true), chart()]);
});
