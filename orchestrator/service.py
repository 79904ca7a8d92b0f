"""The scheduler service: each tick reads the store and Ray, asks the policy, and acts through Ray.

One :meth:`Scheduler.tick`, top to bottom:

1. **Observe.** Ray's jobs (``list_jobs``, by submission id) and nodes; the store's unfinished jobs.
   Ray is the truth for capacity: each node's free room is its total less what this store's jobs
   hold less what Ray reports used by anything else (:func:`free_capacity` states the rule).
2. **Reconcile** every job with what Ray says: an admitted job gets its gang reserved as a
   placement group and, once that is placed, has the nodes Ray put it on recorded as its
   placement and is submitted through the Jobs API (the group is released to the job's own
   workers when it starts running); finished Ray jobs finish store
   jobs; failed ones are retried with exponential backoff up to ``max_retries``; preempted train
   jobs are asked to checkpoint and then stopped; Ray jobs no store job owns any more (cancelled,
   superseded attempts) are stopped and stray placement groups removed. A serve job stopped or
   failed leaves no Serve application behind: ``jobs.serve`` deletes its own on SIGTERM (given
   ``serve_stop_grace_s`` before Ray's SIGKILL), and the scheduler deletes one that is left.
3. **Decide** (:func:`orchestrator.policy.decide_with_reasons`, pure, with the teams' quotas as
   the store has them now; a pipeline stage is only offered once its upstream stages succeeded,
   a failed job once its retry backoff has passed)
   and **apply** the decisions: admit, requeue, reject, preempt, shrink/grow (train jobs: a worker
   cap Ray Train's elastic policy honours), and ``request_resources`` for blocked gangs. Why each
   job not admitted waits (the policy's :class:`~orchestrator.policy.Wait`, or ``backoff``) is
   written to the store when it changed, and counted in a metric.
4. **Pipelines**: stages whose upstream failed fail with the reason; a pipeline runs once a stage
   has started and finishes when its stages have.

Every effect is derived from the store's state and every Ray call is idempotent (submission ids
are ``orch-<job>-a<attempt>``, placement groups are named after them), so a scheduler killed at
any point and started again finishes the work it had begun: nothing is lost or run twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol

from orchestrator import pipeline as pipemod
from orchestrator import spec as specmod
from orchestrator import storage
from orchestrator.outcome import retryable
from orchestrator.policy import (WAIT_CODES, Admit, ClusterState, Grow, JobView, Node, PolicyConfig,
                                 Preempt, Quota, Reject, Requeue, RequestResources, Shrink, Wait,
                                 decide_with_reasons)
from orchestrator.store import (WAITING, Deposed, IllegalTransition, JobRecord, JobStore, Lease,
                                UnknownJob)

log = logging.getLogger("orchestrator.scheduler")
LEASE = "scheduler"  # the store's lease row every scheduler process of one store competes for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNFINISHED = ("queued", "admitted", "running", "preempted")
SUBMISSION_PREFIX = "orch-"


class Metrics(Protocol):
    """Callbacks for the scheduler's metrics (``orchestrator.ray_adapter.RayMetrics``)."""

    def on_tick(self, queued: dict[str, int], running: dict[str, int]) -> None: ...
    def on_admit(self, priority: str, wait_s: float) -> None: ...
    def on_preempt(self, priority: str) -> None: ...
    def on_waiting(self, by_reason: dict[str, int]) -> None: ...
    def on_leader(self, holder: str, active: bool) -> None: ...


