"""API tokens and the alerts API with the real relay process (``edge-intercom-relay serve``, its
mosquitto, its HTTPS certificate trusted through its CA): tokens minted, listed and
revoked with the CLI, alerts published on a device's topic and read, played and
acknowledged over HTTPS."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

from mqtt_env import eventually
from test_api import TONE_HZ, client, make_alert, ogg_peak_hz, tone_clip
from test_edge_clip_e2e import relay_cli

from agent.edge.clip import seal
from agent.signaling import topics
from agent.signaling.topics import Kind
from cloud_relay.clips import ClipKey
from tools.lab.fleet import RELAY_CMD, fleet

DEVICE = "door-1"


async def test_tokens_from_the_cli_guard_the_alerts_api_of_the_running_relay(
    tmp_path: Path,
) -> None:
    async with fleet(tmp_path, devices=(DEVICE,), client_id="api-e2e") as f:
        ops = json.loads(await relay_cli(f, "token", "new", "--name", "ops", "--expires", "30d",
                                         "--json"))  # fmt: skip
        assert ops["token"].startswith("eirt_") and ops["state"] == "active"
        shown = await relay_cli(f, "token", "new", "--name", "kiosk")
        [kiosk] = [line for line in shown.splitlines() if line.startswith("eirt_")]
        listed = [
            json.loads(x) for x in (await relay_cli(f, "token", "list", "--json")).splitlines()
        ]
        assert [(t["name"], t["state"], t["last_used"]) for t in listed] == [
            ("ops", "active", None),
            ("kiosk", "active", None),
        ]
        assert listed[0]["expires"] is not None and listed[1]["expires"] is None
        assert all("token" not in t for t in listed)  # shown once, never again

        key = await asyncio.to_thread(ClipKey.load, f.pki_dir)
        plain = make_alert(0)
        clipped = make_alert(1)
        clipped = dataclasses.replace(
            clipped, clip=seal(tone_clip(), key.public, clipped.id).to_text()
        )
        assert f.client is not None
        for alert in (plain, clipped):
            await f.client.publish(topics.device_topic(DEVICE, Kind.ALERT), alert.to_json())

        url = f"https://127.0.0.1:{f.pairing_port}"
        async with client(url, f.pki_dir / "ca.pem", ops["token"]) as api:

            async def both_stored() -> bool:
                return len((await api.ok("/api/v1/alerts"))["alerts"]) == 2

            await eventually(both_stored, "both alerts listed by the API", wait=20.0)
            page = await api.ok("/api/v1/alerts", device=DEVICE, limit="1")
            assert [a["id"] for a in page["alerts"]] == [clipped.id] and page["next"]
            status, ogg, headers = await api.call("GET", f"/api/v1/alerts/{clipped.id}/clip")
            assert (status, headers["Content-Type"]) == (200, "audio/ogg"), ogg
            assert abs(ogg_peak_hz(ogg) - TONE_HZ) < 0.02 * TONE_HZ
            status, acked, _ = await api.call("POST", f"/api/v1/alerts/{plain.id}/ack")
            assert (status, acked["acked_by"]) == (200, "ops")
            assert (await api.call("GET", "/api/v1/alerts", kiosk))[0] == 200

            await relay_cli(f, "token", "revoke", ops["id"])
            status, body, headers = await api.call("GET", "/api/v1/alerts")
            assert (status, body["error"]) == (401, "unauthorized")
            assert headers["WWW-Authenticate"].startswith("Bearer")
            assert (await api.call("GET", "/api/v1/alerts", kiosk))[0] == 200

        argv = [*RELAY_CMD, "token", "revoke", "nosuchtoken", "--config",
                str(f.root / "relay.toml"), "--data-dir", str(f.data_dir)]  # fmt: skip
        code, _, err = await f._run(argv, "token revoke")
        assert code == 1 and b"no API token nosuchtoken" in err
        states = {
            t["name"]: (t["state"], t["last_used"] is not None)
            for t in map(json.loads, (await relay_cli(f, "token", "list", "--json")).splitlines())
        }
        assert states == {"ops": ("revoked", True), "kiosk": ("active", True)}
        log = f.log("relay")
        assert "API request from 127.0.0.1 refused (revoked)" in log
        assert ops["token"] not in log and kiosk not in log
