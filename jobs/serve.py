"""Serve a checkpoint over HTTP: ``python -m jobs.serve SPEC.yaml [--checkpoint URL] [--detach]``.

Connects to Ray (``RAY_ADDRESS`` or a local instance), deploys the spec's checkpoint as a Ray Serve
application (:mod:`actors.serve.deployment`), prints the endpoint URL and keeps the application
running until interrupted (``--detach`` returns at once and leaves it running).

Python callers (Tune, the pipeline) use :func:`deploy` and :func:`rollout`:

* ``deploy(spec, checkpoint_url=None) -> endpoint URL`` (Serve's HTTP proxy)
* ``replica_endpoints(spec) -> [URL, ...]``: with Serve's direct ingress enabled on the cluster
  (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1`` in the environment of ``ray start``, or of this process
  when it starts a local Ray), each replica also answers HTTP itself, without the proxy hop: the
  faster path for a load balancer in front of the replicas (measured in ``bench.serve``)
* ``rollout(spec, new_checkpoint_url, canary=None) -> RolloutResult``: a rolling in-place update,
  or, with a :class:`~orchestrator.spec.Canary` config (or the spec's), a canary that is promoted or
  rolled back by :func:`actors.serve.canary.canary_decision`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from actors.serve.canary import ArmStats, Decision, canary_decision
from actors.serve.checkpoint import CheckpointError, load_served_model
from actors.serve.deployment import (STATS_NAMESPACE, CanaryStatsCollector, build_app,
                                     user_config)
from actors.serve.request import api_key_digest
from orchestrator.spec import Canary, ModelRef, ServeSpec, SpecError, load_spec


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


def _connect() -> None:
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None)


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


def deploy(spec: ServeSpec, checkpoint_url: str | None = None, *, host: str = "127.0.0.1") -> str:
    """Deploy ``checkpoint_url`` (default: the spec's) and return the endpoint URL.

    Starts Serve's HTTP proxy on ``host:spec.http_port`` if Serve is not running yet (a running
    Serve keeps its address). Raises CheckpointError for an unusable checkpoint and SpecError when
    ``api_key_env`` names an unset variable, before anything is deployed.
    """
    _connect()
    url = checkpoint_url or spec.checkpoint_url
    config = user_config(spec, _checked(spec, url, spec.model), api_key_sha256=_key_digest(spec))
    serve.start(http_options={"host": host, "port": spec.http_port})
    _apply(spec, config)
    return f"http://{host}:{spec.http_port}{spec.route_prefix}"


def replica_endpoints(app: ServeSpec | str, timeout_s: float = 30.0) -> list[str]:
    """URLs at which the replicas of a spec's (or a named) application answer HTTP directly
    (Serve's direct ingress), one per running replica; empty without direct ingress."""
    from ray.serve.context import _get_global_client
    name = app if isinstance(app, str) else app.name
    client = _get_global_client()
    bind = client.http_config.host
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(client._controller.get_target_groups.remote(app_name=name))
        # without direct ingress there is only the proxy's catch-all group (no app name)
        mine = [g for g in groups if g.app_name == name and g.protocol == "HTTP"]
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
    _connect()
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
        winner = candidate if decision == "promote" else previous
        _apply(spec, user_config(spec, winner, api_key_sha256=digest))
        return RolloutResult(decision, winner[0], previous[0], candidate[0], reason,
                             stable_stats.summary(), canary_stats.summary())
    except BaseException:
        _apply(spec, user_config(spec, previous, api_key_sha256=digest))  # never leave a canary behind
        raise
    finally:
        ray.kill(collector)


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
    except (CheckpointError, SpecError) as e:
        print(e, file=sys.stderr)
        return 2
    print(f"serving {args.checkpoint or spec.checkpoint_url} at {endpoint}", flush=True)
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