@dataclass
class SchedulerConfig:
    """Every knob of the service, in one place (the policy's are in ``policy``)."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    quotas: dict[str, Quota] = field(default_factory=dict)  # defaults; the store's quotas win
    autoscale_shapes: tuple[tuple[float, float], ...] = ()  # (cpus, gpus) node types it may add
    python: str = sys.executable          # the cluster's Python (its jobs run ``python -m jobs.X``)
    entrypoint: str = "{python} -m jobs.{kind} {spec}"
    workdir: str = field(default_factory=os.getcwd)  # jobs start here (relative spec paths)
    project_root: str = ROOT              # on every job's PYTHONPATH (workers import the checkout)
    working_dir: str | None = None        # or: upload this directory as the jobs' working_dir
    spec_dir: str = "~/.orchestrator/specs"  # URL where each attempt's resolved spec is written
    retry_backoff_s: float = 10.0         # first retry after this, doubling per failure...
    max_backoff_s: float = 600.0          # ...up to this
    checkpoint_timeout_s: float = 120.0   # a preempted job that has not checkpointed by then stops
    admission_timeout_s: float = 600.0    # an admitted gang Ray has not placed by then requeues
    checkpoint_poll_s: float = 15.0       # how often running train jobs' checkpoints are read
    # A stopped serve job's SIGTERM-to-SIGKILL grace (Ray's own default is 3 s; see ray_adapter):
    # jobs.serve deletes its Serve application and waits for its replicas, which drain for up to
    # their graceful_shutdown_timeout_s (20 s) first.
    serve_stop_grace_s: float = 30.0
    tick_s: float = 2.0
    # High availability: schedulers sharing one store elect one active by a lease in the store
    # (renewed every tick); a standby takes over once it expires (within two lease periods).
    lease_ttl_s: float = 15.0
    scheduler_id: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}")
    # While ticks fail (Ray or the store unreachable) the next try waits tick_s, doubling per
    # failure up to this; the first failure is logged, then one line every outage_log_s.
    reconnect_max_s: float = 30.0
    outage_log_s: float = 600.0
    health_file: str | None = None        # touched after every tick, failed or not (liveness)

    def __post_init__(self):
        for name in ("retry_backoff_s", "max_backoff_s", "checkpoint_timeout_s",
                     "admission_timeout_s", "checkpoint_poll_s", "serve_stop_grace_s",
                     "reconnect_max_s", "outage_log_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"SchedulerConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.tick_s <= 0:
            raise ValueError(f"SchedulerConfig.tick_s must be > 0, got {self.tick_s}")
        if self.lease_ttl_s < 2 * self.tick_s:
            raise ValueError(f"SchedulerConfig.lease_ttl_s must be at least twice tick_s "
                             f"({2 * self.tick_s}s), got {self.lease_ttl_s}: the lease is renewed every tick")
        if "{spec}" not in self.entrypoint:
            raise ValueError(f"SchedulerConfig.entrypoint must contain {{spec}}: {self.entrypoint!r}")
        self.spec_dir = storage.resolve(self.spec_dir)


def parse_submission_id(submission_id: str) -> tuple[str, int] | None:
    """``orch-<job id>-a<attempt>`` -> ``(job id, attempt)``; None for any other id."""
    if not submission_id.startswith(SUBMISSION_PREFIX) or "-a" not in submission_id:
        return None
    body, _, n = submission_id[len(SUBMISSION_PREFIX):].rpartition("-a")
    return (body, int(n)) if body and n.isdigit() else None


class Scheduler:
    """The scheduler over ``store``, acting through ``ray`` (a :class:`RayAdapter` or a fake)."""

    def __init__(self, store: JobStore, ray, config: SchedulerConfig | None = None,
                 metrics: Metrics | None = None, clock=time.time):
        self.store = store
        self.ray = ray
        self.config = config or SchedulerConfig()
        self.metrics = metrics
        self.clock = clock
        self._checkpoint_read: dict[str, float] = {}
        self._requested: list[dict[str, float]] | None = None
        self._events: list[str] = []
        self._serve_checked: set[str] = set()  # ended Ray jobs the Serve safety net has checked
        self._placed: set[str] = set()  # admitted gangs (submission ids) Ray has placed
        self.lease: Lease | None = None  # held while this process is the active scheduler
        self._standby_said: tuple | None = None
        self._beat_failed = False

    # -------------------------------------------------------------------------------- loop
    def run(self, stop: threading.Event | None = None) -> None:
        """Tick every ``tick_s`` until ``stop`` is set, while this process holds the store's
        scheduler lease (:meth:`lead`); standing by otherwise. A tick that cannot reach Ray or the
        store decides nothing (nothing is decided on a partial view) and is retried with capped
        exponential backoff (``reconnect_max_s``); the store keeps every job meanwhile. The
        first failure is logged, then one line every ``outage_log_s`` and one when ticks work
        again. With a :class:`~orchestrator.ray_adapter.RayLink` the retries reconnect to Ray,
        so the service outlives Ray outages of any length. On the way out the lease is released,
        so a standby takes over at its next tick."""
        stop = stop or threading.Event()
        c = self.config
        failures, down_since, logged = 0, 0.0, 0.0
        try:
            while True:
                try:
                    if self.lead():
                        self.tick()
                except Deposed as e:
                    log.warning("%s: standing by", e)
                    self._step_down()
                except Exception as e:  # noqa: BLE001 - the service outlives Ray/store outages
                    now = time.monotonic()
                    failures += 1
                    if failures == 1:
                        down_since = logged = now
                        log.warning("scheduler tick failed: %s; the store keeps every job, retrying "
                                    "with backoff up to %gs (logged again every %gs until it works)",
                                    e, c.reconnect_max_s, c.outage_log_s)
                    elif now - logged >= c.outage_log_s:
                        logged = now
                        log.warning("scheduler ticks still failing after %.0fs (%d tries): %s",
                                    now - down_since, failures, e)
                    else:
                        log.debug("scheduler tick failed (%d): %s", failures, e)
                else:
                    if failures:
                        log.warning("scheduler ticks work again after %.0fs (%d failed)",
                                    time.monotonic() - down_since, failures)
                    failures = 0
                self._beat()
                # backoff stays under the lease: a leader that cannot reach Ray keeps its lease
                # (Ray is down for every scheduler alike), unless the store is down too
                delay = c.tick_s if not failures else \
                    min(max(c.reconnect_max_s, c.tick_s), c.tick_s * 2 ** (failures - 1))
                if self.lease is not None:
                    delay = min(delay, c.lease_ttl_s / 2)
                if stop.wait(delay):
                    return
        finally:
            if self.lease is not None:
                try:
                    self.store.release_lease(self.lease)
                except Exception as e:  # noqa: BLE001 - the lease then expires on its own
                    log.warning("could not release the scheduler lease: %s", e)

    def lead(self) -> bool:
        """Take or renew the store's scheduler lease. True: this process is the active scheduler
        and every store write it makes is fenced by the lease's epoch; False: another holds it."""
        lease = self.store.acquire_lease(LEASE, self.config.scheduler_id, self.config.lease_ttl_s)
        if lease is None:
            held = self.store.lease(LEASE)
            said = (held.holder, held.epoch) if held else None
            if self.lease is not None or said != self._standby_said:
                log.warning("standing by: the active scheduler is %s (epoch %s)",
                            *(said or ("unknown", "-")))
                self._standby_said = said
            self._step_down()
            return False
        if self.lease is None or lease.epoch != self.lease.epoch:
            log.warning("active scheduler %s (lease epoch %d, %.0fs lease renewed every tick)",
                        lease.holder, lease.epoch, self.config.lease_ttl_s)
            self._standby_said = None
            self._requested = None  # a previous leader's autoscaler request is not ours to clear
        self.lease = lease
        self.store.fence(lease)
        if self.metrics is not None:
            self.metrics.on_leader(lease.holder, True)
        return True

    def _step_down(self) -> None:
        self.lease = None
        self.store.fence(None)
        if self.metrics is not None:
            self.metrics.on_leader(self.config.scheduler_id, False)

    def _beat(self) -> None:
        """Touch ``health_file``: the loop is alive (a liveness probe checks its age)."""
        path = self.config.health_file
        if not path:
            return
        try:
            with open(path, "a"):
                os.utime(path)
        except OSError as e:
            if not self._beat_failed:
                log.warning("cannot touch the health file %s: %s", path, e)
            self._beat_failed = True

    def tick(self) -> list[str]:
        """One scheduling cycle. Returns what it did, one line per action."""
        self._events = []
        now = self.clock()
        ray_jobs = self.ray.list_jobs()          # raises before anything changes
        nodes = self.ray.nodes()
        placed = set(self._placed)  # gangs Ray had placed when ``nodes`` was read
        active = self.store.list(UNFINISHED)
        by_id = {j.id: j for j in active}
        self._stop_strays(ray_jobs, by_id)
        for job in active:
            if job.kind != "pipeline":
                self._reconcile(job, ray_jobs.get(job.submission_id), now)
        self._release_stray_reservations()
        try:
            self._delete_left_serve_apps(ray_jobs)
        except Exception as e:  # noqa: BLE001 - retried next tick; scheduling goes on
            log.warning("checking stopped serve jobs' applications: %s", e)
        active = self.store.list(UNFINISHED)
        queue, running, backoff = self._views(active, ray_jobs, now)
        admitted = {j.submission_id: j.id for j in active if j.state == "admitted"}
        self._placed &= set(admitted)
        # Placed in this tick's reconcile: not in the view of ``nodes`` read before it.
        unplaced = {jid for sid, jid in admitted.items()
                    if sid not in placed and sid not in ray_jobs}  # submitted: placed before
        cluster = ClusterState.of(free_capacity(nodes, running, unplaced), self.config.autoscale_shapes)
        decisions, waits = decide_with_reasons(queue, running, cluster, self.quotas(), now,
                                               self.config.policy)
        waits += backoff
        asked = False
        for d in decisions:
            try:
                asked |= self._apply(d, now)
            except (IllegalTransition, UnknownJob) as e:
                self._event(f"skipped {type(d).__name__} of {getattr(d, 'job_id', '-')}: {e}")
            except Exception as e:  # noqa: BLE001 - one job's trouble must not stall the rest
                log.exception("applying %s", d)
                self._event(f"error applying {type(d).__name__} of {getattr(d, 'job_id', '-')}: {e}")
        if not asked and self._requested:
            self.ray.request_resources([])
            self._requested = None
        self._record_waits(active, decisions, waits)
        self._advance_pipelines()
        if self.metrics is not None:
            self._report(self.store.list(UNFINISHED), waits)
        return self._events

    def quotas(self) -> dict[str, Quota]:
        """The teams' quotas this tick: the store's (``orchestrator quota set``, read every tick,
        so a change needs no restart), over ``SchedulerConfig.quotas`` for teams it has none of."""
        return {**self.config.quotas, **self.store.quotas()}

    def _event(self, line: str) -> None:
        self._events.append(line)
        log.info("%s", line)

    # -------------------------------------------------------------------------------- reconcile
    def _reconcile(self, job: JobRecord, rj, now: float) -> None:
        sid = job.submission_id
        try:
            if job.state == "admitted":
                if rj is None:
                    self._launch(job, now)
                elif rj.status == "RUNNING":
                    self.ray.release(sid)
                    self.store.transition(job.id, "running", f"running on Ray as {sid}",
                                          expect="admitted", start_time=now)
                    self._event(f"{job.id} running ({sid})")
                elif not rj.live:
                    self.ray.release(sid)
                    self._finished(job, rj, now)
            elif job.state == "running":
                if rj is None:
                    self._failed(job, f"Ray has no job {sid} any more (cluster restarted?)", now)
                elif rj.live:
                    self._read_checkpoint(job, now)
                    self._enforce_time_limit(job, rj, now)
                else:
                    self._finished(job, rj, now)
            elif job.state == "preempted" and rj is not None:
                if rj.live:
                    self._stop_victim(job, rj, now)
                elif rj.status == "SUCCEEDED":  # it finished before the stop landed
                    self._finished(job, rj, now)
        except (IllegalTransition, UnknownJob) as e:  # cancelled (or moved) meanwhile
            self._event(f"{job.id}: {e}")
        except specmod.SpecError as e:  # stored before a schema change made it invalid
            if job.state in ("admitted", "running"):
                self.ray.stop(sid)
                self.store.transition(job.id, "failed", f"its spec is no longer valid: {e}")
            self._event(f"{job.id}: invalid spec: {e}")
        except Exception as e:  # noqa: BLE001 - retried next tick; the others go on
            log.exception("reconciling %s", job.id)
            self._event(f"{job.id}: error, retrying next tick: {e}")

    def _launch(self, job: JobRecord, now: float) -> None:
        """Reserve the admitted gang; submit the job once Ray has placed it."""
        sid = job.submission_id
        ready = self.ray.reservation_ready(sid)
        if ready is None:
            self.ray.reserve(sid, _bundles(job))
            ready = self.ray.reservation_ready(sid)
        if ready:
            self._record_placement(job)
            self._submit(job)
        elif now - job.updated_time > self.config.admission_timeout_s:
            self.ray.release(sid)
            self.store.transition(job.id, "queued",
                                  f"requeued: Ray did not place its gang of {job.workers} within "
                                  f"{self.config.admission_timeout_s:g}s", expect="admitted")
            self._event(f"{job.id} requeued: gang not placed in time")

    def _record_placement(self, job: JobRecord) -> None:
        """Store where Ray put the placed gang (node -> workers), not where the policy planned it:
        free capacity, preemption and shrink then count what the job really holds on each node."""
        self._placed.add(job.submission_id)
        placed = self.ray.reservation_placement(job.submission_id)
        if placed and placed != job.placement:
            self.store.update(job.id, placement=placed)
            self._event(f"{job.id} placed by Ray on {_nodes_line(placed)} "
                        f"(the policy planned {_nodes_line(job.placement)})")

    def _submit(self, job: JobRecord) -> None:
        spec = job.load()
        run = pipemod.prepare_stage(spec, self._upstream(job) if job.parent_id else {},
                                    python=self.config.python)
        if isinstance(spec, specmod.TrainSpec):
            from orchestrator.control import JobControl
            control = JobControl(spec.checkpoint.url, spec.storage.as_options())
            control.clear()  # requests to an earlier attempt do not apply to this one
            control.set_max_workers(job.workers)  # grow only when the policy says so
        spec_url = self._write_spec(job, run.spec)
        entry = self._entrypoint(job.kind, spec_url, run)
        meta = {"orchestrator_job": job.id, "attempt": str(job.attempts), "kind": job.kind,
                "team": job.team, "priority": job.priority, "workers": str(job.workers)}
        env = {"working_dir": self.config.working_dir} if self.config.working_dir else None
        grace = {"stop_grace_s": self.config.serve_stop_grace_s} if job.kind == "serve" else {}
        new = self.ray.submit(job.submission_id, entry, runtime_env=env, metadata=meta, **grace)
        self._event(f"{job.id} submitted to Ray as {job.submission_id} on {job.workers} worker(s)"
                    + ("" if new else " (already there)"))

    def _write_spec(self, job: JobRecord, spec) -> str:
        st = storage.Storage(self.config.spec_dir)
        name = f"{job.submission_id}.json"
        st.write_text(name, json.dumps(spec.model_dump(mode="json"), indent=1))
        return st.url(name)

    def _entrypoint(self, kind: str, spec_url: str, run: pipemod.StageRun) -> str:
        """A shell command: cd to the workdir, export PYTHONPATH and the stage's env, run the
        stage's ``before`` commands, then exec the job's entrypoint."""
        c = self.config
        py = shlex.quote(c.python)
        exports = [f"{k}={shlex.quote(v)}" for k, v in run.env.items()]
        parts = []
        if not c.working_dir:
            parts.append(f"cd {shlex.quote(c.workdir)}")
            exports.insert(0, f"PYTHONPATH={shlex.quote(c.project_root)}${{PYTHONPATH:+:$PYTHONPATH}}")
        if exports:
            parts.append("export " + " ".join(exports))
        for argv in run.before:
            argv = [c.python, *argv[1:]] if argv and argv[0] == "python" else argv
            parts.append(" ".join(shlex.quote(a) for a in argv))
        parts.append("exec " + c.entrypoint.format(python=py, kind=kind, spec=shlex.quote(spec_url)))
        return " && ".join(parts)

    def _upstream(self, job: JobRecord) -> dict[str, str | None]:
        sib = {s.stage: s for s in self.store.list(parent_id=job.parent_id)}
        return {d: sib[d].checkpoint_url for d in job.depends_on if d in sib}

    def _finished(self, job: JobRecord, rj, now: float) -> None:
        if rj.status == "SUCCEEDED":
            url, step, at = self._result_checkpoint(job)
            fields = {k: v for k, v in (("checkpoint_url", url), ("checkpoint_step", step),
                                        ("checkpoint_time", at)) if v is not None}
            self.store.transition(job.id, "succeeded", f"Ray job {job.submission_id} succeeded",
                                  expect=job.state, **fields)
            self._event(f"{job.id} succeeded" + (f" (checkpoint {url})" if url else ""))
        elif rj.status == "STOPPED":
            self.store.transition(job.id, "cancelled", f"Ray job {job.submission_id} was stopped "
                                  "outside the orchestrator (ray job stop)", expect=job.state)
            self._event(f"{job.id} cancelled: stopped outside the orchestrator")
        elif not retryable(rj.exit_code):
            message = " ".join(f"Ray job {job.submission_id} failed: {rj.message}".split())[:400]
            self.store.transition(job.id, "failed", f"not retried (exit code {rj.exit_code}: it would "
                                  f"fail the same way): {message}", expect=job.state)
            self._event(f"{job.id} failed, not retried: {message}")
        else:
            self._failed(job, f"Ray job {job.submission_id} failed: {rj.message}", now)

    def _result_checkpoint(self, job: JobRecord):
        try:
            return pipemod.stage_checkpoint(job.load(), lambda: self.ray.logs(job.submission_id))
        except Exception as e:  # noqa: BLE001 - a finished job stays finished without it
            log.warning("%s: cannot find its checkpoint: %s", job.id, e)
            return None, None, None

    def retries_used(self, job: JobRecord) -> tuple[int, float | None]:
        """``(retries so far, when the latest was queued)``, from the job's history."""
        retries = [t for t in self.store.history(job.id)
                   if t.to_state == "queued" and t.reason.startswith("retry ")]
        return len(retries), (retries[-1].at if retries else None)

    def _backoff(self, retry: int) -> float:
        return min(self.config.max_backoff_s, self.config.retry_backoff_s * 2 ** max(0, retry - 1))

    def _failed(self, job: JobRecord, message: str, now: float) -> None:
        message = " ".join(message.split())[:400]
        used, _ = self.retries_used(job)
        if used < job.max_retries:
            wait = self._backoff(used + 1)
            self.store.transition(job.id, "queued", f"retry {used + 1}/{job.max_retries} after "
                                  f"{wait:g}s backoff: {message}", expect=job.state,
                                  attempts=job.attempts + 1)
            self._event(f"{job.id} failed; retry {used + 1}/{job.max_retries} in {wait:g}s")
        else:
            self.store.transition(job.id, "failed", f"gave up after {used} retr"
                                  f"{'y' if used == 1 else 'ies'} (max_retries={job.max_retries}): "
                                  f"{message}", expect=job.state)
            self._event(f"{job.id} failed for good: {message}")

    def _backoff_wait(self, job: JobRecord, now: float) -> Wait | None:
        """Why a failed job is not offered to the policy yet (its retry delay), or None."""
        if job.attempts == 0:
            return None
        used, at = self.retries_used(job)
        if at is None or now >= at + self._backoff(used):
            return None
        until = datetime.fromtimestamp(at + self._backoff(used), timezone.utc)
        return Wait(job.id, "backoff", f"until {until:%Y-%m-%d %H:%M:%S} UTC: retry {used}/"
                                       f"{job.max_retries} after a failure, {self._backoff(used):g}s backoff")

    def _read_checkpoint(self, job: JobRecord, now: float) -> None:
        """Keep a running train job's newest checkpoint in the store (the policy preempts the
        freshest-checkpointed victims first)."""
        if job.kind != "train" or now - self._checkpoint_read.get(job.id, -1e18) < self.config.checkpoint_poll_s:
            return
        self._checkpoint_read[job.id] = now
        spec = job.load()
        from orchestrator.control import latest_commit
        try:
            c = latest_commit(spec.checkpoint.url, spec.storage.as_options())
        except storage.StorageError:
            return
        if c is not None and c.step != job.checkpoint_step:
            self.store.update(job.id, checkpoint_url=c.url, checkpoint_step=c.step,
                              checkpoint_time=c.committed_at)

    def _stop_victim(self, job: JobRecord, rj, now: float) -> None:
        """A preempted job still running: a train job checkpoints first (up to
        ``checkpoint_timeout_s``), then Ray stops it. Idempotent across ticks and restarts."""
        why = self._checkpoint_before_stop(job, rj, now, "preempt", since=job.updated_time)
        if why is not None and self.ray.stop(job.submission_id):
            self._event(f"{job.id} preempted: {why}; Ray job {job.submission_id} stopped")

    def _checkpoint_before_stop(self, job: JobRecord, rj, now: float, purpose: str,
                                since: float) -> str | None:
        """Ask a running train job for a checkpoint (request ``<submission id>:<purpose>``) and
        record it in the store once served. Returns what happened ("checkpointed at step N", or
        that none came within ``checkpoint_timeout_s`` of ``since``) once the job may be stopped;
        None while the checkpoint is still awaited. Other kinds may stop at once."""
        if job.kind != "train" or rj.status != "RUNNING":
            return "stopping"
        spec = job.load()
        from orchestrator.control import JobControl, latest_commit
        control = JobControl(spec.checkpoint.url, spec.storage.as_options())
        req = f"{job.submission_id}:{purpose}"
        control.request_checkpoint(req)
        step = control.checkpoint_served(req)
        if step is None and now - since < self.config.checkpoint_timeout_s:
            return None
        c = latest_commit(spec.checkpoint.url, spec.storage.as_options())
        if c is not None:
            self.store.update(job.id, checkpoint_url=c.url, checkpoint_step=c.step,
                              checkpoint_time=c.committed_at)
        return (f"checkpointed at step {step}" if step is not None else
                f"no checkpoint within {self.config.checkpoint_timeout_s:g}s, stopping anyway")

    def _enforce_time_limit(self, job: JobRecord, rj, now: float) -> None:
        """A run past its ``scheduling.time_limit`` checkpoints (train jobs, up to
        ``checkpoint_timeout_s``) and is stopped; the job fails with the reason and is not retried
        (another run would be stopped the same way). Resubmitted with a longer limit and the same
        ``checkpoint.url``, a train job resumes from that checkpoint."""
        limit = job.time_limit
        if limit is None or job.start_time is None or now - job.start_time <= limit:
            return
        why = self._checkpoint_before_stop(job, rj, now, "time-limit", since=job.start_time + limit)
        if why is None:
            return
        self.ray.stop(job.submission_id)
        ran = now - job.start_time
        self.store.transition(job.id, "failed", f"time limit reached: ran {_duration(ran)}, limit "
                              f"{_duration(limit)} (scheduling.time_limit); {why}; Ray job "
                              f"{job.submission_id} stopped; not retried (another run would be "
                              "stopped the same way): resubmit with a longer limit to continue",
                              expect="running")
        self._event(f"{job.id} stopped at its time limit ({_duration(limit)}): {why}")

    def _stop_strays(self, ray_jobs: dict, by_id: dict[str, JobRecord]) -> None:
        """Stop live Ray jobs of this store that no unfinished job owns (cancelled jobs,
        superseded attempts). Ray jobs of other stores are left alone."""
        for sid, rj in ray_jobs.items():
            parsed = parse_submission_id(sid)
            if not rj.live or parsed is None:
                continue
            job = by_id.get(parsed[0])
            if job is None:
                try:
                    job = self.store.get(parsed[0])
                except UnknownJob:
                    continue
            if job.state in ("admitted", "running", "preempted") and job.submission_id == sid:
                continue
            if self.ray.stop(sid):
                self._event(f"stopped Ray job {sid}: job {job.id} is {job.state}"
                            + ("" if job.submission_id == sid else f" (now {job.submission_id})"))

    def _delete_left_serve_apps(self, ray_jobs: dict) -> None:
        """Safety net behind ``jobs.serve``'s own cleanup on SIGTERM: once a serve job of this
        store has ended STOPPED (cancelled, preempted) or FAILED, its Serve application (named
        after its spec) must be gone; delete it if it is not, unless a live Ray job of this store
        serves an application of that name (the job's next attempt). Each ended Ray job is
        checked once per scheduler process."""
        ended = []
        for sid, rj in ray_jobs.items():
            if sid in self._serve_checked or rj.status not in ("STOPPED", "FAILED"):
                continue
            app = self._serve_app(sid, rj)
            if app is None:
                self._serve_checked.add(sid)
            else:
                ended.append((sid, app))
        if not ended:
            return
        live = {self._serve_app(sid, rj) for sid, rj in ray_jobs.items() if rj.live}
        apps = self.ray.serve_apps()
        for sid, app in ended:
            if app in apps and app not in live:
                self.ray.delete_serve_app(app)
                apps.discard(app)
                self._event(f"deleted Serve application {app!r} that Ray job {sid} left behind")
            self._serve_checked.add(sid)

    def _serve_app(self, sid: str, rj) -> str | None:
        """The Serve application of this store's serve job behind Ray job ``sid``, else None."""
        parsed = parse_submission_id(sid)
        if parsed is None or rj.metadata.get("kind", "serve") != "serve":
            return None
        try:
            job = self.store.get(parsed[0])
            return job.load().name if job.kind == "serve" else None
        except (UnknownJob, specmod.SpecError):
            return None  # another store's job, or one whose spec no longer loads

    def _release_stray_reservations(self) -> None:
        """Remove placement groups of this store's jobs that are no longer being launched."""
        keep = {j.submission_id for j in self.store.list(["admitted"])}
        for name in self.ray.reservations():
            parsed = parse_submission_id(name)
            if name in keep or parsed is None:
                continue
            try:
                self.store.get(parsed[0])
            except UnknownJob:
                continue  # another store's scheduler on the same cluster
            self.ray.release(name)

    # -------------------------------------------------------------------------------- pipelines
    def _advance_pipelines(self) -> None:
        for parent in self.store.list(UNFINISHED, top_level=True):
            if parent.kind != "pipeline":
                continue
            try:
                self._advance_pipeline(parent)
            except (IllegalTransition, UnknownJob) as e:
                self._event(f"{parent.id}: {e}")

    def _advance_pipeline(self, parent: JobRecord) -> None:
        stages = self.store.list(parent_id=parent.id)
        state = {s.stage: s.state for s in stages}
        reason = {s.stage: s.reason for s in stages}
        changed = True
        while changed:  # failures propagate down the whole DAG in one tick
            changed = False
            for s in stages:
                if state[s.stage] != "queued":
                    continue
                status, why = pipemod.stage_status(s.depends_on, state, reason)
                if status == "blocked":
                    self.store.transition(s.id, "failed", why, expect="queued")
                    state[s.stage], reason[s.stage] = "failed", why
                    self._event(f"{s.id} {why}")
                    changed = True
        if parent.state == "queued" and any(st != "queued" for st in state.values()):
            started = [n for n, st in state.items() if st != "queued"]
            parent = self.store.transition(parent.id, "admitted", f"stage(s) {', '.join(started)} "
                                           "started", expect="queued")
            parent = self.store.transition(parent.id, "running", "running its stages",
                                           expect="admitted")
        outcome = pipemod.pipeline_outcome({n: (state[n], reason[n]) for n in state})
        if outcome is not None:
            final, why = outcome
            if parent.state == "queued" and final == "succeeded":  # unreachable; stay legal
                return
            self.store.transition(parent.id, final, why, expect=parent.state)
            self._event(f"pipeline {parent.id} {final}: {why}")

    def _stage_status(self, job: JobRecord, states: dict[str, dict[str, str]]) -> tuple[str, str]:
        """A pipeline stage's :func:`orchestrator.pipeline.stage_status` (siblings read once per
        pipeline per tick into ``states``)."""
        sib = states.get(job.parent_id)
        if sib is None:
            sib = {s.stage: s.state for s in self.store.list(parent_id=job.parent_id)}
            states[job.parent_id] = sib
        return pipemod.stage_status(job.depends_on, sib)

    # -------------------------------------------------------------------------------- policy
    def _views(self, active: list[JobRecord], ray_jobs: dict, now: float):
        """The policy's queue and running jobs, and the waits of jobs held back from it."""
        queue: list[JobView] = []
        running: list[JobView] = []
        held: list[Wait] = []
        stage_states: dict[str, dict[str, str]] = {}
        for j in active:
            if j.kind == "pipeline":
                continue
            v = j.view(now)
            if j.state == "queued":
                if j.parent_id:
                    status, why = self._stage_status(j, stage_states)
                    if status != "ready":  # "blocked" ones fail in _advance_pipelines
                        if status == "waiting":
                            held.append(Wait(j.id, "upstream", why))
                        continue
                w = self._backoff_wait(j, now)
                if w is not None:
                    held.append(w)
                    continue
                queue.append(v)
            elif j.state == "preempted":
                rj = ray_jobs.get(j.submission_id)
                if rj is not None and rj.live:  # still stopping: its capacity is about to free
                    running.append(dataclasses.replace(v, stopping=True, target_workers=0))
                else:
                    queue.append(v)
            elif j.workers > 0:
                if j.kind != "train":  # only train jobs resize in place (Ray Train elastic)
                    v = dataclasses.replace(v, min_workers=j.workers, max_workers=j.workers,
                                            allowed=None)
                running.append(v)
        return queue, running, held

    def _record_waits(self, active: list[JobRecord], decisions, waits: list[Wait]) -> None:
        """Store each waiting job's reason where it changed (one write per change, none per tick
        otherwise). Admitted and rejected jobs are left to their transition, which sets it."""
        acted = {d.job_id for d in decisions if isinstance(d, (Admit, Reject))}
        want = {w.job_id: (w.code, w.detail) for w in waits}
        changes = {j.id: want.get(j.id) for j in active
                   if j.state in WAITING and j.kind != "pipeline" and j.id not in acted
                   and want.get(j.id) != ((j.wait_reason, j.wait_detail) if j.wait_reason else None)}
        try:
            self.store.set_waits(changes)
        except Exception as e:  # noqa: BLE001 - a reason not shown must not stop scheduling
            log.warning("could not record why jobs wait: %s", e)

    def _apply(self, d, now: float) -> bool:
        """Act on one decision; True if it was an autoscaler request."""
        if isinstance(d, RequestResources):
            if d.bundles != self._requested:
                self.ray.request_resources(d.bundles)
                self._event(f"asked the autoscaler for {len(d.bundles)} bundle(s)")
            self._requested = d.bundles
            return True
        job = self.store.get(d.job_id)
        if isinstance(d, Reject):
            self.store.transition(job.id, "failed", f"rejected: {d.reason}", expect="queued",
                                  wait_reason="never_fits", wait_detail=d.reason, wait_since=now)
            self._event(f"{job.id} rejected: {d.reason}")
        elif isinstance(d, Requeue):
            self.store.transition(job.id, "queued", f"requeued: {d.reason}", expect="preempted",
                                  attempts=job.attempts + 1)
            self._event(f"{job.id} requeued after preemption")
        elif isinstance(d, Admit):
            waited = now - self._queued_since(job)
            job = self.store.transition(
                job.id, "admitted", f"admitted on {d.workers} worker(s) after {waited:.0f}s",
                expect="queued", workers=d.workers, placement=d.placement,
                ray_submission_id=job.submission_id)
            self._event(f"{job.id} admitted on {d.workers} worker(s)")
            if self.metrics is not None:
                self.metrics.on_admit(job.priority, waited)
            self._launch(job, now)
        elif isinstance(d, Preempt):
            self.store.transition(job.id, "preempted", f"preempted {d.reason}", expect="running",
                                  workers=job.workers, placement=job.placement)
            self._event(f"{job.id} preempted {d.reason}")
            if self.metrics is not None:
                self.metrics.on_preempt(job.priority)
            if job.kind != "train":
                self.ray.stop(job.submission_id)
            else:
                self._stop_victim(self.store.get(job.id), _Live(), now)
        elif isinstance(d, (Shrink, Grow)):
            self._resize(job, d, now)
        return False

    def _resize(self, job: JobRecord, d, now: float) -> None:
        """Shrink or grow a running train job: checkpoint, then cap its workers; Ray Train's
        elastic policy restarts the group on the new size from that checkpoint."""
        from orchestrator.control import JobControl
        spec = job.load()
        control = JobControl(spec.checkpoint.url, spec.storage.as_options())
        req = f"{job.submission_id}:resize-{d.to_workers}-{int(now)}"
        control.request_checkpoint(req)
        control.set_max_workers(d.to_workers, checkpoint_first=req)
        placement = dict(job.placement)
        if isinstance(d, Shrink):
            for n, w in d.release.items():
                placement[n] = placement.get(n, 0) - w
            why = f"shrinking to {d.to_workers} worker(s) {d.reason}"
        else:
            for n, w in d.placement.items():
                placement[n] = placement.get(n, 0) + w
            why = f"growing to {d.to_workers} worker(s) into idle capacity"
        self.store.update(job.id, workers=d.to_workers,
                          placement={n: w for n, w in placement.items() if w > 0}, reason=why)
        self._event(f"{job.id} {why}")

    def _queued_since(self, job: JobRecord) -> float:
        hist = self.store.history(job.id)
        at = [t.at for t in hist if t.to_state == "queued"]
        return at[-1] if at else job.submit_time

    def _report(self, active: list[JobRecord], waits: list[Wait]) -> None:
        classes = tuple(specmod.PRIORITY_CLASSES)
        queued = Counter(j.priority for j in active if j.kind != "pipeline"
                         and j.state in ("queued", "preempted"))
        running = Counter(j.priority for j in active if j.kind != "pipeline"
                          and j.state in ("admitted", "running"))
        self.metrics.on_tick({c: queued.get(c, 0) for c in classes},
                             {c: running.get(c, 0) for c in classes})
        by_reason = Counter(w.code for w in waits)
        self.metrics.on_waiting({code: by_reason.get(code, 0) for code in WAIT_CODES})


