// Pairing: mint a one-time token (text and QR code, shown once), list and cancel pending ones.
import { $, api, esc, events, main, say, start, when } from "./app.js";

let waiting = new Set(); // devices of the pending tokens

async function pending() {
  const { tokens } = await api("GET", "/api/v1/pairing-tokens");
  waiting = new Set(tokens.map((t) => t.device));
  $("#pending").innerHTML = tokens.map((t) =>
    `<tr><td>${esc(t.device)}</td><td>${esc(t.name || "–")}</td><td>${esc(t.site || "–")}</td>` +
    `<td>${esc(when(t.created))}</td><td>${esc(when(t.expires))}</td>` +
    `<td><button class="danger" data-cancel="${esc(t.id)}">Cancel</button></td></tr>`).join("") ||
    `<tr><td colspan="6">None pending.</td></tr>`;
}

/** The relay's QR code (SVG text) as a node: parsed as SVG, never as HTML with scripts. */
function svgNode(text) {
  const doc = new DOMParser().parseFromString(text, "image/svg+xml");
  return document.importNode(doc.documentElement, true);
}

main(async () => {
  await start();
  $("#mint").addEventListener("submit", async (event) => {
    event.preventDefault();
    const form = new FormData(event.target);
    const body = { expires_in: Number(form.get("expires_in")) };
    for (const key of ["name", "site"]) if (form.get(key).trim()) body[key] = form.get(key).trim();
    const minted = await api("POST", "/api/v1/pairing-tokens", body);
    $("#qr").replaceChildren(svgNode(minted.qr_svg));
    $("#token").value = minted.token;
    $("#minted").hidden = false;
    say(`Token for device ${minted.device}, valid until ${when(minted.expires)}.`);
    await pending();
  });
  $("#pending").addEventListener("click", async (event) => {
    const id = event.target.dataset?.cancel;
    if (!id) return;
    await api("DELETE", `/api/v1/pairing-tokens/${id}`);
    await pending();
    say("Token cancelled.");
  });
  // A board that pairs comes online: its token is used, so the list changes.
  events({ presence: (event) => waiting.has(event.device) && pending(), resync: pending });
  await pending();
});
