"""Serve a checkpoint over HTTP: ``python -m jobs.serve SPEC.yaml [--checkpoint URL] [--detach]``.

Connects to Ray (``RAY_ADDRESS`` or a local instance; a Ray it starts itself gets the spec's
``ingress``), deploys the spec's checkpoint as a Ray Serve application
(:mod:`actors.serve.deployment`), prints the endpoint URL and which ingress serves it, and keeps
the application running until interrupted (``--detach`` returns at once and leaves it running).

Python callers (Tune, the pipeline) use :func:`deploy` and :func:`rollout`:

* ``deploy(spec, checkpoint_url=None) -> Endpoint``: the endpoint URL (a ``str``), with the
  ingress that serves it (:mod:`actors.serve.ingress`). Where this process starts Ray, it starts
  it with the spec's ``ingress`` (``auto``: Serve's HAProxy ingress where HAProxy runs, else
  direct ingress); a running cluster keeps its own, and ``Endpoint.note`` says which and why
* ``replica_endpoints(spec) -> [URL, ...]``: with Serve's direct ingress (and not HAProxy) on the
  cluster, each replica also answers HTTP itself, without the proxy hop: for a load balancer of
  your own in front of the replicas (measured in ``bench.serve``)
* ``rollout(spec, new_checkpoint_url, canary=None) -> RolloutResult``: a rolling in-place update,
  or, with a :class:`~orchestrator.spec.Canary` config (or the spec's), a canary that is promoted or
  rolled back by :func:`actors.serve.canary.canary_decision`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from actors.serve import ingress
from actors.serve.canary import ArmStats, Decision, canary_decision, gates, window_filled
from actors.served_model import ServedCheckpointError, load_served_model
from actors.serve.deployment import (STATS_NAMESPACE, CanaryStatsCollector, build_app,
                                     user_config)
from actors.serve.request import api_key_digest
from orchestrator.metrics import SERVE, Recorder
from orchestrator.spec import Canary, ModelRef, ServeSpec, SpecError, load_spec

log = logging.getLogger("jobs.serve")


@dataclass
class RolloutResult:
    """What a rollout did. ``decision`` is ``promote`` (the candidate now serves) or ``rollback``."""
    decision: Decision
    serving_url: str
    previous_url: str
    candidate_url: str
    reason: str
    stable: dict[str, Any] = field(default_factory=dict)
    canary: dict[str, Any] = field(default_factory=dict)


class Endpoint(str):
    """An endpoint URL, and what serves it: ``ingress`` (``haproxy``, ``direct`` or ``proxy``) and
    ``note``, one line saying so (and, where it is not HAProxy under ``ingress: auto``, why, and how
    to get it)."""
    ingress: ingress.Running
    note: str

    def __new__(cls, url: str, running: ingress.Running, note: str) -> Endpoint:
        self = super().__new__(cls, url)
        self.ingress, self.note = running, note
        return self

    def __getnewargs__(self) -> tuple[str, str, str]:  # pickles (to a Ray task) as what it is
        return str(self), self.ingress, self.note


@dataclass
class _Start:
    """How :func:`connect` reached Ray: ``ingress`` is what it started Ray with (None: it joined a
    running Ray) and ``why`` says why that is not HAProxy under ``ingress: auto``."""
    ingress: ingress.Running | None = None
    why: str = ""


def connect(spec: ServeSpec) -> _Start:
    """Join Ray (already connected, ``RAY_ADDRESS``, or a local cluster started with ``ray start``),
    else start a local Ray with the spec's ``ingress``. Raises SpecError naming ``ingress`` when
    it is ``haproxy`` and this process would start Ray without a HAProxy binary that runs."""
    address = os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized() or address not in (None, "local"):
        if not ray.is_initialized():
            ray.init(address=address)
        return _Start()
    try:
        running, env, why = ingress.start_env(spec.ingress)
    except FileNotFoundError as e:
        raise SpecError([("ingress", f"haproxy: {e}; use ingress: auto to fall back to direct ingress "
                                     "without it")]) from None
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # Ray's processes inherit it: Serve reads its ingress there
    try:
        ray.init(address=address)  # without an address, a `ray start` cluster here is joined
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return _Start(running, why)


def _ingress_note(spec: ServeSpec, start: _Start, running: ingress.Running) -> str:
    """One line: what serves the port and, when that is not what the spec asked for, why."""
    what = ingress.SERVED_BY[running]
    if running == spec.ingress or (spec.ingress == "auto" and running == "haproxy"):
        return what
    if start.ingress == running:  # this process started Ray, without a HAProxy that runs
        return f"{what}; fell back from HAProxy because {start.why}"
    fast = f". For the fast path, start Ray with {ingress.FAST_ENV}" if running != "haproxy" else ""
    if spec.ingress == "auto":
        return (f"{what}; fell back from HAProxy because the running Ray cluster this joined was "
                f"started without RAY_SERVE_ENABLE_HA_PROXY=1{fast}")
    return (f"{what}; not {spec.ingress}, because the running Ray cluster this joined keeps the "
            f"ingress it was started with (ingress: {spec.ingress} applies where jobs.serve starts Ray){fast}")


def _key_digest(spec: ServeSpec) -> str | None:
    if spec.api_key_env is None:
        return None
    key = os.environ.get(spec.api_key_env)
    if not key:
        raise SpecError([("api_key_env", f"environment variable {spec.api_key_env} is unset or empty; "
                                         "set it to the API key or remove api_key_env")])
    return api_key_digest(key)


def _checked(spec: ServeSpec, url: str, model: ModelRef) -> tuple[str, dict]:
    """Load the checkpoint here first, so a bad one fails before any replica is touched."""
    load_served_model(url, model, spec.storage.as_options())
    return url, model.model_dump(mode="json")


def _apply(spec: ServeSpec, config: dict[str, Any]) -> None:
    """Deploy or update the application; returns once every replica runs the new config."""
    serve.run(build_app(spec, config), name=spec.name, route_prefix=spec.route_prefix, blocking=False)


def deploy(spec: ServeSpec, checkpoint_url: str | None = None, *, host: str = "127.0.0.1") -> Endpoint:
    """Deploy ``checkpoint_url`` (default: the spec's) and return the endpoint.

    Starts Ray with the spec's ``ingress`` if it is not running (see :func:`connect`), and Serve
    on ``host:spec.http_port`` if Serve is not running yet (a running Serve keeps its address and
    ingress). Raises ServedCheckpointError for an unusable checkpoint, and SpecError when
    ``api_key_env`` names an unset variable or ``ingress: haproxy`` cannot be had, before
    anything is deployed.
    """
    url = checkpoint_url or spec.checkpoint_url
    digest = _key_digest(spec)
    checked = _checked(spec, url, spec.model)
    start = connect(spec)
    serve.start(http_options={"host": host, "port": spec.http_port})
    if spec.ingress == "haproxy" and not ingress.runs_haproxy():
        raise SpecError([("ingress", "haproxy: the running Ray cluster was started without "
                                     f"RAY_SERVE_ENABLE_HA_PROXY=1; start it with {ingress.FAST_ENV}, "
                                     "or use ingress: auto to fall back to what it runs")])
    _apply(spec, user_config(spec, checked, api_key_sha256=digest))
    running = ingress.running_ingress(spec.name)
    return Endpoint(f"http://{host}:{spec.http_port}{spec.route_prefix}", running,
                    _ingress_note(spec, start, running))


def replica_endpoints(app: ServeSpec | str, timeout_s: float = 30.0) -> list[str]:
    """URLs at which the replicas of a spec's (or a named) application answer HTTP directly
    (Serve's direct ingress), one per running replica; empty without direct ingress, and behind
    HAProxy (its port, the endpoint, is then the way in)."""
    name = app if isinstance(app, str) else app.name
    bind = ingress.http_host()
    deadline = time.monotonic() + timeout_s
    while True:
        # without direct ingress (or behind HAProxy) there is only Serve's front door (no app name)
        mine = [g for g in ingress.target_groups(name) if g.app_name == name]
        urls = [f"http://{t.ip if bind in ('0.0.0.0', '::') else bind}:{t.port}{g.route_prefix}"
                for g in mine for t in g.targets if t.name.startswith("SERVE_REPLICA::")]
        if urls or not mine or time.monotonic() > deadline:
            return sorted(urls)
        time.sleep(0.2)  # direct ingress on, no replica running yet: the group points at the proxy


def served(spec: ServeSpec) -> dict[str, Any]:
    """What one replica of the spec's application serves (its ``info()``)."""
    return serve.get_app_handle(spec.name).info.remote().result()


def rollout(spec: ServeSpec, new_checkpoint_url: str, canary: Canary | bool | None = None, *,
            model: ModelRef | None = None, timeout_s: float = 300.0,
            poll_s: float = 0.5) -> RolloutResult:
    """Roll the running application of ``spec`` onto ``new_checkpoint_url``.

    ``canary``: a Canary config, ``None`` for the spec's ``canary`` (if any), ``False`` for a
    direct rolling update. ``model`` overrides ``spec.model`` for the new checkpoint (a Tune trial
    may have changed its architecture). Without a canary every replica loads the new weights
    beside the old and swaps them in; no request fails. With one, ``canary.share`` of traffic goes
    to the candidate until both arms have ``min_requests`` requests, then the gate promotes or
    rolls back; a canary that does not get enough traffic within ``timeout_s`` is rolled back.
    """
    connect(spec)
    cfg = spec.canary if canary is None else (canary or None)
    digest = _key_digest(spec)
    now = served(spec)
    previous = (now["stable"], now["stable_model"])
    candidate = _checked(spec, new_checkpoint_url, model or spec.model)
    if cfg is None:
        _apply(spec, user_config(spec, candidate, api_key_sha256=digest))
        return RolloutResult("promote", candidate[0], previous[0], candidate[0], "rolling update")

    epoch = uuid.uuid4().hex[:12]
    name = f"canary-stats-{spec.name}-{epoch}"
    collector = CanaryStatsCollector.options(name=name, namespace=STATS_NAMESPACE).remote()
    try:
        _apply(spec, user_config(spec, previous, candidate, cfg.share, epoch, name, digest))
        deadline = time.monotonic() + timeout_s
        decision, reason = "wait", ""
        while decision == "wait":
            snap = ray.get(collector.snapshot.remote(epoch))
            stable_stats = ArmStats.from_samples(*snap.get("stable", ([], 0)))
            canary_stats = ArmStats.from_samples(*snap.get("canary", ([], 0)))
            decision = canary_decision(stable_stats, canary_stats, cfg)
            if decision == "wait" and time.monotonic() > deadline:
                decision, reason = "rollback", (f"canary window not filled in {timeout_s}s "
                                                f"(min_requests {cfg.min_requests} per arm)")
            elif decision == "wait":
                time.sleep(poll_s)
        if not reason:
            reason = _reason(decision, stable_stats, canary_stats, cfg)
        _record_decision(spec.name, decision, stable_stats, canary_stats, cfg)
        winner = candidate if decision == "promote" else previous
        _apply(spec, user_config(spec, winner, api_key_sha256=digest))
        return RolloutResult(decision, winner[0], previous[0], candidate[0], reason,
                             stable_stats.summary(), canary_stats.summary())
    except BaseException:
        _apply(spec, user_config(spec, previous, api_key_sha256=digest))  # never leave a canary behind
        raise
    finally:
        ray.kill(collector)


def _record_decision(app: str, decision: Decision, stable: ArmStats, canary: ArmStats, cfg: Canary) -> None:
    """Log every gate's figures and count each verdict in ``orchestrator_serve_gate_decisions``
    (gate ``min_requests``, ``error_rate``, ``p95_latency_ms``: pass/fail; gate ``decision``:
    promote/rollback). A metrics failure is logged, never raised: the rollout is done by now."""
    filled = window_filled(stable, canary, cfg)
    verdicts = [("min_requests", "pass" if filled else "fail",
                 f"min_requests: canary {canary.requests} stable {stable.requests}, need {cfg.min_requests} "
                 f"each -> {'pass' if filled else 'fail'}")]
    if filled:
        verdicts += [(g.name, "pass" if g.passed else "fail", g.line()) for g in gates(stable, canary, cfg)]
    verdicts.append(("decision", decision, f"decision: {decision}"))
    level = logging.INFO if decision == "promote" else logging.WARNING
    log.log(level, "canary gate for app %s: %s", app, "; ".join(text for _, _, text in verdicts))
    try:
        rec = Recorder(SERVE, app=app)
        for gate, outcome, _ in verdicts:
            rec.inc("orchestrator_serve_gate_decisions", gate=gate, outcome=outcome)
    except Exception as e:  # noqa: BLE001 - metrics never fail a rollout
        log.warning("canary gate metrics not recorded: %s: %s", type(e).__name__, e)


def _reason(decision: Decision, stable: ArmStats, canary: ArmStats, cfg: Canary) -> str:
    s, c = stable, canary
    text = (f"error rate {c.error_rate:.2%} vs {s.error_rate:.2%} (limit +{cfg.max_error_increase:.0%}), "
            f"p95 {c.p95_latency_s * 1e3:.1f} ms vs {s.p95_latency_s * 1e3:.1f} ms "
            f"(limit +{cfg.max_p95_slowdown:.0%})")
    return f"{decision}: {text}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="serve spec YAML (path or storage URL)")
    p.add_argument("--checkpoint", help="served checkpoint URL (default: the spec's checkpoint_url)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 on a cluster)")
    p.add_argument("--detach", action="store_true", help="return after deploying; leave it running")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    if not isinstance(spec, ServeSpec):
        print(f"{args.spec}: kind is {spec.kind!r}; jobs.serve needs a serve spec", file=sys.stderr)
        return 2
    try:
        endpoint = deploy(spec, args.checkpoint, host=args.host)
    except (ServedCheckpointError, SpecError) as e:
        print(e, file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint or spec.checkpoint_url} at {endpoint}", flush=True)
    print(f"  ingress: {endpoint.note}", flush=True)
    for url in replica_endpoints(spec):
        print(f"  replica (direct ingress): {url}", flush=True)
    if args.detach:
        return 0
    try:
        while True:
            time.sleep(5)
    except KeyboardInterrupt:
        serve.delete(spec.name)
        return 130


if __name__ == "__main__":
    sys.exit(main())
