// One alert in a timeline (alerts page, device page): acknowledge, play its clip.
import { api, esc, num, when } from "./app.js";

export function alertHtml(a) {
  const clip = a.clip
    ? `<button class="play" data-clip="${esc(a.id)}">Play clip (${num(a.clip.seconds, 1, " s")})</button>`
    : "";
  const ack = a.acked
    ? `<span class="acked">acknowledged by ${esc(a.acked_by)}</span>`
    : `<button class="ack" data-ack="${esc(a.id)}">Acknowledge</button>`;
  return `<li class="alert ${esc(a.severity)}" data-alert="${esc(a.id)}">` +
    `<span class="sev">${esc(a.severity)}</span> <b>${esc(a.kind)}</b> on ` +
    `<a href="/devices/${esc(a.device)}">${esc(a.device)}</a> <time>${esc(when(a.received))}</time>` +
    ` <small>level ${num(a.level, 0, " dB")}, confidence ${num(100 * a.confidence, 0, "%")}</small>` +
    `<span class="actions">${clip}${ack}</span></li>`;
}

/** Buttons of every alert in ``list``, now and later (one listener). */
export function wireAlerts(list) {
  list.addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button) return;
    if (button.dataset.ack) {
      button.disabled = true;
      const acked = await api("POST", `/api/v1/alerts/${button.dataset.ack}/ack`);
      button.closest("li").outerHTML = alertHtml(acked);
    } else if (button.dataset.clip) {
      // The clip endpoint decrypts on request; the session cookie goes along (same origin).
      const audio = document.createElement("audio");
      audio.controls = true;
      audio.autoplay = true;
      audio.src = `/api/v1/alerts/${button.dataset.clip}/clip`;
      button.replaceWith(audio);
    }
  });
}

/** The alert of a live ``alert`` event as the API shows it (the event leaves out the clip);
 * the event's own fields if the store has not written it yet. */
export async function liveAlert(event) {
  try {
    return await api("GET", `/api/v1/alerts/${event.alert.id}`);
  } catch {
    return { ...event.alert, device: event.device, received: new Date().toISOString(), clip: null, acked: null };
  }
}
