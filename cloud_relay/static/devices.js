// The devices list: the first screenful at once, then every other device in one innerHTML
// batch (10,000 rows; rows off screen cost little thanks to CSS content-visibility), then
// live presence over SSE, each change applied to its row alone, found by device id.
// Performance marks: devices-data (the list arrived), devices-rendered (the first rows
// painted), devices-complete (every row in and painted); the dashboard benchmark reads them.
import { $, ago, api, esc, events, main, num, say, start } from "./app.js";

const list = $("#devices");
const byId = new Map(); // device id -> {device, row}
const FIRST_ROWS = 100; // more than a tall screen shows
const painted = () => new Promise((resolve) => requestAnimationFrame(() => setTimeout(resolve)));
let waiting = []; // presence events that came while the list loaded (null: none loading)

function levelsText(levels) {
  if (!levels) return "–";
  return `${num(levels.sound_leq_dbfs, 0, " dBFS")} · ${num(levels.cpu_percent, 0, "%")}`;
}

function rowHtml(d) {
  const state = d.presence || "unknown";
  const where = [d.site, d.group].filter(Boolean).join(" / ");
  const board = [d.board, d.version].filter(Boolean).join(" · ");
  return `<a class="row" role="row" href="/devices/${esc(d.id)}" data-id="${esc(d.id)}" data-state="${esc(state)}">` +
    `<span role="cell" class="name">${esc(d.name || d.id)}<small>${esc(d.id)}</small></span>` +
    `<span role="cell" class="state">${esc(state)}</span>` +
    `<span role="cell">${esc(where) || "–"}</span>` +
    `<span role="cell">${esc(board) || "–"}</span>` +
    `<span role="cell" class="seen">${ago(d.last_seen)}</span>` +
    `<span role="cell">${levelsText(d.levels)}</span></a>`;
}

function counts() {
  let online = 0;
  for (const { device } of byId.values()) if (device.presence === "online") online += 1;
  $("#counts").textContent = `${online} online of ${byId.size}`;
}

async function load(reply = api("GET", "/api/v1/devices")) {
  waiting = [];
  const { devices } = await reply;
  performance.mark("devices-data");
  list.innerHTML = devices.slice(0, FIRST_ROWS).map(rowHtml).join("");
  await painted();
  performance.mark("devices-rendered");
  list.insertAdjacentHTML("beforeend", devices.slice(FIRST_ROWS).map(rowHtml).join(""));
  byId.clear();
  let n = 0;
  for (const row of list.children) byId.set(devices[n].id, { device: devices[n++], row });
  for (const event of waiting) presence(event);
  waiting = null;
  counts();
  if ($("#filter").value) filter();
  painted().then(() => performance.mark("devices-complete"));
}

function onPresence(event) {
  if (waiting === null) presence(event);
  else waiting.push(event);
}

function presence(event) {
  const now = new Date().toISOString();
  let entry = byId.get(event.device);
  if (entry === undefined) { // a device seen for the first time: its row goes last
    const device = { id: event.device, presence: event.state, board: event.board,
      version: event.version, last_seen: now };
    list.insertAdjacentHTML("beforeend", rowHtml(device));
    byId.set(device.id, { device, row: list.lastElementChild });
  } else {
    const { device, row } = entry;
    Object.assign(device, { presence: event.state, last_seen: now,
      board: event.board ?? device.board, version: event.version ?? device.version });
    row.querySelector(".state").textContent = event.state;
    row.querySelector(".seen").textContent = ago(now);
    row.dataset.state = event.state;
  }
  counts();
}

function filter() {
  const words = $("#filter").value.toLowerCase().split(/\s+/).filter(Boolean);
  for (const { device, row } of byId.values()) {
    const text = [device.id, device.name, device.site, device.group, device.board].join(" ").toLowerCase();
    row.hidden = !words.every((w) => text.includes(w));
  }
}

main(async () => {
  const devices = api("GET", "/api/v1/devices"); // meanwhile: the session, the header
  devices.catch(() => {}); // a refusal is start()'s to handle (to the login page)
  await start();
  events({ presence: onPresence, resync: () => load() });
  await load(devices);
  $("#filter").addEventListener("input", filter);
  if (!byId.size) say("No device yet: pair one on the Pairing page.");
});
