"""Serve KPIs for Prometheus (``orchestrator.metrics.SERVE``), recorded by each replica.

The request path only adds to plain dicts and lists (well under a microsecond a request);
:meth:`ServeMetrics.flush`, called every ``FLUSH_S`` (0.5 s) from the replica's event loop, hands
the totals to Ray's metric objects: one ``inc`` per (arm, code) seen, one ``observe`` per latency and
per batch (Ray's Histogram has no bulk observe), a few gauge sets. Every series carries ``app``
(the Serve application) and ``arm``: ``stable`` or ``canary`` (the arm a request was routed to),
``none`` for a request refused before routing (bad method, API key, body). A request whose canary
forward failed, answered by the stable arm (the client sees 200), counts as the canary's 500, as
the canary gate counts it. Gauges are set at every flush: Ray's metrics agent drops a gauge not
refreshed within two export intervals. (The agent also rebuilds a histogram's ``_sum`` from bucket
midpoints: only ``_count`` and the buckets are exact.)

A metrics failure is logged once and recording stops; serving goes on.
"""

from __future__ import annotations

import logging

from orchestrator.metrics import SERVE, Recorder

log = logging.getLogger("ray.serve")

FLUSH_S = 0.5


class ServeMetrics:
    """What one replica records; ``flush`` exports what accumulated since the last flush."""

    def __init__(self, app: str):
        self.rec = Recorder(SERVE, app=app)
        self.on = True
        self._requests: dict[tuple[str, int], int] = {}
        self._latency_ms: dict[str, list[float]] = {}
        self._batches: dict[str, list[int]] = {}
        self._forward: dict[str, list[float]] = {}  # arm -> [seconds, examples]
        self._forward_ms: dict[str, float] = {}     # arm -> ms per example, last interval with forwards

    # hot path: plain Python containers only ------------------------------------------------
    def request(self, arm: str, code: int, seconds: float) -> None:
        key = (arm, code)
        self._requests[key] = self._requests.get(key, 0) + 1
        lat = self._latency_ms.get(arm)
        if lat is None:
            lat = self._latency_ms[arm] = []
        lat.append(seconds * 1e3)

    def forward(self, arm: str, examples: int, seconds: float) -> None:
        sizes = self._batches.get(arm)
        if sizes is None:
            sizes = self._batches[arm] = []
        sizes.append(examples)
        f = self._forward.get(arm)
        if f is None:
            self._forward[arm] = [seconds, examples]
        else:
            f[0] += seconds
            f[1] += examples

    # every FLUSH_S --------------------------------------------------------------------------
    def flush(self, queued: dict[str, int], canary_share: float) -> None:
        """Export the accumulated counts; ``queued``: examples waiting now, for every arm served."""
        requests, self._requests = self._requests, {}
        latency, self._latency_ms = self._latency_ms, {}
        batches, self._batches = self._batches, {}
        forward, self._forward = self._forward, {}
        if not self.on:
            return
        try:
            rec = self.rec
            for (arm, code), n in requests.items():
                rec.inc("orchestrator_serve_requests", n, arm=arm, code=str(code))
            for arm, values in latency.items():
                rec.observe_many("orchestrator_serve_latency_ms", values, arm=arm)
            for arm, sizes in batches.items():
                rec.observe_many("orchestrator_serve_batch_size", sizes, arm=arm)
            for arm, (seconds, examples) in forward.items():
                if examples:
                    self._forward_ms[arm] = seconds * 1e3 / examples
            # every gauge is set at every flush (Ray's agent drops a gauge not refreshed within two
            # export intervals), for the arms served now: a removed canary's gauges go away
            self._forward_ms = {arm: ms for arm, ms in self._forward_ms.items() if arm in queued}
            for arm, ms in self._forward_ms.items():
                rec.set("orchestrator_serve_forward_ms_per_example", ms, arm=arm)
            for arm, n in queued.items():
                rec.set("orchestrator_serve_queue_depth", n, arm=arm)
            rec.set("orchestrator_serve_canary_share", canary_share)
        except Exception as e:  # noqa: BLE001 - metrics never fail serving
            self.on = False
            log.warning("serve metrics off for this replica (%s: %s)", type(e).__name__, e)