class _Live:
    """Stand-in Ray status for a job preempted this tick (it was running a moment ago)."""
    status = "RUNNING"
    live = True


def _duration(seconds: float) -> str:
    """``95`` -> ``1m35s``; ``7200`` -> ``2h``: how long, for people."""
    s = int(round(seconds))
    parts = [(s // 86400, "d"), (s // 3600 % 24, "h"), (s // 60 % 60, "m"), (s % 60, "s")]
    return "".join(f"{n}{u}" for n, u in parts if n) or "0s"


def _bundles(job: JobRecord) -> list[dict[str, float]]:
    b = {"CPU": job.cpus_per_worker}
    if job.gpus_per_worker:
        b["GPU"] = job.gpus_per_worker
    return [dict(b) for _ in range(max(1, job.workers))]


def free_capacity(nodes: list[Node], running: list[JobView],
                  unplaced: set[str] = frozenset()) -> list[Node]:
    """The policy's view of ``nodes``: each node's total, less what this store's jobs hold there,
    less what Ray says is used there by anything else.

    ``nodes`` come from Ray (:meth:`RayAdapter.nodes`): totals, and as ``free_*`` what Ray reports
    available, which counts everything: actors and jobs started outside this scheduler, other
    schedulers' jobs, and this scheduler's own placement groups and workers. Per node and resource:

    - *booked*: what ``running`` (jobs holding capacity: admitted, running, stopping) hold there
      by their recorded placements;
    - *claimed*: the part of *booked* Ray can already be using: all of it but the gangs of the
      admitted jobs in ``unplaced`` (ids), whose placement groups Ray had not placed (as far as
      the scheduler knows) when ``nodes`` were read;
    - *outside* = max(0, (total - Ray's available) - *claimed*): work this scheduler did not start;
    - free = max(0, total - *booked* - *outside*).

    So a just-admitted gang is counted once (booked, not yet in Ray's view), a placed gang once
    (claimed against Ray's use of it), and a job's Ray use beyond its booking on a node (its
    workers placed elsewhere, extra actors) counts as outside, erring towards less free.
    """
    booked: dict[str, list[float]] = {}
    claimed: dict[str, list[float]] = {}
    for r in running:
        for n, w in r.placement.items():
            for into in (booked, claimed) if r.id not in unplaced else (booked,):
                u = into.setdefault(n, [0.0, 0.0])
                u[0] += w * r.cpus_per_worker
                u[1] += w * r.gpus_per_worker
    out = []
    for n in nodes:
        b, c = booked.get(n.id, (0.0, 0.0)), claimed.get(n.id, (0.0, 0.0))
        free = [max(0.0, total - b[i] - max(0.0, (total - available) - c[i]))
                for i, (total, available) in enumerate(((n.cpus, n.free_cpus), (n.gpus, n.free_gpus)))]
        out.append(Node(n.id, n.cpus, n.gpus, *free))
    return out


def _nodes_line(placement: dict[str, int]) -> str:
    return ", ".join(f"{n[:12]} x{w}" for n, w in sorted(placement.items())) or "no node"
