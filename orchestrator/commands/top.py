"""``orchestrator top``: a live terminal view of running jobs and their KPIs, read from the same
metrics Prometheus scrapes (each Ray node's metrics endpoint)."""

from __future__ import annotations

import sys
import time
from collections import defaultdict

from orchestrator import metrics as M


def register(sub) -> None:
    p = sub.add_parser("top", help="live view of running jobs' KPIs (step, loss, samples/s, stall, "
                                   "serve req/s, p95, errors, canary share)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or auto)")
    p.add_argument("--metrics-url", action="append", default=[],
                   help="a metrics endpoint to read instead of asking Ray for its nodes' (repeatable)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
    p.add_argument("--once", action="store_true",
                   help="print one snapshot (two scrapes --interval apart, for rates) and exit")
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------ pure summary
def _by(samples, name):
    return [s for s in samples if s.name == M.PREFIX + name]


def _latest_attempt(samples) -> dict[str, str]:
    """Each job's current attempt (a worker group's id): the one furthest along (highest step);
    a finished or failed attempt's series linger until Ray drops them."""
    best: dict[str, tuple[float, str]] = {}
    for s in _by(samples, "orchestrator_train_step"):
        job, attempt = s.labels.get("job"), s.labels.get("attempt")
        if job is not None and attempt is not None and (job not in best or s.value > best[job][0]):
            best[job] = (s.value, attempt)
    return {job: a for job, (_, a) in best.items()}


def train_rows(samples: list[M.Sample], now: float) -> list[dict]:
    """One row per train job (its latest attempt): step, loss, samples/s, input stall (worst rank),
    world size, seconds since the last checkpoint."""
    train = [s for s in samples if s.name.startswith(M.PREFIX + "orchestrator_train_")]
    attempt = _latest_attempt(train)
    rows: dict[str, dict] = {job: {"job": job, "attempt": a} for job, a in attempt.items()}

    def current(s):
        return s.labels.get("job") in rows and s.labels.get("attempt") == attempt[s.labels["job"]]
    for key, name in (("step", "orchestrator_train_step"), ("loss", "orchestrator_train_loss"),
                      ("samples_per_s", "orchestrator_train_samples_per_second"),
                      ("world_size", "orchestrator_train_world_size"),
                      ("checkpoint_at", "orchestrator_train_last_checkpoint_timestamp_seconds")):
        for s in filter(current, _by(train, name)):
            rows[s.labels["job"]][key] = s.value
    for s in filter(current, _by(train, "orchestrator_train_input_stall_ratio")):
        r = rows[s.labels["job"]]
        r["input_stall"] = max(r.get("input_stall", 0.0), s.value)
    for r in rows.values():
        if "checkpoint_at" in r:
            r["checkpoint_age_s"] = max(0.0, now - r.pop("checkpoint_at"))
    return sorted(rows.values(), key=lambda r: r["job"])


def _p95(buckets: dict[float, float]) -> float | None:
    """The 95th percentile from cumulative histogram buckets ``{le: count}`` (upper bound of the
    bucket it falls in, as Prometheus's histogram_quantile does without interpolation)."""
    if not buckets:
        return None
    total = buckets.get(float("inf"), max(buckets.values()))
    if total <= 0:
        return None
    for le in sorted(buckets):
        if buckets[le] >= 0.95 * total:
            return le
    return None


def serve_rows(prev: list[M.Sample], cur: list[M.Sample], dt: float) -> list[dict]:
    """One row per Serve application: requests/s and error share over the last ``dt`` seconds,
    p95 latency over the same window (whole run when there is no previous scrape), canary share."""
    def totals(samples):
        req: dict[str, dict[tuple, float]] = defaultdict(lambda: defaultdict(float))
        lat: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
        for s in _by(samples, "orchestrator_serve_requests_total"):
            req[s.labels["app"]][(s.labels.get("arm"), s.labels.get("code"))] += s.value
        for s in _by(samples, "orchestrator_serve_latency_ms_bucket"):
            lat[s.labels["app"]][float(s.labels["le"])] += s.value
        return req, lat
    req1, lat1 = totals(cur)
    req0, lat0 = totals(prev) if prev else ({}, {})
    share = {s.labels["app"]: s.value for s in _by(cur, "orchestrator_serve_canary_share")}
    rows = []
    for app in sorted(set(req1) | set(share)):
        d = {k: v - req0.get(app, {}).get(k, 0.0) for k, v in req1.get(app, {}).items()}
        n = sum(d.values())
        errors = sum(v for (arm, code), v in d.items() if code and not code.startswith(("2", "3")))
        buckets = {le: v - lat0.get(app, {}).get(le, 0.0) for le, v in lat1.get(app, {}).items()}
        rows.append({"app": app, "req_per_s": n / dt if prev and dt > 0 else None,
                     "error_share": errors / n if n else 0.0, "p95_ms": _p95(buckets),
                     "canary_share": share.get(app)})
    return rows


# ------------------------------------------------------------------------------ rendering
def _fmt(v, spec: str = "{:.4g}") -> str:
    return "-" if v is None else spec.format(v)


def render(train: list[dict], serve: list[dict]):
    from rich.console import Group
    from rich.table import Table
    t = Table(title="train jobs", expand=True)
    for col in ("job", "attempt", "step", "loss", "samples/s", "input stall", "workers", "last ckpt"):
        t.add_column(col, justify="left" if col == "job" else "right")
    for r in train:
        t.add_row(r["job"], r["attempt"], _fmt(r.get("step"), "{:.0f}"), _fmt(r.get("loss")),
                  _fmt(r.get("samples_per_s"), "{:,.0f}"), _fmt(r.get("input_stall"), "{:.1%}"),
                  _fmt(r.get("world_size"), "{:.0f}"), _fmt(r.get("checkpoint_age_s"), "{:.0f}s ago"))
    s = Table(title="serve applications", expand=True)
    for col in ("app", "req/s", "p95", "errors", "canary share"):
        s.add_column(col, justify="left" if col == "app" else "right")
    for r in serve:
        s.add_row(r["app"], _fmt(r["req_per_s"], "{:,.1f}"), _fmt(r["p95_ms"], "<= {:g} ms"),
                  _fmt(r["error_share"], "{:.1%}"), _fmt(r["canary_share"], "{:.0%}"))
    return Group(t, s)


def run(args) -> int:
    from rich.console import Console
    from rich.live import Live
    if args.metrics_url:
        def endpoints():
            return args.metrics_url
    else:
        import ray
        try:
            ray.init(address=args.address or "auto", log_to_driver=False, logging_level="ERROR")
        except (ConnectionError, RuntimeError) as e:
            from orchestrator.ray_adapter import connection_help
            print(f"orchestrator top: cannot reach Ray ({e}); {connection_help(args.address)}", file=sys.stderr)
            return 2
        endpoints = M.ray_endpoints
    console = Console()
    prev, t_prev = M.scrape(endpoints()), time.monotonic()
    if args.once:
        time.sleep(args.interval)  # a rate needs two scrapes
        cur, now = M.scrape(endpoints()), time.monotonic()
        console.print(render(train_rows(cur, time.time()), serve_rows(prev, cur, now - t_prev)))
        return 0
    with Live(render(train_rows(prev, time.time()), serve_rows([], prev, 0.0)), console=console,
              refresh_per_second=4) as live:
        while True:
            time.sleep(args.interval)
            cur, now = M.scrape(endpoints()), time.monotonic()
            live.update(render(train_rows(cur, time.time()), serve_rows(prev, cur, now - t_prev)))
            prev, t_prev = cur, now
