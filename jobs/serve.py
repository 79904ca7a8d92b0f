"""Serve a checkpoint over HTTP: ``python -m jobs.serve SPEC.yaml [--checkpoint URL] [--detach]``.

Checks the checkpoint first, before Ray is touched (:func:`servable_checkpoint`): a served
checkpoint is served as it is; a training checkpoint (a ``step-N`` directory or a checkpoint root)
is exported for serving to ``<root>/served/step-N`` first, as ``orchestrator export`` does; anything
else exits 2 saying what is missing. Then connects to Ray (``RAY_ADDRESS`` or a local instance; a
Ray it starts itself gets the spec's ``ingress``), deploys the checkpoint as a Ray Serve application
(:mod:`actors.serve.deployment`), prints the endpoint URL and which ingress serves it, and keeps
the application running until stopped (``--detach`` returns at once and leaves it running).

Stopped by SIGTERM (Ray's job stop, the scheduler's cancel and preemption) or SIGINT, it deletes
its own application (no other) and waits until its replicas are gone (:func:`stop_serving`), then
exits :func:`orchestrator.outcome.stopped_exit_code` (143, 130). The first signal starts that
cleanup, during deployment too; later ones are ignored, so it runs once and to the end. Under a
Ray job the wait is bounded by the job's stop grace (``RAY_JOB_STOP_WAIT_TIME_S``, which the
scheduler sets for serve jobs; Ray's default is 3 s): Serve goes on deleting the application if
the SIGKILL comes first, and the scheduler deletes one a stopped job left.

Python callers (Tune, the pipeline) use :func:`deploy` and :func:`rollout`:

* ``deploy(spec, checkpoint_url=None) -> Endpoint``: the endpoint URL (a ``str``), with the
  ingress that serves it (:mod:`actors.serve.ingress`). Where this process starts Ray, it starts
  it with the spec's ``ingress`` (``auto``: Serve's HAProxy ingress where HAProxy runs, else
  direct ingress); a running cluster keeps its own, and ``Endpoint.note`` says which and why
* ``replica_endpoints(spec) -> [URL, ...]``: with Serve's direct ingress (and not HAProxy) on the
  cluster, each replica also answers HTTP itself, without the proxy hop: for a load balancer of
  your own in front of the replicas (measured in ``bench.serve``)
* ``rollout(spec, new_checkpoint_url, canary=None) -> RolloutResult``: a rolling in-place update,
  or, with a :class:`~orchestrator.spec.Canary` config (or the spec's), a staged canary that is
  promoted stage by stage or rolled back by :func:`actors.serve.canary.stage_decision`.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import ray
from ray import serve

from actors.serve import ingress
from actors.serve.canary import (ArmStats, Decision, Gate, QualityStats, eval_gate, gates,
                                 stage_decision, window_filled)
from actors.serve.quality import accuracy, load_eval_set
from actors.served_model import ServedCheckpointError, load_served_model, read_served_meta
from actors.serve.deployment import (STATS_NAMESPACE, CanaryStatsCollector, build_app,
                                     user_config)
from actors.serve.request import api_key_digest
from orchestrator import pipeline as pipemod
from orchestrator.metrics import SERVE, Recorder
from orchestrator.outcome import stopped_exit_code
from orchestrator.ray_adapter import STOP_WAIT_ENV
from orchestrator.spec import Canary, ModelRef, ServeSpec, SpecError, load_spec
from orchestrator.storage import StorageError

log = logging.getLogger("jobs.serve")
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"  # a replica actor's name: SERVE_REPLICA::<app>#<deployment>#<id>


@dataclass
class RolloutResult:
    """What a rollout did. ``decision`` is ``promote`` (the candidate now serves) or ``rollback``."""
    decision: Decision
    serving_url: str
    previous_url: str
    candidate_url: str
    reason: str
    stable: dict[str, Any] = field(default_factory=dict)   # the last stage's figures, per arm
    canary: dict[str, Any] = field(default_factory=dict)
    stages: list[dict[str, Any]] = field(default_factory=list)  # every stage held, with its figures


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
            with _keeping_sigterm_handler():
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
        with _keeping_sigterm_handler():
            ray.init(address=address)  # without an address, a `ray start` cluster here is joined
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return _Start(running, why)


@contextlib.contextmanager
def _keeping_sigterm_handler():
    """``ray.init`` sets the main thread's SIGTERM handler to ``sys.exit`` (Ray 2.60,
    ``ray._private.worker.init``); a caller that handles SIGTERM itself (:func:`main`) keeps its
    own. A default handler (not a Python function) is left to Ray."""
    saved = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(saved) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, saved)


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


def servable_checkpoint(spec: ServeSpec, url: str) -> tuple[str, str | None]:
    """The served checkpoint to deploy for ``url``, and a line saying what was exported, if anything.

    A served checkpoint is itself. A training checkpoint (a committed ``step-N`` directory, or a
    checkpoint root: its newest step) is exported, as ``orchestrator export`` does, to
    ``<root>/served/step-N`` (:func:`orchestrator.pipeline.served_location`, outside the
    ``step-*`` names that checkpoint retention deletes); an export already there is reused. Needs
    no Ray. Raises ServedCheckpointError naming the URL when it is neither, or the export fails.
    """
    opts = spec.storage.as_options()
    if pipemod.is_served_checkpoint(url, opts):
        return url, None
    step = pipemod.training_step(url, opts)
    if step is None:
        read_served_meta(url, opts)  # raises, saying what is missing
        return url, None
    out = pipemod.served_location(step)
    if pipemod.is_served_checkpoint(out, opts):
        return out, f"training checkpoint {step} was exported before: serving {out}"
    # the trainer's export, as `orchestrator export` runs it (jobs/ may import any actors/ module)
    from actors.trainer.checkpoint import CheckpointError
    from actors.trainer.export import export
    try:
        export(step, out, opts)
    except (CheckpointError, StorageError) as e:
        raise ServedCheckpointError(f"{url} is a training checkpoint that could not be exported for "
                                    f"serving (orchestrator export {step} {out}): {e}") from None
    return out, f"exported training checkpoint {step} for serving to {out} (orchestrator export)"


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
    from orchestrator.dashboards import install_for_ray
    install_for_ray()
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
                for g in mine for t in g.targets if t.name.startswith(REPLICA_ACTOR_PREFIX)]
        if urls or not mine or time.monotonic() > deadline:
            return sorted(urls)
        time.sleep(0.2)  # direct ingress on, no replica running yet: the group points at the proxy


def stop_serving(app: ServeSpec | str, timeout_s: float = 30.0, poll_s: float = 0.1) -> bool:
    """Delete the Serve application of a spec (or a named one), and no other, then wait up to
    ``timeout_s`` until its replicas' actors are gone; True if they are. Nothing to do (True)
    where the application or Serve is not running."""
    name = app if isinstance(app, str) else app.name
    deadline = time.monotonic() + timeout_s
    if name in serve.status().applications:
        # returns once the controller has stopped the replicas (each drains for up to the
        # deployment's graceful_shutdown_timeout_s); the controller finishes it if we are killed
        serve.delete(name)
    while _replica_actors(name):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def _replica_actors(app: str) -> list[str]:
    """Names of the live replica actors of Serve application ``app``."""
    prefix = f"{REPLICA_ACTOR_PREFIX}{app}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith(prefix)]


def served(spec: ServeSpec) -> dict[str, Any]:
    """What one replica of the spec's application serves (its ``info()``)."""
    return serve.get_app_handle(spec.name).info.remote().result()


