"""The durable job store (DESIGN invariant 7): the truth about every job, outliving every process.

A SQLite file by default; any SQLAlchemy URL for a shared cluster: ``postgresql://...`` uses psycopg 3
(the ``postgres`` extra).
Tables: ``jobs`` (one row per job, the resolved spec and what the scheduler knows of it),
``transitions`` (every state change with its reason), ``quotas`` (one row per team: its cohort,
guaranteed and maximum CPUs and GPUs; read by the scheduler every tick), ``leases`` (which
scheduler process is active, with an epoch that fences a deposed one's writes) and
``schema_version``.

State changes go through :meth:`JobStore.transition`, which enforces :data:`LEGAL` and is a
compare-and-set on the current state, so two scheduler processes can never both move a job.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import sqlalchemy as sa
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError, SQLAlchemyError

from orchestrator import spec as specmod
from orchestrator.batch import BatchPlan
from orchestrator.policy import JobView, Quota

SCHEMA_VERSION = 1
STATES = ("queued", "admitted", "running", "preempted", "succeeded", "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"admitted", "running"})
# from-state -> states it may move to. Retries go running/admitted -> queued (attempts += 1).
LEGAL: dict[str, frozenset[str]] = {
    "queued": frozenset({"admitted", "cancelled", "failed"}),  # failed: rejected / dependency failed
    "admitted": frozenset({"running", "queued", "preempted", "failed", "cancelled", "succeeded"}),
    "running": frozenset({"succeeded", "failed", "preempted", "queued", "cancelled"}),
    "preempted": frozenset({"queued", "cancelled", "succeeded"}),  # succeeded: done before the stop
    "succeeded": frozenset(),
    "failed": frozenset(),
    "cancelled": frozenset(),
}
DEFAULT_URL = "~/.orchestrator/jobs.db"


class StoreError(RuntimeError):
    """Base of the store's errors; every message names the job id or the store URL."""


class UnknownJob(StoreError, KeyError):
    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class IllegalTransition(StoreError):
    def __init__(self, job_id: str, current: str, new: str, why: str = ""):
        self.job_id, self.current, self.new = job_id, current, new
        allowed = ", ".join(sorted(LEGAL.get(current, ()))) or "nothing (it is finished)"
        super().__init__(why or f"job {job_id!r} is {current}; it cannot become {new} "
                                f"(from {current} it may become: {allowed})")


class UnknownQuota(StoreError, KeyError):
    def __init__(self, team: str):
        self.team = team
        super().__init__(f"team {team!r} has no quota")

    def __str__(self) -> str:
        return self.args[0]


class InvalidQuota(StoreError, ValueError):
    """A quota value the store refuses; ``field`` names it. Nothing is written."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(message)


def redacted(url: str) -> str:
    """The store URL as it may be shown or logged: a password in it becomes ``***``."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a database URL: nothing to hide that we could parse
        return url


class StoreUnavailable(StoreError):
    def __init__(self, url: str, reason: str):
        self.url = url
        super().__init__(f"cannot open job store {redacted(url)!r}: {reason}")


class Deposed(StoreError):
    """A fenced write by a process that no longer holds its lease (another took over): refused,
    nothing written."""

    def __init__(self, name: str, holder: str, epoch: int, now_holder: str | None, now_epoch: int | None):
        self.name, self.holder, self.epoch = name, holder, epoch
        super().__init__(f"lease {name!r}: {holder} (epoch {epoch}) was deposed by {now_holder} "
                         f"(epoch {now_epoch}); its write was refused")


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    epoch: int
    expires: float


