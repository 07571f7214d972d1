"""Prometheus metrics of one relay worker, served at ``GET /metrics`` (``WebServer``).

``RelayMetrics`` is a ``RelayObserver``: what only an event tells (calls started and
ended, alerts by kind and severity, routing latency) it counts itself as the relay
reports it; what the relay counts already (``RelayStats``, ``WebhookStats``, the API's
refusals) and what is a state (devices by presence, calls up, the broker connection)
is read at scrape time by a collector, so nothing is counted twice and the routing
path pays for one histogram observation per forward.

The endpoint sits behind the API's token check like every API route (``Api.middleware``):
a scraper sends ``Authorization: Bearer eirt_...`` (Prometheus: ``authorization:
credentials_file``) and trusts the relay's CA (``tls_config: ca_file``).

Counters are per worker (and since it started): with several workers, sum them.
Label values come from fixed sets, never from the wire as they are: an alert kind
boards do not raise, or a presence state other than online/offline, is counted as
``other``, so a device cannot grow the number of series.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from collections.abc import Iterable, Mapping
from dataclasses import fields
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from agent.calls.machine import CallEndReason
from agent.edge.alerts import OUTBOX_OVERFLOW, SELFTEST_FAILED, TAMPER, Alert
from agent.edge.pipeline import SEVERITY
from cloud_relay.presence import OFFLINE
from cloud_relay.routing import CallEnded, CallEvent, CallStarted
from cloud_relay.service import Relay, RelayObserver
from cloud_relay.tokens import Refusal
from cloud_relay.webhooks import WebhookStats

logger = logging.getLogger(__name__)

METRICS_PATH: Final = "/metrics"
PREFIX: Final = "edge_intercom_relay"

ALERT_KINDS: Final = (*SEVERITY, OUTBOX_OVERFLOW, TAMPER, SELFTEST_FAILED)
"""Every ``kind`` of alert the boards raise (detectors, outbox, tamper switch, self-test)."""

END_REASONS: Final = frozenset({*CallEndReason, "hangup", "cancelled"})
"""End reasons on the wire: the boards' own, and the envelope bodies' defaults."""

ROUTING_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Seconds; on one machine a forward takes well under a millisecond, under load tens."""

_LABELS: Final = {"dropped": "reason", "commands_finished": "outcome"}
"""The label of each tally in ``RelayStats``."""


def _bounded(value: str, known: Iterable[str]) -> str:
    return value if value in known else "other"


class RelayMetrics(RelayObserver):
    """The worker's metrics: ``Relay(observers=[metrics])``, then ``watch(relay, ...)``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._calls_started = Counter(
            f"{PREFIX}_calls_started", "Calls this worker routed an invite for, by mode",
            ["mode"], registry=self.registry,
        )  # fmt: skip
        self._calls_ended = Counter(
            f"{PREFIX}_calls_ended", "Calls ended through this worker, by end reason",
            ["reason"], registry=self.registry,
        )  # fmt: skip
        self._alerts = Counter(
            f"{PREFIX}_alerts", "Alerts stored (first copy only), by kind and severity",
            ["kind", "severity"], registry=self.registry,
        )  # fmt: skip
        self._routing = Histogram(
            f"{PREFIX}_routing_seconds",
            "From taking a device's signaling message in to handing its forward to the broker",
            buckets=ROUTING_BUCKETS, registry=self.registry,
        )  # fmt: skip

    def watch(
        self,
        relay: Relay,
        *,
        webhooks: WebhookStats | None = None,
        refusals: Tally[Refusal] | None = None,
    ) -> None:
        """Read ``relay``'s state and counters at each scrape, and ``webhooks``' and the
        API's ``refusals`` if given."""
        self.registry.register(_StateCollector(relay, webhooks, refusals))

    # --- RelayObserver ---

    def alert(self, device: str, alert: Alert) -> None:
        kind = _bounded(alert.kind, ALERT_KINDS)
        self._alerts.labels(kind, alert.severity.value).inc()

    def call(self, event: CallEvent) -> None:
        match event:
            case CallStarted(mode=mode):
                self._calls_started.labels(mode).inc()
            case CallEnded(reason=reason):
                self._calls_ended.labels(_bounded(reason, END_REASONS)).inc()

    def routed(self, seconds: float) -> None:
        self._routing.observe(seconds)

    # --- the endpoint ---

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics in the format ``accept`` asks for (OpenMetrics or Prometheus text),
        and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    async def handle(self, request: web.Request) -> web.Response:
        body, content_type = self.exposition(request.headers.get("Accept", ""))
        return web.Response(body=body, headers={"Content-Type": content_type})


class _StateCollector(Collector):
    """What the relay already keeps, read when scraped."""

    def __init__(
        self,
        relay: Relay,
        webhooks: WebhookStats | None,
        refusals: Tally[Refusal] | None,
    ) -> None:
        self._relay = relay
        self._webhooks = webhooks
        self._refusals = refusals

    def collect(self) -> Iterable[Metric]:
        relay = self._relay
        devices = GaugeMetricFamily(
            f"{PREFIX}_devices", "Devices this worker knows, by presence", labels=["state"]
        )
        states = Tally(relay.presence.state(d) for d in relay.presence.devices())
        by_state: Tally[str] = Tally()
        for state, count in states.items():
            by_state["unknown" if state is None else _bounded(state, ("online", OFFLINE))] += count
        for state in ("online", OFFLINE, "other", "unknown"):
            devices.add_metric([state], by_state[state])
        yield devices
        yield GaugeMetricFamily(
            f"{PREFIX}_calls_open", "Calls up (or being set up) as this worker knows them",
            value=relay.router.open_calls(),
        )  # fmt: skip
        yield GaugeMetricFamily(
            f"{PREFIX}_broker_connected", "1 while the worker is connected to the broker",
            value=int(relay.client.outage is None),
        )  # fmt: skip
        for f in fields(relay.stats):
            value = getattr(relay.stats, f.name)
            name = f"{PREFIX}_{f.name}"
            if isinstance(value, Tally):
                yield _tally(name, f"RelayStats.{f.name}", _LABELS.get(f.name, "label"), value)
            else:
                yield CounterMetricFamily(name, f"RelayStats.{f.name}", value=value)
        if (hooks := self._webhooks) is not None:
            deliveries = CounterMetricFamily(
                f"{PREFIX}_webhook_deliveries", "Webhook deliveries done, by outcome",
                labels=["outcome"],
            )  # fmt: skip
            deliveries.add_metric(["delivered"], hooks.delivered)
            deliveries.add_metric(["dead"], hooks.dead)
            yield deliveries
            yield CounterMetricFamily(
                f"{PREFIX}_webhook_retries", "Webhook attempts that failed and were tried again",
                value=hooks.retried,
            )  # fmt: skip
            yield CounterMetricFamily(
                f"{PREFIX}_webhook_resumed",
                "Webhook deliveries taken up again (after a restart, or sent again)",
                value=hooks.resumed,
            )
            yield _tally(
                f"{PREFIX}_webhook_failures", "Failed webhook attempts, by class", "class",
                hooks.failed,
            )  # fmt: skip
        if self._refusals is not None:
            yield _tally(
                f"{PREFIX}_api_refusals", "API requests refused, by reason", "reason",
                self._refusals,
            )  # fmt: skip


def _tally(
    name: str, doc: str, label: str, counts: Mapping[str, int] | Tally[Refusal]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in sorted(counts.items()):
        family.add_metric([str(value)], count)
    return family
