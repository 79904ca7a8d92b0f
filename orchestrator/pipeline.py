"""Pipelines: stages run in dependency order, each handed the checkpoints of the stages before it.

The store keeps one job per stage (``parent_id`` = the pipeline job, ``depends_on`` = stage names)
and the scheduler service gang-schedules every stage as a job of its own; ``python -m
jobs.pipeline`` runs the same stages one after another without the scheduler. Both use the plain
functions here:

* :func:`stage_status` - may a stage start, must it wait, or is it blocked by a failed upstream?
* :func:`prepare_stage` - the stage's spec and commands, given its upstream checkpoints. A serve
  stage serves its upstream's checkpoint (a training checkpoint is exported to the served format
  first, by ``orchestrator export`` in the stage's own Ray job); every stage also gets
  ``ORCHESTRATOR_UPSTREAM_CHECKPOINTS`` (JSON, stage name -> URL) in its environment.
* :func:`reported_checkpoint` / :func:`stage_checkpoint` - the checkpoint a finished stage left.
* :func:`pipeline_outcome` - the pipeline's own state once its stages are done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from orchestrator import spec as specmod
from orchestrator import storage

UPSTREAM_ENV = "ORCHESTRATOR_UPSTREAM_CHECKPOINTS"
_STOPPED = ("failed", "cancelled")


@dataclass(frozen=True)
class StageRun:
    """What to run for one stage: its (possibly rewritten) spec, commands to run before the
    stage's entrypoint (argv lists, module names relative to the project), and extra env."""
    spec: Any
    before: list[list[str]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


def stage_status(depends_on: list[str], states: Mapping[str, str],
                 reasons: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``("ready" | "waiting" | "blocked", why)`` for a stage whose upstream stages are in
    ``states`` (stage name -> job state)."""
    for dep in depends_on:
        st = states.get(dep)
        if st in _STOPPED:
            why = (reasons or {}).get(dep, "")
            return "blocked", f"not run: upstream stage {dep!r} {st}" + (f" ({why})" if why else "")
    waiting = [d for d in depends_on if states.get(d) != "succeeded"]
    if waiting:
        return "waiting", f"waiting for stage(s) {', '.join(waiting)}"
    return "ready", "upstream stages succeeded"


def prepare_stage(spec, upstream: Mapping[str, str | None], *, python: str = "python",
                  storage_options: dict[str, Any] | None = None) -> StageRun:
    """The run of a stage whose upstream stages left ``upstream`` (stage name -> checkpoint URL,
    in dependency order). A serve stage with an upstream checkpoint serves the last one."""
    ckpts = {k: v for k, v in upstream.items() if v}
    env = {UPSTREAM_ENV: json.dumps(ckpts, sort_keys=True)} if ckpts else {}
    if not isinstance(spec, specmod.ServeSpec) or not ckpts:
        return StageRun(spec, [], env)
    src = list(ckpts.values())[-1]
    opts = storage_options if storage_options is not None else spec.storage.as_options()
    if is_served_checkpoint(src, opts):
        return StageRun(specmod.with_overrides(spec, {"checkpoint_url": src}), [], env)
    out = served_location(src)
    export = [python, "-m", "orchestrator", "export", src, out]
    if spec.storage.endpoint_url:
        export += ["--endpoint-url", spec.storage.endpoint_url]
    return StageRun(specmod.with_overrides(spec, {"checkpoint_url": out}), [export], env)


def served_location(train_checkpoint: str) -> str:
    """Where a training checkpoint ``.../step-N`` is exported for serving: ``.../served/step-N``
    (outside the ``step-*`` names, so checkpoint retention never touches it)."""
    base = train_checkpoint.rstrip("/")
    return storage.join(storage.parent(base), "served", storage.basename(base))


def is_served_checkpoint(url: str, storage_options: dict[str, Any] | None = None) -> bool:
    try:
        return storage.Storage(url, storage_options).exists("model.json")
    except storage.StorageError:
        return False


def training_step(url: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The committed training checkpoint ``url`` names: ``url`` itself for a ``step-N`` directory
    with a manifest, the newest such directory for a checkpoint root; None where it is neither
    (manifests are not verified here: the export does that)."""
    from orchestrator.control import MANIFEST, STEP_RE, latest_commit
    try:
        if STEP_RE.match(storage.basename(url.rstrip("/"))):
            return url if storage.Storage(url, storage_options).exists(MANIFEST) else None
        commit = latest_commit(url, storage_options)
    except storage.StorageError:
        return None
    return commit.url if commit else None


def reported_checkpoint(logs: str) -> str | None:
    """The checkpoint a job printed as its last JSON line: ``served`` (tune's exported best),
    ``checkpoint`` (train), or ``best.checkpoint_url``."""
    for line in reversed(logs.splitlines()):
        line = line.strip()
        if not (line.startswith("{") and line.endswith("}")):
            continue
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        best = d.get("best") if isinstance(d.get("best"), dict) else {}
        for v in (d.get("served"), d.get("checkpoint"), best.get("checkpoint_url")):
            if isinstance(v, str) and v:
                return v
    return None


def stage_checkpoint(spec, logs: str | Callable[[], str] | None
                     ) -> tuple[str | None, int | None, float | None]:
    """``(url, step, time)`` of the checkpoint a finished job left: a train job's newest committed
    checkpoint in storage, else what the job reported in its logs (``logs`` may be a callable,
    called only then)."""
    if isinstance(spec, specmod.TrainSpec):
        from orchestrator.control import latest_commit
        try:
            c = latest_commit(spec.checkpoint.url, spec.storage.as_options())
        except storage.StorageError:
            c = None
        if c is not None:
            return c.url, c.step, c.committed_at
    if callable(logs):
        logs = logs()
    url = reported_checkpoint(logs or "")
    return url, None, None


def pipeline_outcome(stages: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """The pipeline's final ``(state, reason)`` once every stage is finished, else None.
    ``stages``: stage name -> (state, reason)."""
    if any(st not in ("succeeded", "failed", "cancelled") for st, _ in stages.values()):
        return None
    failed = [(n, r) for n, (st, r) in stages.items() if st == "failed" and not r.startswith("not run")]
    if failed:
        n, r = failed[0]
        return "failed", f"stage {n!r} failed: {r}"
    skipped = [n for n, (st, r) in stages.items() if st == "failed"]
    if skipped:
        return "failed", f"stage(s) {', '.join(skipped)} not run"
    if any(st == "cancelled" for st, _ in stages.values()):
        return "cancelled", "stage(s) cancelled"
    return "succeeded", f"all {len(stages)} stage(s) succeeded"