metadata = sa.MetaData()
jobs_t = sa.Table(
    "jobs", metadata,
    sa.Column("id", sa.String(80), primary_key=True),
    sa.Column("name", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("team", sa.String(64), nullable=False),
    sa.Column("priority", sa.String(16), nullable=False),
    sa.Column("state", sa.String(16), nullable=False, index=True),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("spec", sa.Text, nullable=False),  # resolved spec, JSON
    sa.Column("min_workers", sa.Integer, nullable=False),
    sa.Column("max_workers", sa.Integer, nullable=False),
    sa.Column("cpus_per_worker", sa.Float, nullable=False),
    sa.Column("gpus_per_worker", sa.Float, nullable=False),
    sa.Column("preemptible", sa.Boolean, nullable=False),
    sa.Column("max_retries", sa.Integer, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("workers", sa.Integer, nullable=False, default=0),
    sa.Column("placement", sa.Text, nullable=False, default="{}"),  # node id -> workers, JSON
    sa.Column("ray_submission_id", sa.String(128)),
    sa.Column("checkpoint_url", sa.Text),
    sa.Column("checkpoint_step", sa.Integer),
    sa.Column("checkpoint_time", sa.Float),
    sa.Column("parent_id", sa.String(80), sa.ForeignKey("jobs.id"), index=True),
    sa.Column("stage", sa.String(64)),
    sa.Column("depends_on", sa.Text, nullable=False, default="[]"),  # sibling stage names, JSON
    sa.Column("submit_time", sa.Float, nullable=False),
    sa.Column("start_time", sa.Float),
    sa.Column("end_time", sa.Float),
    sa.Column("updated_time", sa.Float, nullable=False),
    # Why a queued job waits (orchestrator.policy.WAIT_CODES), what exactly, and since when;
    # NULL while it is not waiting. Added after schema 1: see _add_columns.
    sa.Column("wait_reason", sa.String(32)),
    sa.Column("wait_detail", sa.Text),
    sa.Column("wait_since", sa.Float),
)
transitions_t = sa.Table(
    "transitions", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(80), sa.ForeignKey("jobs.id"), nullable=False, index=True),
    sa.Column("from_state", sa.String(16)),
    sa.Column("to_state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("at", sa.Float, nullable=False),
)
schema_t = sa.Table("schema_version", metadata, sa.Column("version", sa.Integer, nullable=False))
leases_t = sa.Table(
    "leases", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(200), nullable=False),
    sa.Column("epoch", sa.Integer, nullable=False),
    sa.Column("expires", sa.Float, nullable=False),
)
# Added after schema 1 (``_add_tables`` creates it in an older store: additive, no version bump).
quotas_t = sa.Table(
    "quotas", metadata,
    sa.Column("team", sa.String(64), primary_key=True),
    sa.Column("cohort", sa.String(64)),                     # NULL: borrows and lends nothing
    sa.Column("guaranteed_cpus", sa.Float, nullable=False, default=0.0),
    sa.Column("guaranteed_gpus", sa.Float, nullable=False, default=0.0),
    sa.Column("max_cpus", sa.Float),                        # NULL: no limit
    sa.Column("max_gpus", sa.Float),
    sa.Column("updated_time", sa.Float, nullable=False),
)
QUOTA_FIELDS = ("cohort", "guaranteed_cpus", "guaranteed_gpus", "max_cpus", "max_gpus")

# Columns a caller may set alongside a transition (or with :meth:`JobStore.update`).
MUTABLE = frozenset({"workers", "placement", "ray_submission_id", "checkpoint_url", "checkpoint_step",
                     "checkpoint_time", "attempts", "start_time", "end_time", "reason",
                     "wait_reason", "wait_detail", "wait_since"})
WAITING = ("queued", "preempted")  # states in which a job may have a wait reason


@dataclass(frozen=True)
class QuotaRecord:
    """One row of ``quotas``: a team's guaranteed share, its max (None: no limit) and cohort."""
    team: str
    cohort: str | None
    guaranteed_cpus: float
    guaranteed_gpus: float
    max_cpus: float | None
    max_gpus: float | None
    updated_time: float

    def quota(self) -> Quota:
        """What the policy sees of it."""
        return Quota(cpus=self.max_cpus, gpus=self.max_gpus, guaranteed_cpus=self.guaranteed_cpus,
                     guaranteed_gpus=self.guaranteed_gpus, cohort=self.cohort)


def check_quota(team: str, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (every one of :data:`QUOTA_FIELDS`) checked and normalised; raises
    :class:`InvalidQuota` naming the first bad field."""
    if not isinstance(team, str) or not team.strip() or len(team) > 64:
        raise InvalidQuota("team", f"quota team must be a non-empty name of at most 64 characters, "
                                   f"got {team!r}")
    out = dict(values)
    cohort = out["cohort"]
    if cohort is not None and (not isinstance(cohort, str) or len(cohort) > 64):
        raise InvalidQuota("cohort", f"quota of {team!r}: cohort must be a name of at most 64 "
                                     f"characters, got {cohort!r}")
    out["cohort"] = cohort or None
    for name in QUOTA_FIELDS[1:]:
        v = out[name]
        if v is None and name.startswith("max_"):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise InvalidQuota(name, f"quota of {team!r}: {name} must be a number, got {v!r}") from None
        if not f >= 0 or f == float("inf") and not name.startswith("max_"):
            raise InvalidQuota(name, f"quota of {team!r}: {name} must be a finite number >= 0, got {v!r}")
        out[name] = None if f == float("inf") else f
    for res in ("cpus", "gpus"):
        mx, g = out[f"max_{res}"], out[f"guaranteed_{res}"]
        if mx is not None and mx < g:
            raise InvalidQuota(f"max_{res}", f"quota of {team!r}: max_{res} ({mx:g}) must be >= "
                                             f"guaranteed_{res} ({g:g})")
    return out


@dataclass(frozen=True)
class Transition:
    job_id: str
    from_state: str | None
    to_state: str
    reason: str
    at: float


@dataclass(frozen=True)
class JobRecord:
    """One row of ``jobs``. ``spec`` is the resolved spec as a dict (see :meth:`load`)."""
    id: str
    name: str
    kind: str
    team: str
    priority: str
    state: str
    reason: str
    spec: dict[str, Any]
    min_workers: int
    max_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    preemptible: bool
    max_retries: int
    attempts: int
    workers: int
    placement: dict[str, int]
    ray_submission_id: str | None
    checkpoint_url: str | None
    checkpoint_step: int | None
    checkpoint_time: float | None
    parent_id: str | None
    stage: str | None
    depends_on: list[str]
    submit_time: float
    start_time: float | None
    end_time: float | None
    updated_time: float
    wait_reason: str | None = None
    wait_detail: str | None = None
    wait_since: float | None = None
    history: tuple[Transition, ...] = field(default=(), compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def load(self):
        """The validated spec object (TrainSpec, TuneSpec, ServeSpec or PipelineSpec)."""
        return specmod.parse_spec(self.spec, source=f"job {self.id}")

    def view(self, now: float) -> JobView:
        """What the policy sees of this job (``now`` dates the checkpoint)."""
        return JobView(self.id, specmod.PRIORITY_CLASSES[self.priority], self.team, self.min_workers,
                       self.max_workers, self.cpus_per_worker, self.gpus_per_worker, self.submit_time,
                       self.state, self.workers, dict(self.placement), self.preemptible,
                       None if self.checkpoint_time is None else max(0.0, now - self.checkpoint_time),
                       self.start_time, allowed=self.allowed_workers,
                       time_limit=self.time_limit)

    @property
    def time_limit(self) -> float | None:
        """Seconds one run may last (``scheduling.time_limit``); None: no limit."""
        limit = (self.spec.get("scheduling") or {}).get("time_limit")
        return None if limit is None else float(limit)

    @property
    def allowed_workers(self) -> tuple[int, ...] | None:
        """The worker counts a train job can run at (its batch plan's); None: any in the range."""
        if self.kind != "train":
            return None
        ds, r = self.spec["deepspeed"], self.spec["resources"]
        return BatchPlan(ds["global_batch_size"], ds["micro_batch_size"],
                         r["min_workers"], r["max_workers"]).allowed

    @property
    def submission_id(self) -> str:
        """The Ray submission id of the current attempt: deterministic, so a restarted scheduler
        finds the Ray job it already submitted instead of submitting it twice."""
        return f"orch-{self.id}-a{self.attempts}"


def demand(spec) -> tuple[int, int, float, float]:
    """``(min_workers, max_workers, cpus_per_worker, gpus_per_worker)`` the scheduler gangs.

    train: its resources (it holds only the counts :func:`allowed_workers` lists). tune: one
    trial's smallest gang at least, up to the concurrent trials' workers. serve: its replicas.
    pipeline: nothing itself (its stages are jobs of their own).
    """
    if isinstance(spec, specmod.TrainSpec):
        r = spec.resources
        return r.min_workers, r.max_workers, r.cpus_per_worker, r.gpus_per_worker
    if isinstance(spec, specmod.TuneSpec):
        r, plan = spec.trial.resources, BatchPlan.of(spec.trial)
        conc = min(spec.num_samples, spec.max_concurrent_trials or spec.num_samples)
        return (plan.min_allowed, max(plan.min_allowed, plan.max_allowed * conc),
                r.cpus_per_worker, r.gpus_per_worker)
    if isinstance(spec, specmod.ServeSpec):
        r = spec.replicas
        return max(1, r.min_replicas), r.max_replicas, r.cpus_per_replica, r.gpus_per_replica
    return 0, 0, 0.0, 0.0


def allowed_workers(spec) -> tuple[int, ...] | None:
    """The worker counts a job can hold: a train job's batch-plan counts; None: any in its range."""
    return BatchPlan.of(spec).allowed if isinstance(spec, specmod.TrainSpec) else None


def normalize_url(url: str) -> str:
    """A plain path (``~`` expanded) becomes ``sqlite:///<abs path>``; ``postgresql://`` (or
    ``postgres://``) becomes ``postgresql+psycopg://`` (SQLAlchemy's default there is psycopg2, which
    the ``postgres`` extra does not install); any other URL passes through."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "sqlite:///" + str(Path(os.path.expanduser(url)).resolve())
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg://" + rest
    return url


def new_job_id(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


class JobStore:
    """The job store at ``url`` (a path, or any SQLAlchemy URL). Creates the schema if absent.

    Raises :class:`StoreUnavailable` (naming the URL) if it cannot be opened or has a newer schema.
    """

    def __init__(self, url: str = DEFAULT_URL, *, clock=time.time):
        self.url = normalize_url(url)
        self.clock = clock
        self._fence: tuple[str, str, int] | None = None  # (lease, holder, epoch) every write checks
        try:
            if self.url.startswith("sqlite:///") and self.url != "sqlite:///:memory:":
                path = Path(self.url[len("sqlite:///"):])
                path.parent.mkdir(parents=True, exist_ok=True)
            sqlite = self.url.startswith("sqlite")
            # the driver's busy wait (30 s) applies from the connection's first statement (the pragmas)
            self.engine = sa.create_engine(self.url, future=True,
                                           connect_args={"timeout": 30.0} if sqlite else {})
            if sqlite:
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            deadline = time.monotonic() + 60.0
            for attempt in range(1_000):
                try:
                    self._open_schema(url)
                    break
                except OperationalError as e:
                    # SQLite answers some lock conflicts at once, without its busy wait (a
                    # connection's read snapshot went stale while others created the schema, or
                    # the switch to WAL): opening again sees the new state. Anything else raises.
                    if not (sqlite and "locked" in str(e)) or time.monotonic() > deadline:
                        raise
                    time.sleep(min(1.0, 0.02 * 2 ** attempt))
        except StoreUnavailable:
            raise
        except (ArgumentError, NoSuchModuleError) as e:
            raise StoreUnavailable(url, f"not a usable database URL ({e})") from None
        except ImportError as e:
            hint = ("; for PostgreSQL install the postgres extra: "
                    "pip install 'ray-elastic-orchestrator[postgres]'" if e.name == "psycopg" else "")
            raise StoreUnavailable(url, f"its database driver is not installed ({e}){hint}") from None
        except (OSError, SQLAlchemyError) as e:
            raise StoreUnavailable(url, _short(e)) from None

    def _open_schema(self, url: str) -> None:
        """Create the schema if the database is empty (once, however many open it now), refuse a
        newer one, add tables and columns an older orchestrator's store lacks."""
        with self.engine.begin() as c:
            v = _schema_version(c)
            if v is None:  # a new database: create the schema, once however many open it now
                _lock_schema(c)
                metadata.create_all(c)
                v = _schema_version(c)
                if v is None:
                    c.execute(schema_t.insert().values(version=SCHEMA_VERSION))
            if v is not None and v > SCHEMA_VERSION:
                raise StoreUnavailable(url, f"schema version {v} is newer than this orchestrator "
                                            f"understands ({SCHEMA_VERSION}); upgrade it")
        _add_tables(self.engine)
        _add_columns(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # writes -------------------------------------------------------------------------------------
    def submit(self, spec, *, reason: str = "submitted") -> str:
        """Store a validated spec as a queued job; return its id. A pipeline also stores one job
        per stage (``parent_id`` = the pipeline, ``depends_on`` = its stages' names)."""
        now = self.clock()
        rows = [self._row(spec, new_job_id(spec.name), now)]
        if isinstance(spec, specmod.PipelineSpec):
            for st in spec.stages:
                child = self._row(st.spec, new_job_id(f"{spec.name}.{st.name}"[:60]), now)
                child.update(parent_id=rows[0]["id"], stage=st.name, depends_on=json.dumps(st.depends_on))
                rows.append(child)
        with self._begin() as c:
            for row in rows:
                c.execute(jobs_t.insert().values(**row))
                c.execute(transitions_t.insert().values(job_id=row["id"], from_state=None,
                                                        to_state="queued", reason=reason, at=now))
        return rows[0]["id"]

    def _row(self, spec, job_id: str, now: float) -> dict[str, Any]:
        lo, hi, cpus, gpus = demand(spec)
        s = spec.scheduling
        return dict(id=job_id, name=spec.name, kind=spec.kind, team=s.team, priority=s.priority,
                    state="queued", reason="submitted", spec=json.dumps(spec.model_dump(mode="json")),
                    min_workers=lo, max_workers=hi, cpus_per_worker=cpus, gpus_per_worker=gpus,
                    preemptible=s.preemptible, max_retries=s.max_retries, attempts=0, workers=0,
                    placement="{}", depends_on="[]", submit_time=now, updated_time=now)

    def transition(self, job_id: str, new_state: str, reason: str, *, expect: str | None = None,
                   **fields: Any) -> JobRecord:
        """Move a job to ``new_state`` (legal per :data:`LEGAL`), recording ``reason``.

        ``expect``: the state the caller believes the job is in; the move fails if another
        process moved it first. ``fields`` (see :data:`MUTABLE`) are written in the same
        transaction. Raises UnknownJob, IllegalTransition.
        """
        if new_state not in STATES:
            raise ValueError(f"unknown job state {new_state!r}; states are {', '.join(STATES)}")
        bad = set(fields) - MUTABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} on a job; settable: {sorted(MUTABLE)}")
        now = self.clock()
        with self._begin() as c:
            cur = c.execute(sa.select(jobs_t.c.state).where(jobs_t.c.id == job_id)).scalar()
            if cur is None:
                raise UnknownJob(job_id)
            if expect is not None and cur != expect:
                raise IllegalTransition(job_id, cur, new_state,
                                        f"job {job_id!r} is {cur}, not {expect} as expected; "
                                        f"another process moved it")
            if new_state not in LEGAL[cur]:
                raise IllegalTransition(job_id, cur, new_state)
            values = {**_encode(fields), "state": new_state, "reason": reason, "updated_time": now}
            if new_state in TERMINAL:
                values.setdefault("end_time", now)
            if new_state not in ACTIVE:
                values.setdefault("workers", 0)
                values.setdefault("placement", "{}")
            if new_state not in WAITING:  # admitted or ended: it waits no more
                for k in ("wait_reason", "wait_detail", "wait_since"):
                    values.setdefault(k, None)
            # Compare-and-set: only this transaction's view of the state may be replaced.
            n = c.execute(jobs_t.update().where(jobs_t.c.id == job_id, jobs_t.c.state == cur)
                          .values(**values)).rowcount
            if n != 1:
                raise IllegalTransition(job_id, cur, new_state,
                                        f"job {job_id!r} changed state concurrently; retry")
            c.execute(transitions_t.insert().values(job_id=job_id, from_state=cur, to_state=new_state,
                                                    reason=reason, at=now))
        return self.get(job_id)

    def update(self, job_id: str, **fields: Any) -> JobRecord:
        """Set fields without a state change (workers after a resize, a new checkpoint)."""
        bad = set(fields) - MUTABLE
        if bad:
            raise ValueError(f"cannot set {sorted(bad)} on a job; settable: {sorted(MUTABLE)}")
        with self._begin() as c:
            n = c.execute(jobs_t.update().where(jobs_t.c.id == job_id)
                          .values(**_encode(fields), updated_time=self.clock())).rowcount
            if n != 1:
                raise UnknownJob(job_id)
        return self.get(job_id)

    def set_waits(self, waits: dict[str, tuple[str, str] | None]) -> int:
        """Record why jobs wait: job id -> ``(code, detail)``, or None for no reason. Only rows of
        jobs still waiting (:data:`WAITING`) whose reason differs are written; ``wait_since``
        moves only when the code changes. No transaction at all for an empty dict. Returns the
        number of rows changed. ``updated_time`` is left alone (it times admission and
        checkpoint deadlines, not this)."""
        if not waits:
            return 0
        now, n = self.clock(), 0
        with self._begin() as c:
            for job_id, w in waits.items():
                code, detail = w if w is not None else (None, None)
                since = None if code is None else sa.case(
                    (jobs_t.c.wait_reason == code, sa.func.coalesce(jobs_t.c.wait_since, now)), else_=now)
                n += c.execute(jobs_t.update().where(
                    jobs_t.c.id == job_id, jobs_t.c.state.in_(WAITING),
                    sa.or_(jobs_t.c.wait_reason.is_distinct_from(code),
                           jobs_t.c.wait_detail.is_distinct_from(detail)))
                    .values(wait_reason=code, wait_detail=detail, wait_since=since)).rowcount
        return n

    def cancel(self, job_id: str, reason: str = "cancelled by user") -> JobRecord:
        """Cancel a job (and, for a pipeline, its unfinished stages). Raises IllegalTransition
        naming the state if the job already finished."""
        job = self.get(job_id)
        if job.terminal:
            raise IllegalTransition(job_id, job.state, "cancelled",
                                    f"job {job_id!r} already {job.state}; nothing to cancel")
        for child in self.list(parent_id=job_id):
            if not child.terminal:
                self.transition(child.id, "cancelled", f"pipeline {job_id} cancelled")
        return self.transition(job_id, "cancelled", reason)

    # leases -------------------------------------------------------------------------------------
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> Lease | None:
        """Hold lease ``name`` for ``ttl_s`` more seconds: renew it if ``holder`` holds it, take it
        over (epoch + 1) if it is free or expired, else None (someone else holds it). The row is
        locked while deciding, so two processes never both get one epoch. Expiry is judged by this
        process's clock: the hosts' clocks must agree to well within ``ttl_s`` for a timely
        takeover; safety does not depend on them (the epoch fences every write)."""
        now = self.clock()
        with self._begin(fenced=False, exclusive=True) as c:
            row = c.execute(sa.select(leases_t).where(leases_t.c.name == name)
                            .with_for_update()).mappings().first()
            if row is None:
                try:
                    with c.begin_nested():
                        c.execute(leases_t.insert().values(name=name, holder=holder, epoch=1,
                                                           expires=now + ttl_s))
                except SQLAlchemyError:  # another process inserted it first: it holds it
                    return None
                return Lease(name, holder, 1, now + ttl_s)
            if row["holder"] == holder and row["expires"] >= now:
                epoch = row["epoch"]
            elif row["expires"] < now:
                epoch = row["epoch"] + 1
            else:
                return None
            c.execute(leases_t.update().where(leases_t.c.name == name)
                      .values(holder=holder, epoch=epoch, expires=now + ttl_s))
            return Lease(name, holder, epoch, now + ttl_s)

    def release_lease(self, lease: Lease) -> None:
        """Give ``lease`` up now (a standby may take it at its next try), if still held."""
        with self._begin(fenced=False) as c:
            c.execute(leases_t.update().where(leases_t.c.name == lease.name, leases_t.c.holder == lease.holder,
                                              leases_t.c.epoch == lease.epoch).values(expires=0.0))

    def lease(self, name: str) -> Lease | None:
        with self._connect() as c:
            row = c.execute(sa.select(leases_t).where(leases_t.c.name == name)).mappings().first()
        return None if row is None else Lease(row["name"], row["holder"], row["epoch"], row["expires"])

    def fence(self, lease: Lease | None) -> None:
        """From now on every write of this store object first checks, in its own transaction, that
        ``lease`` is still held with its epoch (:class:`Deposed` otherwise); None stops checking."""
        self._fence = None if lease is None else (lease.name, lease.holder, lease.epoch)

    # reads --------------------------------------------------------------------------------------
    def get(self, job_id: str, *, history: bool = False) -> JobRecord:
        with self._connect() as c:
            row = c.execute(sa.select(jobs_t).where(jobs_t.c.id == job_id)).mappings().first()
            if row is None:
                raise UnknownJob(job_id)
            hist = self._history(c, job_id) if history else ()
        return _record(row, hist)

    def history(self, job_id: str) -> list[Transition]:
        with self._connect() as c:
            if c.execute(sa.select(jobs_t.c.id).where(jobs_t.c.id == job_id)).first() is None:
                raise UnknownJob(job_id)
            return list(self._history(c, job_id))

    @staticmethod
    def _history(c, job_id: str) -> tuple[Transition, ...]:
        rows = c.execute(sa.select(transitions_t).where(transitions_t.c.job_id == job_id)
                         .order_by(transitions_t.c.seq)).mappings()
        return tuple(Transition(r["job_id"], r["from_state"], r["to_state"], r["reason"], r["at"])
                     for r in rows)

    def list(self, states: Iterable[str] | None = None, *, parent_id: str | None = None,
             top_level: bool = False) -> list[JobRecord]:
        """Jobs in submission order, optionally only those in ``states`` / of one pipeline."""
        q = sa.select(jobs_t).order_by(jobs_t.c.submit_time, jobs_t.c.id)
        if states is not None:
            states = list(states)
            unknown = [s for s in states if s not in STATES]
            if unknown:
                raise ValueError(f"unknown job state(s) {unknown}; states are {', '.join(STATES)}")
            q = q.where(jobs_t.c.state.in_(states))
        if parent_id is not None:
            q = q.where(jobs_t.c.parent_id == parent_id)
        elif top_level:
            q = q.where(jobs_t.c.parent_id.is_(None))
        with self._connect() as c:
            return [_record(r) for r in c.execute(q).mappings()]

    # quotas -------------------------------------------------------------------------------------
    def set_quota(self, team: str, **fields: Any) -> QuotaRecord:
        """Create or change a team's quota. ``fields`` (any of :data:`QUOTA_FIELDS`; a max of None
        or ``inf``: no limit; a cohort of None or "": none) replace the stored values; the rest
        keep theirs (a new team: nothing guaranteed, no max, no cohort). Raises
        :class:`InvalidQuota` naming the bad field; then nothing is written."""
        bad = sorted(set(fields) - set(QUOTA_FIELDS))
        if bad:
            raise InvalidQuota(bad[0], f"quota of {team!r}: unknown quota field(s) {bad}; fields: "
                                       f"{', '.join(QUOTA_FIELDS)}")
        now = self.clock()
        with self._begin() as c:
            row = c.execute(sa.select(quotas_t).where(quotas_t.c.team == team)).mappings().first()
            base = ({k: row[k] for k in QUOTA_FIELDS} if row is not None else
                    dict(cohort=None, guaranteed_cpus=0.0, guaranteed_gpus=0.0, max_cpus=None, max_gpus=None))
            values = check_quota(team, {**base, **fields})
            if row is None:
                c.execute(quotas_t.insert().values(team=team, updated_time=now, **values))
            else:
                c.execute(quotas_t.update().where(quotas_t.c.team == team)
                          .values(updated_time=now, **values))
        return self.get_quota(team)

    def get_quota(self, team: str) -> QuotaRecord:
        with self._connect() as c:
            row = c.execute(sa.select(quotas_t).where(quotas_t.c.team == team)).mappings().first()
        if row is None:
            raise UnknownQuota(team)
        return QuotaRecord(**row)

    def list_quotas(self) -> list[QuotaRecord]:
        """Every team's quota, by team name."""
        with self._connect() as c:
            return [QuotaRecord(**r) for r in c.execute(sa.select(quotas_t).order_by(quotas_t.c.team))
                    .mappings()]

    def delete_quota(self, team: str) -> None:
        """Remove a team's quota (it then has no guarantee and no max). Raises UnknownQuota."""
        with self._begin() as c:
            if c.execute(quotas_t.delete().where(quotas_t.c.team == team)).rowcount != 1:
                raise UnknownQuota(team)

    def quotas(self) -> dict[str, Quota]:
        """Team -> :class:`~orchestrator.policy.Quota`: the policy's view, one query."""
        return {q.team: q.quota() for q in self.list_quotas()}

    # plumbing -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _begin(self, fenced: bool = True, exclusive: bool = False):
        """A write transaction. Fenced (:meth:`fence`): the lease row is read first, shared-locked
        until commit (PostgreSQL) or under SQLite's write lock taken up front, so a takeover
        cannot commit between the check and this transaction's writes."""
        fence = self._fence if fenced else None
        try:
            with self.engine.begin() as c:
                if (fence or exclusive) and c.dialect.name == "sqlite":
                    c.exec_driver_sql("BEGIN IMMEDIATE")
                if fence:
                    name, holder, epoch = fence
                    row = c.execute(sa.select(leases_t.c.holder, leases_t.c.epoch)
                                    .where(leases_t.c.name == name).with_for_update(read=True)).first()
                    if row is None or (row[0], row[1]) != (holder, epoch):
                        raise Deposed(name, holder, epoch, *(row or (None, None)))
                yield c
        except OperationalError as e:
            raise StoreUnavailable(self.url, _short(e)) from None

    @contextlib.contextmanager
    def _connect(self):
        try:
            with self.engine.connect() as c:
                yield c
        except OperationalError as e:
            raise StoreUnavailable(self.url, _short(e)) from None


def _add_tables(engine) -> None:
    """Create the tables a store made by an older orchestrator lacks (``leases``), once however
    many processes open it at the same time."""
    missing = [t for t in metadata.sorted_tables if not sa.inspect(engine).has_table(t.name)]
    if missing:
        with engine.begin() as c:
            _lock_schema(c)
            metadata.create_all(c, tables=missing, checkfirst=True)


def _add_columns(engine) -> None:
    """Add the ``jobs`` columns a store made by an older orchestrator lacks (all nullable), so it
    opens unchanged: ``create_all`` creates missing tables only. Idempotent; a second process
    adding the same column at the same time is fine."""
    have = {c["name"] for c in sa.inspect(engine).get_columns("jobs")}
    for col in jobs_t.columns:
        if col.name in have:
            continue
        ddl = f"ALTER TABLE jobs ADD COLUMN {col.name} {col.type.compile(dialect=engine.dialect)}"
        try:
            with engine.begin() as c:
                c.execute(sa.text(ddl))
        except SQLAlchemyError:
            if col.name not in {c["name"] for c in sa.inspect(engine).get_columns("jobs")}:
                raise


# Any 64-bit key will do; this one is fixed so that every orchestrator version takes the same lock.
_SCHEMA_LOCK = zlib.crc32(b"ray-elastic-orchestrator schema")


def _schema_version(c) -> int | None:
    if not sa.inspect(c).has_table(schema_t.name):
        return None
    return c.execute(sa.select(schema_t.c.version)).scalar()


def _lock_schema(c) -> None:
    """Hold the database's write lock for the rest of ``c``'s transaction: the schema's
    check-and-create.

    Several processes opening one empty database at once would otherwise all create the tables
    (PostgreSQL: duplicate key in pg_type) or all insert a schema version. PostgreSQL: a
    transaction-scoped advisory lock (per database). SQLite: take the write lock up front (a
    deferred transaction only takes it at its first write, after the others have checked too).
    """
    if c.dialect.name == "postgresql":
        c.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})
    elif c.dialect.name == "sqlite":
        c.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers (the CLI) never block the scheduler
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _encode(fields: dict[str, Any]) -> dict[str, Any]:
    out = dict(fields)
    if "placement" in out:
        out["placement"] = json.dumps(out["placement"] or {})
    return out


def _record(row, hist: tuple[Transition, ...] = ()) -> JobRecord:
    d = dict(row)
    d["spec"] = json.loads(d["spec"])
    d["placement"] = json.loads(d["placement"] or "{}")
    d["depends_on"] = json.loads(d["depends_on"] or "[]")
    d["preemptible"] = bool(d["preemptible"])
    return JobRecord(**d, history=hist)


def _short(e: Exception) -> str:
    msg = str(getattr(e, "orig", None) or e)
    return msg.splitlines()[0] if msg else type(e).__name__
