// The login page: name and password to POST /api/v1/login, then back where we came from.
import { $, ApiError, api, say } from "./app.js";

/** Only a page of this site: never an open redirect (URL parsing, as the browser will do it). */
function next() {
  const target = new URL(new URLSearchParams(location.search).get("next") || "/devices", location.origin);
  return target.origin === location.origin ? target.pathname + target.search : "/devices";
}

$("#login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData(event.target);
  say("Logging in…");
  try {
    await api("POST", "/api/v1/login", { name: form.get("name"), password: form.get("password") });
    location.assign(next());
  } catch (err) {
    const wait = err instanceof ApiError && err.status === 429;
    say(wait ? "Too many failed logins: try again in a minute." : "Wrong name or password.", true);
  }
});