def rollout(spec: ServeSpec, new_checkpoint_url: str, canary: Canary | bool | None = None, *,
            model: ModelRef | None = None, timeout_s: float = 300.0,
            poll_s: float = 0.25) -> RolloutResult:
    """Roll the running application of ``spec`` onto ``new_checkpoint_url``.

    ``canary``: a Canary config, ``None`` for the spec's ``canary`` (if any), ``False`` for a
    direct rolling update. ``model`` overrides ``spec.model`` for the new checkpoint (a Tune trial
    may have changed its architecture). Without a canary every replica loads the new weights
    beside the old and swaps them in; no request fails.

    With one, the candidate first faces the evaluation set (``quality.eval_set``, if any), then
    gets ``steps[i]`` percent of traffic, stage by stage (the first by a redeploy that adds the
    candidate's arm, the next ones through the stats collector, which the replicas poll); each
    stage lasts until
    :func:`actors.serve.canary.stage_decision` passes it (``min_requests`` on both arms,
    ``min_stage_s``, every gate) or rolls back (any gate failing). The last step, 100, is the
    promotion. A stage not passed within ``timeout_s``, or a canary that fails to build in any
    replica, rolls back at once; a rollback returns all traffic to stable at once. The result
    lists every stage held, with its figures. Raises ServedCheckpointError for a checkpoint the
    driver cannot load, and ValueError for an unusable evaluation set, before any traffic moves.
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

    stages: list[dict[str, Any]] = []
    if cfg.quality is not None and cfg.quality.eval_set is not None:
        gate = _eval_set_gate(spec, cfg, previous, candidate)
        stages.append({"percent": 0.0, "stage": "eval_set", "decision": "promote" if gate.passed else "rollback",
                       "gates": [gate.figures()]})
        _record_stage(spec.name, stages[-1], [gate.line()])
        if not gate.passed:
            _record_final(spec.name, "rollback")
            return RolloutResult("rollback", previous[0], previous[0], candidate[0],
                                 f"rollback before any traffic: {gate.line()}", stages=stages)

    rollout_id = uuid.uuid4().hex[:12]
    name = f"canary-stats-{spec.name}-{rollout_id}"
    collector = CanaryStatsCollector.options(name=name, namespace=STATS_NAMESPACE).remote()
    q = cfg.quality
    try:
        decision, reason = "promote", ""
        for i, percent in enumerate(cfg.steps[:-1]):  # the last step (100) is the promotion
            epoch = f"{rollout_id}-{i}"
            ray.get(collector.set_stage.remote(epoch, percent / 100))
            if i == 0:  # the candidate's arm goes in once; later stages move by the collector
                _apply(spec, user_config(spec, previous, candidate, percent / 100, epoch, name, digest,
                                         mirror_share=q.mirror_share if q else 0.0, task=q.task if q else "auto"))
            else:
                _await_stage(collector, epoch, timeout_s, poll_s)
            stage = _hold_stage(spec.name, collector, epoch, percent, cfg, timeout_s, poll_s)
            stages.append(stage)
            _record_stage(spec.name, stage, stage.pop("lines"))
            if stage["decision"] == "rollback":
                decision, reason = "rollback", f"rollback at stage {percent:g}%: {stage['reason']}"
                # every replica sends all traffic to stable at its next poll, before the redeploy
                ray.get(collector.set_stage.remote(f"{rollout_id}-rollback", 0.0))
                _await_stage(collector, f"{rollout_id}-rollback", 5.0, poll_s)
                break
        winner = candidate if decision == "promote" else previous
        _apply(spec, user_config(spec, winner, api_key_sha256=digest))  # 100% to one arm at once
        _record_final(spec.name, decision)
        if decision == "promote":
            reason = "promote: passed stages " + ", ".join(f"{s['percent']:g}%" for s in stages if s["percent"])
        last = stages[-1] if stages else {}
        return RolloutResult(decision, winner[0], previous[0], candidate[0], reason,
                             last.get("stable", {}), last.get("canary", {}), stages)
    except BaseException:
        _apply(spec, user_config(spec, previous, api_key_sha256=digest))  # never leave a canary behind
        raise
    finally:
        ray.kill(collector)


def _await_stage(collector, epoch: str, timeout_s: float, poll_s: float) -> bool:
    """Wait until every replica that polls the collector runs stage ``epoch`` (each polls every
    ``STAGE_POLL_S``); False after ``timeout_s`` (the stage's gates still count only its own epoch)."""
    deadline = time.monotonic() + timeout_s
    while not ray.get(collector.switched.remote(epoch)):
        if time.monotonic() > deadline:
            log.warning("not every replica moved to canary stage %s within %gs", epoch, timeout_s)
            return False
        time.sleep(min(poll_s, 0.1))
    return True


def _hold_stage(app: str, collector, epoch: str, percent: float, cfg: Canary, timeout_s: float,
                poll_s: float) -> dict[str, Any]:
    """Poll one stage's figures until :func:`stage_decision` passes or fails it, a replica reports
    that the canary does not build, or ``timeout_s`` passes; the stage's record. Every poll sets
    the gates' figures in ``orchestrator_serve_gate_figures``."""
    t0, started_at = time.monotonic(), time.time()
    rec = Recorder(SERVE, app=app)
    while True:
        snap = ray.get(collector.snapshot.remote(epoch))
        stable = ArmStats.from_samples(*snap.get("stable", ([], 0)))
        cand = ArmStats.from_samples(*snap.get("canary", ([], 0)))
        quality = _quality_stats(snap["quality"])
        held = time.monotonic() - t0
        decision, why = stage_decision(stable, cand, cfg, quality, held), ""
        _export_figures(rec, gates(stable, cand, cfg, quality))
        errors = snap["build_errors"]
        if errors:
            replica, error = next(iter(sorted(errors.items())))
            decision, why = "rollback", (f"the canary failed to build on {len(errors)} replica(s), "
                                         f"e.g. {replica}: {error}")
        elif decision == "wait" and held > timeout_s:
            decision, why = "rollback", (f"stage not passed in {timeout_s:g}s (canary {cand.requests} and stable "
                                         f"{stable.requests} requests, need {cfg.min_requests} each; "
                                         f"{quality.examples} mirrored examples)")
        if decision != "wait":
            break
        time.sleep(poll_s)
    gs = gates(stable, cand, cfg, quality)
    lines = [f"stage {percent:g}%: canary {cand.requests} stable {stable.requests} requests "
             f"(need {cfg.min_requests}), held {held:.1f}s (need {cfg.min_stage_s:g})"]
    lines += [g.line() for g in gs] + ([why] if why else [])
    failed = [g.line() for g in gs if not g.passed]
    return {"percent": percent, "decision": decision, "reason": why or "; ".join(failed) or "every gate passed",
            "started_at": started_at, "ended_at": time.time(), "held_s": round(held, 3),
            "filled": window_filled(stable, cand, cfg),
            "stable": stable.summary(), "canary": cand.summary(), "quality": quality.summary(),
            "gates": [g.figures() for g in gs], "build_errors": errors, "lines": lines}


def _quality_stats(by_task: dict[str, list[float]]) -> QualityStats:
    """The mirror comparison: replicas resolve ``auto`` alike, so one task has the figures."""
    if not by_task:
        return QualityStats()
    task, (n, agree, rel) = max(by_task.items(), key=lambda kv: kv[1][0])
    return QualityStats(int(n), agree, rel, task)


def _eval_set_gate(spec: ServeSpec, cfg: Canary, stable: tuple[str, dict], candidate: tuple[str, dict]) -> Gate:
    """Both models' accuracy on ``quality.eval_set``, in this process, once per rollout."""
    opts = spec.storage.as_options()
    x, y = load_eval_set(cfg.quality.eval_set, opts)
    acc = [accuracy(load_served_model(url, ref, opts).eval(), x, y) for url, ref in (stable, candidate)]
    return eval_gate(acc[0], acc[1], cfg)


def _export_figures(rec: Recorder, gs: list[Gate]) -> None:
    """Each gate's figures (canary, stable, limit) in ``orchestrator_serve_gate_figures``; a gauge,
    so it is set on every poll of a stage (Ray's agent drops one not refreshed) and goes with it."""
    try:
        for g in gs:
            for figure in ("canary", "stable", "limit"):
                rec.set("orchestrator_serve_gate_figures", getattr(g, figure), gate=g.name, figure=figure)
    except Exception as e:  # noqa: BLE001 - metrics never fail a rollout
        log.warning("canary gate figures not exported: %s: %s", type(e).__name__, e)


def _record_stage(app: str, stage: dict[str, Any], lines: list[str]) -> None:
    """Log a stage's figures and count each gate's verdict in ``orchestrator_serve_gate_decisions``.
    A metrics failure is logged, never raised."""
    level = logging.INFO if stage["decision"] != "rollback" else logging.WARNING
    log.log(level, "canary gate for app %s: %s -> %s", app, "; ".join(lines), stage["decision"])
    try:
        rec = Recorder(SERVE, app=app)
        if "filled" in stage:
            rec.inc("orchestrator_serve_gate_decisions", gate="min_requests",
                    outcome="pass" if stage["filled"] else "fail")
        if stage.get("build_errors"):
            rec.inc("orchestrator_serve_gate_decisions", gate="build", outcome="fail")
        for g in stage["gates"]:
            rec.inc("orchestrator_serve_gate_decisions", gate=g["name"], outcome="pass" if g["passed"] else "fail")
        rec.inc("orchestrator_serve_gate_decisions", gate="stage",
                outcome="fail" if stage["decision"] == "rollback" else "pass")
    except Exception as e:  # noqa: BLE001 - metrics never fail a rollout
        log.warning("canary gate metrics not recorded: %s: %s", type(e).__name__, e)


def _record_final(app: str, decision: Decision) -> None:
    try:
        Recorder(SERVE, app=app).inc("orchestrator_serve_gate_decisions", gate="decision", outcome=decision)
    except Exception as e:  # noqa: BLE001 - metrics never fail a rollout
        log.warning("canary gate metrics not recorded: %s: %s", type(e).__name__, e)


class _Stopped(BaseException):
    """Raised in the main thread by the first SIGINT or SIGTERM (see :class:`_StopSignals`)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """While armed, SIGINT and SIGTERM stop the server: the first raises :class:`_Stopped` in the
    main thread, wherever it is (loading, deploying, waiting); later ones are ignored, so the
    cleanup the first starts runs once and to the end. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._armed = False
        self._saved: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._armed = True
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        self._armed = False  # a signal from here on is ignored, not raised past main's return
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self._armed and self.signum is None:
            self.signum = signum
            raise _Stopped(signum)


def _say(text: str, err: bool = False) -> None:
    """Print, where the reader (a pipeline's parent, say) may already be gone."""
    try:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    except OSError:
        pass


def _stop_budget_s() -> float:
    """How long the cleanup may wait for the replicas: under a Ray job, 1 s short of the job's
    stop grace, after which Ray SIGKILLs it; else 30 s."""
    grace = os.environ.get(STOP_WAIT_ENV)
    try:
        return max(1.0, float(grace) - 1.0) if grace else 30.0
    except ValueError:
        return 30.0


def _shut_down(spec: ServeSpec | None, signum: int) -> int:
    """Cleanup after a stop signal: delete this job's application, wait for its replicas."""
    what = signal.Signals(signum).name
    if spec is None or not ray.is_initialized():
        _say(f"{what}: stopped before deploying anything")
        return stopped_exit_code(signum)
    t0 = time.monotonic()
    budget = _stop_budget_s()
    try:
        gone = stop_serving(spec, budget)
    except Exception as e:  # noqa: BLE001 - the scheduler deletes what is left
        _say(f"{what}: deleting Serve application {spec.name!r} failed: {e}", err=True)
        return stopped_exit_code(signum)
    took = time.monotonic() - t0
    _say(f"{what}: deleted Serve application {spec.name!r}; " +
         (f"its replicas are gone ({took:.1f}s of a {budget:g}s budget)" if gone else
          f"its replicas were still stopping after {budget:g}s"))
    return stopped_exit_code(signum)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.serve", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="serve spec YAML (path or storage URL)")
    p.add_argument("--checkpoint", help="served checkpoint URL (default: the spec's checkpoint_url)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 on a cluster)")
    p.add_argument("--detach", action="store_true", help="return after deploying; leave it running")
    args = p.parse_args(argv)
    spec = None
    with _StopSignals():
        try:
            try:
                loaded = load_spec(args.spec)
            except SpecError as e:
                print(e, file=sys.stderr)
                return 2
            if not isinstance(loaded, ServeSpec):
                print(f"{args.spec}: kind is {loaded.kind!r}; jobs.serve needs a serve spec", file=sys.stderr)
                return 2
            spec = loaded
            try:  # the checkpoint (exported if it is a training one) and the spec before Ray
                url, exported = servable_checkpoint(spec, args.checkpoint or spec.checkpoint_url)
                if exported:
                    print(exported, flush=True)
                endpoint = deploy(spec, url, host=args.host)
            except (ServedCheckpointError, SpecError) as e:
                print(e, file=sys.stderr)
                return 2
            print(f"serving {url} at {endpoint}", flush=True)
            print(f"  ingress: {endpoint.note}", flush=True)
            for url in replica_endpoints(spec):
                print(f"  replica (direct ingress): {url}", flush=True)
            if args.detach:
                return 0
            while True:
                time.sleep(3600)  # until SIGINT or SIGTERM raises _Stopped
        except _Stopped as stop:
            return _shut_down(spec, stop.signum)


if __name__ == "__main__":
    sys.exit(main())
