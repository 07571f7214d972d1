// What every page shares: the session (and its CSRF token), JSON API calls, live
// events, the header, and small formatting helpers. No framework: plain DOM.

let csrf = null;

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

export const $ = (selector, root = document) => root.querySelector(selector);

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

/** Text made safe to put inside HTML markup (lists are built as one string, see devices.js). */
export function esc(value) {
  return value === null || value === undefined ? "" : String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

export function toLogin() {
  location.assign(`/login?next=${encodeURIComponent(location.pathname + location.search)}`);
}

/** A JSON API request; changes carry the session's CSRF token. Throws ApiError. */
export async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && csrf) headers["X-CSRF-Token"] = csrf;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 401 && path !== "/api/v1/login") toLogin();
  const json = (response.headers.get("Content-Type") || "").startsWith("application/json");
  const data = json ? await response.json() : null;
  if (!response.ok) throw new ApiError(response.status, data?.message || response.statusText, data);
  return data;
}

export function setCsrf(token) {
  csrf = token;
}

const NAV = [["/devices", "Devices"], ["/calls", "Calls"], ["/alerts", "Alerts"], ["/pairing", "Pairing"]];

/** The page's start: who is logged in (to the login page if nobody), and the header. */
export async function start() {
  const session = await api("GET", "/api/v1/session");
  setCsrf(session.csrf);
  const header = $("#top");
  const here = location.pathname.startsWith("/devices") ? "/devices" : location.pathname;
  header.innerHTML = `<a class="brand" href="/devices">edge-intercom</a><nav>${NAV.map(
    ([href, label]) => `<a href="${href}"${href === here ? ' aria-current="page"' : ""}>${label}</a>`,
  ).join("")}</nav><span class="who"><span id="live" class="live" title="live updates">●</span> ${esc(session.user)}
  <button id="logout" class="link">Log out</button></span>`;
  $("#logout").addEventListener("click", async () => {
    await api("POST", "/api/v1/logout");
    location.assign("/login");
  });
  return session;
}

/**
 * Live events (Server-Sent Events): handlers by kind (presence, alert, call-started,
 * call-answered, call-ended, command-reply); "resync" (also after a reconnection, when
 * events may have been missed) means: read the state again.
 */
export function events(handlers) {
  const source = new EventSource("/api/v1/events");
  const dot = $("#live");
  let opened = false;
  source.addEventListener("open", () => {
    dot?.classList.add("on");
    if (opened) handlers.resync?.();
    opened = true;
  });
  source.addEventListener("error", () => dot?.classList.remove("on"));
  for (const [kind, handle] of Object.entries(handlers)) {
    source.addEventListener(kind, (event) => handle(JSON.parse(event.data || "{}")));
  }
  return source;
}

const RELATIVE = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });

/** "3 min ago" for an ISO time. */
export function ago(iso) {
  if (!iso) return "never";
  const s = (Date.parse(iso) - Date.now()) / 1000;
  for (const [unit, size] of [["day", 86400], ["hour", 3600], ["minute", 60]]) {
    if (Math.abs(s) >= size) return RELATIVE.format(Math.round(s / size), unit);
  }
  return RELATIVE.format(Math.round(s), "second");
}

export function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

export function duration(seconds) {
  const s = Math.round(seconds);
  const m = Math.floor(s / 60);
  return m >= 60 ? `${Math.floor(m / 60)} h ${m % 60} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

export function num(value, digits = 1, unit = "") {
  return typeof value === "number" ? `${value.toFixed(digits)}${unit}` : "–";
}

/** A short message in the page's status line (role=status, read out by screen readers). */
export function say(text, bad = false) {
  const line = $("#status");
  line.textContent = text;
  line.classList.toggle("bad", bad);
}

/** Quality figures of a call as text: MOS, loss, jitter, RTT. */
export function quality(q) {
  if (!q) return "–";
  return `MOS ${num(q.mos, 2)} · loss ${num(100 * q.loss, 1, "%")} · jitter ${num(q.jitter_ms, 0, " ms")}` +
    (q.rtt_ms === null ? "" : ` · RTT ${num(q.rtt_ms, 0, " ms")}`);
}

/** Runs a page's main function; a failure shows in the status line. */
export function main(fn) {
  fn().catch((err) => {
    if (!(err instanceof ApiError && err.status === 401)) say(`Error: ${err.message}`, true);
  });
}

/** A call as one list item: who, mode, when, how long, how it ended, quality. */
export function callHtml(c) {
  const end = c.live ? `<span class="badge">live</span>` : `ended: ${esc(c.end_reason || "–")}`;
  return `<li class="call" data-call="${esc(c.id)}"><b>${esc(c.caller)} → ${esc(c.callee)}</b> ` +
    `${esc(c.mode)} · ${esc(when(c.started))} · <span class="dur">${duration(c.duration_s)}</span> · ${end}` +
    ` · ${esc(quality(c.quality))}</li>`;
}
