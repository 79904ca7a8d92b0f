"""Scheduling policy: plain data in, plain decisions out (DESIGN invariant 6).

Nothing here imports Ray or touches the store. :func:`decide` is called by the scheduler service
(``orchestrator.service``) on the live cluster and by the simulator (``bench/scheduler``) on a
synthetic one; both act on the returned :class:`Decision` values themselves.

What one call does, in order:

1. Requeue jobs that were stopped by a preemption (``state == "preempted"``).
2. Reject queued jobs that can never run: their minimum gang does not pack onto the cluster's
   nodes even when empty, or needs more than their team's whole quota (its max; on a cluster
   that cannot grow, also more than all its team could ever borrow).
3. Walk the queue by *effective* priority (class + aging; inside a class FIFO, or with quotas,
   fair share) and admit every gang whose smallest allowed worker count packs onto nodes now (up
   to its largest; while other jobs wait, at its smallest: ``start_small``, topped up at the end
   of the cycle where no waiting gang of its kind could use the rest),
   within team quotas. A job only ever holds a count in its ``allowed`` set (those that split
   its batch). Workers without GPUs stay off nodes with free GPUs whenever other nodes hold them
   (``spare_gpu_nodes``).
4. The first gang that does not fit is the *head*. It gets an *estimated start*: the earliest
   time its gang fits if running jobs free their capacity at their time limits (``start_time +
   time_limit``; a job without a limit counts as never ending, so no guess can delay the head).
   It holds the slots (its workers' CPU and GPU per node) it will use then and cannot get from
   jobs ending before; the rest of those nodes stays free. Jobs behind it start (backfill) on
   capacity it does not hold, or, if their own time limit ends before its estimated start, on
   its slots too (Slurm's backfill); either way they never delay it. When jobs without a limit
   stand in its way (no estimate), it holds its slots on the nodes with most free room. A gang
   that does not fit but lies within its team's guaranteed share first reclaims that share from
   borrowers. Each part is a :class:`PolicyConfig` switch (``reservation``, ``slot_reservation``,
   ``estimate_start``).
5. A blocked job whose class outranks running preemptible jobs gets capacity by first shrinking
   elastic lower-class jobs to their smallest allowed count, then stopping the lowest-class victims,
   freshest checkpoint first, after they checkpoint. Nothing is touched unless that frees enough.
6. Elastic jobs below their largest allowed count grow into capacity nobody queued needs or
   reserved (``grow_past_head``: also while a head waits, on what it does not hold).
7. Gangs still blocked are announced to the autoscaler (:class:`RequestResources`).

:func:`decide_with_reasons` makes the same decisions and also says, where each is made, why every
queued job it did not admit waits (:class:`Wait`, one code of :data:`WAIT_CODES`).

Quotas (:class:`Quota`, per team; only when ``quotas`` is not empty), per resource (CPU, GPU):

- A team may always use up to its *guaranteed* share. Nobody else holds it for long: when a job of
  the team fits within what its team has left of that share but not on the nodes, jobs of teams
  running over their own guarantee are preempted for it (*reclaim*: borrowers in its cohort first,
  then, only if the capacity no one guarantees is over-drawn, any team's; lowest class first,
  then most recently started; as few as make room), whatever their class. The other way round,
  preemption by class (step 5) spares other teams' jobs while their team is within its guarantee.
- Beyond its guarantee, up to its *max*, a team only borrows: idle guaranteed capacity of the
  other teams of its *cohort*, and capacity no team guarantees (the cluster's total minus all
  guarantees), which is anyone's. A team without a cohort borrows only the latter, and lends
  nothing. *Idle* means neither used nor asked for by the owner's queued jobs that fit in what is
  left of its guarantee, so a borrower never re-takes capacity its owner is waiting to reclaim. A team with no :class:`Quota` has no
  guarantee and no max. While nobody guarantees a resource, quotas are plain caps on it.
- *Fair share*: inside one priority class, queued jobs go in order of their team's dominant
  resource share (the larger of its CPU and GPU use over the cluster's total, counting what this
  cycle admits), ties by submit time (DRF); without quotas, FIFO as before.
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from operator import attrgetter
from typing import Iterable, Mapping, Sequence, Union

_EPS = 1e-9
_INF = float("inf")
# Mirrors orchestrator.spec.PRIORITY_CLASSES (kept literal so this module imports nothing of ours).
PRIORITY = {"low": 0, "normal": 100, "high": 200, "critical": 300}


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Node:
    """One node: total and free capacity. ``free`` excludes what running jobs hold."""
    id: str
    cpus: float
    gpus: float = 0.0
    free_cpus: float | None = None
    free_gpus: float | None = None

    def __post_init__(self):
        if self.free_cpus is None:
            object.__setattr__(self, "free_cpus", self.cpus)
        if self.free_gpus is None:
            object.__setattr__(self, "free_gpus", self.gpus)
        if self.cpus < 0 or self.gpus < 0:
            raise ValueError(f"node {self.id}: capacity must be >= 0 (cpus={self.cpus}, gpus={self.gpus})")


@dataclass(frozen=True)
class ClusterState:
    """The nodes now, and whether the autoscaler may add nodes of the given ``(cpus, gpus)`` shapes."""
    nodes: tuple[Node, ...]
    autoscale_shapes: tuple[tuple[float, float], ...] = ()

    @classmethod
    def of(cls, nodes: Iterable[Node], autoscale_shapes: Iterable[tuple[float, float]] = ()):
        return cls(tuple(nodes), tuple(autoscale_shapes))

    @cached_property
    def total_shapes(self) -> Counter:
        """How many nodes have each total ``(cpus, gpus)``: feasibility checks cost O(shapes)."""
        return Counter((n.cpus, n.gpus) for n in self.nodes)


@dataclass
class JobView:
    """What the policy knows of a job. ``priority`` is a class value (:data:`PRIORITY`).

    ``placement`` maps node id -> workers for jobs holding capacity. ``checkpoint_age`` is seconds
    since the job's last committed checkpoint (``None``: it has none). ``stopping`` marks a job
    already asked to stop or shrink (its ``target_workers``), whose capacity is about to free.
    ``allowed`` lists the worker counts the job can run at (a train job's batch splits, see
    :class:`orchestrator.batch.BatchPlan`); ``None`` means every count in [min, max]. The policy
    admits, grows and shrinks jobs to allowed counts only. ``time_limit``: seconds a run may last
    from ``start_time`` (``scheduling.time_limit``; the service stops it past that), so a running
    job frees its capacity by ``start_time + time_limit``; ``None``: it may run for ever.
    """
    id: str
    priority: int
    team: str = "default"
    min_workers: int = 1
    max_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    submit_time: float = 0.0
    state: str = "queued"
    workers: int = 0
    placement: dict[str, int] = field(default_factory=dict)
    preemptible: bool = True
    checkpoint_age: float | None = None
    start_time: float | None = None
    stopping: bool = False
    target_workers: int | None = None
    allowed: tuple[int, ...] | None = None
    time_limit: float | None = None

    def __post_init__(self):
        if self.time_limit is not None and not self.time_limit > 0:  # also NaN
            raise ValueError(f"job {self.id}: time_limit must be > 0 seconds, got {self.time_limit}")
        if not 1 <= self.min_workers <= self.max_workers:
            raise ValueError(f"job {self.id}: need 1 <= min_workers ({self.min_workers}) <= "
                             f"max_workers ({self.max_workers})")
        if self.allowed is not None:
            self.allowed = tuple(sorted(set(self.allowed)))
            lo, hi = (self.allowed[0], self.allowed[-1]) if self.allowed else (0, 0)
            if not self.min_workers <= lo <= hi <= self.max_workers:
                raise ValueError(f"job {self.id}: allowed worker counts {list(self.allowed)} must be "
                                 f"non-empty and within [{self.min_workers}, {self.max_workers}]")

    @property
    def min_allowed(self) -> int:
        """The smallest count the job can run at: its gang minimum."""
        return self.allowed[0] if self.allowed is not None else self.min_workers

    @property
    def max_allowed(self) -> int:
        return self.allowed[-1] if self.allowed is not None else self.max_workers

    def largest_allowed_at_most(self, n: int) -> int | None:
        if self.allowed is None:
            return min(n, self.max_workers) if n >= self.min_workers else None
        i = bisect.bisect_right(self.allowed, n)
        return self.allowed[i - 1] if i else None

    @property
    def elastic(self) -> bool:
        return self.min_allowed < self.max_allowed

    @property
    def bundle(self) -> tuple[float, float]:
        return (self.cpus_per_worker, self.gpus_per_worker)


@dataclass(frozen=True)
class Quota:
    """A team's share of the cluster (see the module docstring for borrowing and reclaim).

    ``cpus`` / ``gpus``: the most the team may hold at once (``None``: no limit).
    ``guaranteed_cpus`` / ``guaranteed_gpus``: what it may always use, reclaimed from borrowers.
    ``cohort``: teams of one cohort lend each other idle guaranteed capacity (``None``: none).
    """
    cpus: float | None = None
    gpus: float | None = None
    guaranteed_cpus: float = 0.0
    guaranteed_gpus: float = 0.0
    cohort: str | None = None

    def __post_init__(self):
        for name in ("cpus", "gpus", "guaranteed_cpus", "guaranteed_gpus"):
            v = getattr(self, name)
            if v is not None and not v >= 0:  # also NaN
                raise ValueError(f"Quota.{name} must be >= 0, got {v}")
        for mx, g in (("cpus", "guaranteed_cpus"), ("gpus", "guaranteed_gpus")):
            if getattr(self, mx) is not None and getattr(self, mx) + _EPS < getattr(self, g):
                raise ValueError(f"Quota.{mx} (the max, {getattr(self, mx):g}) must be >= "
                                 f"{g} ({getattr(self, g):g})")

    @property
    def guaranteed(self) -> tuple[float, float]:
        return (self.guaranteed_cpus, self.guaranteed_gpus)

    @property
    def most(self) -> tuple[float, float]:
        """The max per resource, ``inf`` where there is none."""
        return (_INF if self.cpus is None else self.cpus, _INF if self.gpus is None else self.gpus)


@dataclass(frozen=True)
class PolicyConfig:
    """Every knob of the policy, in one place."""
    aging_per_hour: float = 100.0     # priority points a queued job gains per hour waited...
    max_aging: float = 250.0          # ...up to this many: old low jobs pass high ones, never critical
    min_run_before_preempt_s: float = 1800.0  # a job runs this long before it can be shrunk or stopped
    backfill: bool = True
    backfill_depth: int = 100_000     # queued jobs examined behind the head per cycle
    preemption: bool = True
    grow: bool = True                 # elastic jobs take idle capacity up to their largest count
    grow_past_head: bool = True       # ...also while a head waits, on capacity it does not hold
    start_small: bool = True          # while other jobs wait, elastic jobs start at their smallest
                                      # allowed count (more jobs start; they grow later, above)
    spare_gpu_nodes: bool = True      # workers without GPUs go to nodes without free GPUs first
    reservation: bool = True          # the blocked head holds the capacity it will start on
    slot_reservation: bool = True     # ...only its workers' slots (off: the whole nodes)
    estimate_start: bool = True       # ...from running jobs' time limits; jobs that end before
                                      # the head's estimated start may backfill on its slots
    fair_share: bool = True           # with quotas: DRF order between teams inside a class
    max_request_bundles: int = 10_000  # cap on bundles sent to the autoscaler per cycle

    def __post_init__(self):
        for name in ("aging_per_hour", "max_aging", "min_run_before_preempt_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"PolicyConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.backfill_depth < 0:
            raise ValueError(f"backfill_depth must be >= 0, got {self.backfill_depth}")


# ---------------------------------------------------------------------------------------------
# decisions
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Admit:
    job_id: str
    workers: int
    placement: dict[str, int]  # node id -> workers


@dataclass(frozen=True)
class Grow:
    job_id: str
    to_workers: int
    placement: dict[str, int]  # added workers per node


@dataclass(frozen=True)
class Shrink:
    job_id: str
    to_workers: int
    release: dict[str, int]  # removed workers per node
    reason: str


@dataclass(frozen=True)
class Preempt:
    job_id: str
    reason: str
    checkpoint_first: bool = True


@dataclass(frozen=True)
class Requeue:
    job_id: str
    reason: str


@dataclass(frozen=True)
class Reject:
    job_id: str
    reason: str


@dataclass(frozen=True)
class RequestResources:
    bundles: list[dict[str, float]]  # what ray.autoscaler.sdk.request_resources(bundles=) takes


Decision = Union[Admit, Grow, Shrink, Preempt, Requeue, Reject, RequestResources]

# Why a queued job is not admitted. ``backoff`` and ``upstream`` are decided by the service (a
# failed job is not offered to the policy until its retry delay has passed, a pipeline stage not
# until its upstream stages succeeded); the others here, in :func:`decide`.
WAIT_CODES = ("quota", "gang_does_not_fit", "autoscaler", "behind_reserved_head", "backoff",
              "never_fits", "upstream")


@dataclass(frozen=True)
class Wait:
    """Why ``job_id`` waits this cycle: ``code`` (one of :data:`WAIT_CODES`) and a line naming
    the specifics (the quota and its use, the gang's need and the free room, the head holding the
    reservation, ...). ``never_fits`` carries the :class:`Reject`'s reason."""
    job_id: str
    code: str
    detail: str

    def __post_init__(self):
        if self.code not in WAIT_CODES:
            raise ValueError(f"wait code {self.code!r} is not one of {', '.join(WAIT_CODES)}")


# ---------------------------------------------------------------------------------------------
# capacity index
# ---------------------------------------------------------------------------------------------
class Capacity:
    """Free capacity per node, indexed by free shape ``(cpus, gpus)``.

    Placing a gang costs O(distinct free shapes), not O(nodes): a 1,000-node cluster running
    integer-sized bundles has a few dozen shapes.
    """

    def __init__(self, nodes: Iterable[Node], *, spare_gpu_nodes: bool = False):
        self.spare_gpu_nodes = spare_gpu_nodes  # see :meth:`place`
        self.total: dict[str, tuple[float, float]] = {}
        self.free: dict[str, tuple[float, float]] = {}
        self.by_shape: dict[tuple[float, float], set[str]] = defaultdict(set)
        self.withheld: set[str] = set()
        self.held: dict[str, tuple[float, float]] = {}  # node -> slots reserved on it (not in free)
        self.version = 0  # moves with every change (caches of the caller key on it)
        self.free_cpus = 0.0
        self.free_gpus = 0.0
        for n in nodes:
            self.total[n.id] = (n.cpus, n.gpus)
            self._set(n.id, (max(0.0, n.free_cpus), max(0.0, n.free_gpus)))

    def copy(self, *, withheld: bool = True) -> "Capacity":
        """An independent copy; ``withheld=False`` puts reserved nodes and slots back in play."""
        c = Capacity.__new__(Capacity)
        c.total, c.free, c.withheld = self.total, dict(self.free), set(self.withheld)
        c.held, c.spare_gpu_nodes, c.version = dict(self.held), self.spare_gpu_nodes, 0
        c.by_shape = defaultdict(set, {k: set(v) for k, v in self.by_shape.items() if v})
        c.free_cpus, c.free_gpus = self.free_cpus, self.free_gpus
        if not withheld:
            back, c.withheld = c.withheld, set()
            for n in back:
                shape = c.free[n]
                c.by_shape[shape].add(n)
                c.free_cpus += shape[0]
                c.free_gpus += shape[1]
            held, c.held = c.held, {}
            for n, (hc, hg) in held.items():
                fc, fg = c.free[n]
                c._set(n, (fc + hc, fg + hg))
        return c

    def _set(self, node: str, shape: tuple[float, float]) -> None:
        self.version += 1
        old = self.free.get(node)
        if old is not None and node not in self.withheld:
            self.by_shape[old].discard(node)
            self.free_cpus -= old[0]
            self.free_gpus -= old[1]
        shape = (round(shape[0], 6), round(shape[1], 6))
        self.free[node] = shape
        if node not in self.withheld:
            self.by_shape[shape].add(node)
            self.free_cpus += shape[0]
            self.free_gpus += shape[1]

    def withhold(self, nodes: Iterable[str]) -> None:
        """Hide nodes from placement (a head job's reservation)."""
        self.version += 1
        for n in nodes:
            if n in self.withheld or n not in self.free:
                continue
            shape = self.free[n]
            self.by_shape[shape].discard(n)
            self.free_cpus -= shape[0]
            self.free_gpus -= shape[1]
            self.withheld.add(n)

    def hold(self, node: str, need: tuple[float, float]) -> None:
        """Reserve up to ``need`` (CPU, GPU) of the node's free capacity (a head job's slots):
        hidden from placement like a withheld node, the rest of the node stays in play."""
        if node not in self.free or node in self.withheld:
            return
        fc, fg = self.free[node]
        c, g = min(fc, max(0.0, need[0])), min(fg, max(0.0, need[1]))
        if c <= _EPS and g <= _EPS:
            return
        hc, hg = self.held.get(node, (0.0, 0.0))
        self.held[node] = (hc + c, hg + g)
        self._set(node, (fc - c, fg - g))

    def take(self, placement: Mapping[str, int], bundle: tuple[float, float], *,
             reserved_first: bool = False) -> None:
        """Use capacity for a placement. ``reserved_first``: it was placed on a copy with the
        reservations back in play (see :meth:`copy`); it uses held slots before free ones."""
        c, g = bundle
        for n, w in placement.items():
            tc, tg = w * c, w * g
            if reserved_first and n in self.held:
                hc, hg = self.held.pop(n)
                uc, ug = min(hc, tc), min(hg, tg)
                tc, tg = tc - uc, tg - ug
                if hc - uc > _EPS or hg - ug > _EPS:
                    self.held[n] = (hc - uc, hg - ug)
            fc, fg = self.free[n]
            self._set(n, (fc - tc, fg - tg))

    def give(self, placement: Mapping[str, int], bundle: tuple[float, float]) -> None:
        c, g = bundle
        for n, w in placement.items():
            if n not in self.free:  # node gone: nothing to give back
                continue
            fc, fg = self.free[n]
            tc, tg = self.total[n]
            self._set(n, (min(tc, fc + w * c), min(tg, fg + w * g)))

    def could_hold(self, workers: int, bundle: tuple[float, float]) -> bool:
        """Cheap necessary condition: enough free capacity in total (ignores packing)."""
        c, g = bundle
        return (self.free_cpus + _EPS >= workers * c) and (self.free_gpus + _EPS >= workers * g)

    def place(self, lo: int, hi: int, bundle: tuple[float, float]) -> dict[str, int] | None:
        """Pack between ``lo`` and ``hi`` workers (as many as fit) onto nodes; ``None`` if < lo.

        Best fit: one node that takes them all if any (the tightest such), else the nodes that
        take the most workers each, so a gang spans as few nodes as possible. With
        ``spare_gpu_nodes``, workers that need no GPU go to nodes without free GPUs first, and
        of equal free room to nodes without GPUs: on a GPU node they take the CPUs its GPUs need.
        """
        if not self.could_hold(lo, bundle):
            return None
        fits = []  # (workers per node, shape)
        total = 0
        for shape, nodes in self.by_shape.items():
            if not nodes:
                continue
            w = _fit(shape, bundle)
            if w > 0:
                fits.append((w, shape))
                total += w * len(nodes)
        if total < lo:
            return None
        spare = self.spare_gpu_nodes and bundle[1] <= 0
        if spare:
            # workers without GPUs stay off nodes with free GPUs whenever the others hold the
            # gang: a smaller count of an elastic gang, or more nodes, rather than one GPU node
            # (16 workers of 4 CPUs fit one 64-CPU GPU node and would leave its GPUs unusable)
            plain = [(w, s) for w, s in fits if s[1] <= 0]
            plain_total = sum(w * len(self.by_shape[s]) for w, s in plain)
            if plain_total >= lo:
                fits, total = plain, plain_total
        want = min(hi, total)
        node_key = (lambda n: (self.total[n][1] > 0, n)) if spare else None
        single = [(w, s) for w, s in fits if w >= want]
        if single:
            _, shape = min(single, key=lambda ws: (spare and ws[1][1] > 0, ws[0], ws[1]))
            return {min(self.by_shape[shape], key=node_key): want}
        out: dict[str, int] = {}
        left = want
        for w, shape in sorted(fits, key=lambda ws: (spare and ws[1][1] > 0, -ws[0], ws[1])):
            for n in sorted(self.by_shape[shape], key=node_key):
                k = min(w, left)
                out[n] = k
                left -= k
                if left == 0:
                    return out
        return out  # unreachable: total >= want


def _fit(shape: tuple[float, float], bundle: tuple[float, float]) -> int:
    c, g = bundle
    fc, fg = shape
    w = int((fc + _EPS) // c) if c > 0 else 1 << 30
    if g > 0:
        w = min(w, int((fg + _EPS) // g))
    return w if w < (1 << 30) else 1 << 20


def fits_empty_cluster(job: JobView, cluster: ClusterState) -> str | None:
    """``None`` if the job's minimum gang could ever run here, else the reason it cannot."""
    c, g = job.bundle
    if cluster.autoscale_shapes:
        if any(_fit(s, job.bundle) >= 1 for s in (*cluster.autoscale_shapes, *cluster.total_shapes)):
            return None
        return (f"one worker ({c:g} CPU, {g:g} GPU) fits no node and no node type the autoscaler "
                f"can add {list(cluster.autoscale_shapes)}")
    room = sum(_fit(s, job.bundle) * k for s, k in cluster.total_shapes.items())
    if room >= job.min_allowed:
        return None
    tot_c = sum(s[0] * k for s, k in cluster.total_shapes.items())
    tot_g = sum(s[1] * k for s, k in cluster.total_shapes.items())
    gang = (f"min_workers={job.min_workers}" if job.min_allowed == job.min_workers else
            f"{job.min_allowed} workers (the fewest that split its batch)")
    return (f"{gang} x ({c:g} CPU, {g:g} GPU) cannot pack onto the cluster "
            f"even when empty: {len(cluster.nodes)} node(s), {tot_c:g} CPU, {tot_g:g} GPU in all, "
            f"room for {room} such worker(s)")


def effective_priority(job: JobView, now: float, config: PolicyConfig) -> float:
    """Class value plus aging (bounded by ``max_aging``): a low job waiting long enough outranks
    newer normal and high jobs, so sustained load of those cannot starve it."""
    waited = max(0.0, now - job.submit_time)
    return job.priority + min(config.max_aging, waited * config.aging_per_hour / 3600.0)


# ---------------------------------------------------------------------------------------------
# the decision
# ---------------------------------------------------------------------------------------------
def decide(queue: Sequence[JobView], running: Sequence[JobView], cluster: ClusterState,
           quotas: Mapping[str, Quota] | None, now: float,
           config: PolicyConfig = PolicyConfig()) -> list[Decision]:
    """Decisions for one scheduling cycle (see the module docstring for the order).

    ``queue``: jobs waiting (``queued``, or ``preempted`` awaiting requeue). ``running``: jobs
    holding capacity (their ``placement`` is already subtracted from ``cluster``'s free capacity).
    Pure: the inputs are not modified.
    """
    return _decide(queue, running, cluster, quotas, now, config, None)


def decide_with_reasons(queue: Sequence[JobView], running: Sequence[JobView], cluster: ClusterState,
                        quotas: Mapping[str, Quota] | None, now: float,
                        config: PolicyConfig = PolicyConfig()) -> tuple[list[Decision], list[Wait]]:
    """:func:`decide`'s decisions (the same ones) and a :class:`Wait` for every job of ``queue``
    that is not admitted this cycle (a rejected one: ``never_fits``). Pure, like :func:`decide`."""
    waits: list[Wait] = []
    return _decide(queue, running, cluster, quotas, now, config, waits), waits


def _decide(queue, running, cluster, quotas, now, config, waits: list[Wait] | None) -> list[Decision]:
    """The cycle itself; with ``waits`` (a list) it also records why each job not admitted waits,
    at the point where that is decided. Without it, it does no extra work (the benchmark)."""
    explain = waits is not None
    quotas = quotas or {}
    out: list[Decision] = []
    cap = Capacity(cluster.nodes, spare_gpu_nodes=config.spare_gpu_nodes)
    usage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in running:
        u = usage[r.team]
        u[0] += r.workers * r.cpus_per_worker
        u[1] += r.workers * r.gpus_per_worker

    # 1-2: requeue stopped victims; reject what can never run.
    waiting: list[JobView] = []
    never: dict[tuple[int, int, float, float], str | None] = {}
    most_ever: dict[str, tuple[float, float]] = {}  # team -> the most it could ever hold
    for j in queue:
        if j.state == "preempted":
            out.append(Requeue(j.id, "preempted; resumes from its last checkpoint"))
        key = (j.min_workers, j.min_allowed, j.cpus_per_worker, j.gpus_per_worker)
        if key not in never:
            never[key] = fits_empty_cluster(j, cluster)
        reason = never[key] or _over_whole_quota(j, quotas.get(j.team))
        if not reason and quotas and not cluster.autoscale_shapes:
            reason = _over_all_it_may_borrow(j, quotas, cluster, most_ever)
        if reason:
            out.append(Reject(j.id, reason))
            if explain:
                waits.append(Wait(j.id, "never_fits", reason))
        else:
            waiting.append(j)
    # Team use against quotas (guarantees, borrowing); None without quotas: no team limits at all.
    ledger = _Ledger(quotas, usage, waiting, cluster) if quotas else None

    def charge(team: str, cpus: float, gpus: float, asked: JobView | None = None) -> None:
        if ledger is None:
            u = usage[team]
            u[0] += cpus
            u[1] += gpus
        else:
            ledger.charge(team, cpus, gpus, asked)

    # 3: classes merged lazily by effective priority (aging); FIFO inside each class, or, with
    # quotas, fair share between its teams.
    if ledger is not None and config.fair_share:
        order = _by_fair_share(waiting, now, config, usage, ledger.total)
    else:
        order = _by_effective_priority(waiting, now, config)
    head: JobView | None = None
    preemptor: JobView | None = None
    reclaiming = False  # a job holds nodes while borrowers it preempted stop
    no_reclaim: set[tuple[str, tuple[int, float, float]]] = set()  # (team, gang) that failed to
    no_reclaim_at = 0                                               # reclaim, at ledger.version
    blocked: list[JobView] = []
    started_small: list[tuple[int, JobView]] = []  # (index in ``out``, job) of Admits held small
    failed_shapes: set[tuple] = set()  # (min gang, may use reserved capacity) that did not fit
    examined = 0
    touched: set[str] = set()  # jobs already told to shrink or stop this cycle
    # explain only: job id -> (code, detail) of a blocked job; "gang" becomes gang_does_not_fit or
    # autoscaler once step 7 knows what it asked for. Room on reserved nodes, by free shape.
    why: dict[str, tuple[str, str]] = {}
    # Reservations' earliest estimated start (now if one is unknown): a job whose time limit ends
    # before it may use the reserved capacity too (Slurm's backfill); ``anywhere`` is then the
    # capacity with it back in. ``head_start``: the head's own estimate, for :class:`Wait`.
    hold_until = head_start = -_INF
    anywhere: Capacity | None = None
    reserved: tuple[int, Counter] = (-1, Counter())  # explain only: (cap.version, what is reserved)

    def held_until(start: float) -> float:
        start = start if start < _INF else now
        return start if hold_until == -_INF else min(hold_until, start)
    for j in order:
        if head is not None:
            if not config.backfill or examined >= config.backfill_depth:
                blocked.append(j)
                if explain:
                    why[j.id] = ("behind_reserved_head",
                                 _behind(head, preemptor, config) + _starts(head_start, now))
                continue
            examined += 1
        hi = j.max_allowed if ledger is None else ledger.cap(j)
        small = config.start_small and len(waiting) > 1 and hi > j.min_allowed
        if small:  # others wait: the smallest count now, more at the end if nobody needs it
            hi = j.min_allowed
        if hi < j.min_allowed:
            if explain:
                waits.append(Wait(j.id, "quota", ledger.detail(j)))
            continue  # over quota: waits without blocking other teams
        ends_first = j.time_limit is not None and now + j.time_limit <= hold_until
        key = (j.min_allowed, j.cpus_per_worker, j.gpus_per_worker, ends_first)
        placement, on_reserved = None, False
        if key not in failed_shapes:
            placement = _place_gang(cap, j, hi)
            if placement is None and ends_first:
                if anywhere is None:
                    anywhere = cap.copy(withheld=False)
                placement = _place_gang(anywhere, j, hi)
                on_reserved = placement is not None
        if placement is None:
            failed_shapes.add(key)
            blocked.append(j)
            if explain:
                if reserved[0] != cap.version:
                    reserved = (cap.version, _reserved_shapes(cap))
                room, detail = _room(j, cap, reserved[1])
                why[j.id] = (("behind_reserved_head", _behind(head, preemptor, config, True,
                                                              _starts(head_start, now)))
                             if head is not None and room >= j.min_allowed else ("gang", detail))
            if ledger is not None and no_reclaim_at != ledger.version:
                no_reclaim.clear()  # a charge changed who runs over their guarantee
                no_reclaim_at = ledger.version
            if ledger is not None and (j.team, key) not in no_reclaim and ledger.within_guarantee(j):
                # 4b: its own guaranteed share is lent out: take it back from the borrowers.
                note = _reclaim_for(j, cap, running, ledger, config=config, now=now, out=out,
                                    touched=touched)
                if note is None:  # the same gang of the same team fails alike until a charge
                    no_reclaim.add((j.team, key))
                else:
                    no_reclaim.clear()
                    reclaiming = True
                    hold_until = held_until(now)  # it starts as soon as they stop
                    if explain:
                        why[j.id] = ("gang", f"{detail}; {note}")
                    continue
            if head is None:  # 4: the head reserves its slots (and may preempt for them)
                head = j
                note, head_start = _reserve_for(j, cap, running, config=config, now=now, out=out,
                                                touched=touched, ledger=ledger)
                hold_until = held_until(head_start)
                if explain:
                    why[j.id] = ("gang", why[j.id][1] + (f"; {note}" if note else "")
                                 + (_starts(head_start, now) if now < head_start < _INF else ""))
                continue
            if not (config.preemption and preemptor is None and j.priority > head.priority):
                continue
            # 5: an aged head may outrank a newer job of a higher class, which may still take
            # the head's nodes or preempt for itself.
            preemptor = j
            placement = _place_gang(cap.copy(withheld=False), j, hi)
            if placement is None:
                note, start = _reserve_for(j, cap, running, config=config, now=now, out=out,
                                           touched=touched, preempts_head=True, ledger=ledger)
                hold_until = held_until(start)
                if explain:  # it fits nowhere now, reserved nodes included: its room stands
                    why[j.id] = ("gang", why[j.id][1] + (f"; {note}" if note else ""))
                continue
            blocked.pop()
            why.pop(j.id, None)
            on_reserved = True  # it may take reserved capacity
        workers = sum(placement.values())
        cap.take(placement, j.bundle, reserved_first=on_reserved)
        if anywhere is not None:
            anywhere.take(placement, j.bundle)
        charge(j.team, workers * j.cpus_per_worker, workers * j.gpus_per_worker, asked=j)
        if small:
            started_small.append((len(out), j))
        out.append(Admit(j.id, workers, placement))

    # While gangs wait, a job takes more only on a kind of node (GPU or not) none of them waits for.
    waiting_kinds = {b.gpus_per_worker > 0 for b in blocked}

    def more(r: JobView, have: int) -> tuple[int, dict[str, int]] | None:
        """Workers ``r`` (holding ``have``) may add now, and where: (new count, added placement)."""
        if (r.gpus_per_worker > 0) in waiting_kinds:
            return None
        hi = r.max_allowed - have if ledger is None else ledger.cap(r, have=have)
        if hi <= 0:
            return None
        add = cap.place(1, hi, r.bundle)
        to = r.largest_allowed_at_most(have + sum(add.values())) if add else None
        if to is None or to <= have:
            return None
        if to - have < sum(add.values()):  # room for a count with no batch split
            add = cap.place(to - have, to - have, r.bundle)
        n = sum(add.values())
        cap.take(add, r.bundle)
        charge(r.team, n * r.cpus_per_worker, n * r.gpus_per_worker)
        return have + n, add

    # 5b: jobs started small take what is left of their largest count now if nobody waits for it.
    if not reclaiming:
        for i, j in started_small:
            a = out[i]
            got = more(j, a.workers)
            if got is not None:
                placement = dict(a.placement)
                for n, w in got[1].items():
                    placement[n] = placement.get(n, 0) + w
                out[i] = Admit(a.job_id, got[0], placement)

    # 6: elastic jobs grow into capacity nobody waits for, or that no reservation holds.
    if config.grow and (head is None or config.grow_past_head) and not reclaiming:
        for r in sorted(running, key=lambda r: (-r.priority, r.submit_time, r.id)):
            if r.stopping or r.workers >= r.max_allowed or r.state != "running":
                continue
            got = more(r, r.workers)
            if got is not None:
                out.append(Grow(r.id, got[0], got[1]))

    # 7: tell the autoscaler about everything running plus the blocked gangs.
    asked: set[str] = set()  # blocked jobs whose whole gang is in the request
    if blocked and cluster.autoscale_shapes:
        demand = [(r.workers, r) for r in running] + [(b.min_allowed, b) for b in blocked]
        bundles: list[dict[str, float]] = []
        for n, j in demand:
            b = {"CPU": j.cpus_per_worker, **({"GPU": j.gpus_per_worker} if j.gpus_per_worker else {})}
            bundles.extend(dict(b) for _ in range(n))
            if len(bundles) >= config.max_request_bundles:
                break
        out.append(RequestResources(bundles[:config.max_request_bundles]))
        if explain:
            n = sum(r.workers for r in running)
            for b in blocked:
                n += b.min_allowed
                if n > config.max_request_bundles:
                    break
                asked.add(b.id)
    if explain:
        for j in blocked:
            code, detail = why[j.id]
            if code == "gang" and j.id in asked:
                code, detail = "autoscaler", f"requested {_gang(j)} from the autoscaler; {detail}"
            waits.append(Wait(j.id, "gang_does_not_fit" if code == "gang" else code, detail))
    return out


def _by_effective_priority(jobs: list[JobView], now: float, config: PolicyConfig):
    classes: dict[int, list[JobView]] = defaultdict(list)
    for j in jobs:
        classes[j.priority].append(j)
    key = attrgetter("submit_time", "id")
    streams = []
    for prio, js in classes.items():
        js.sort(key=key)
        # Within a class, older means higher effective priority: each stream is already ordered.
        streams.append(((-effective_priority(j, now, config), j.submit_time, j.id, j) for j in js))
    for *_, j in heapq.merge(*streams):
        yield j


def _by_fair_share(jobs: list[JobView], now: float, config: PolicyConfig,
                   usage: Mapping[str, list[float]], total: tuple[float, float]):
    """Fair share (DRF) inside each class: next is the oldest job of the team whose dominant share
    (max over CPU and GPU of its use / the cluster's total) is lowest now, ties by submit time;
    classes interleave by that job's effective priority. Lazy: ``usage`` is read at each step,
    so what the caller admitted meanwhile counts. O(log teams) per job per class."""
    tc, tg = total

    def share(team: str) -> float:
        u = usage.get(team)
        if u is None:
            return 0.0
        return max(u[0] / tc if tc > 0 else 0.0, u[1] / tg if tg > 0 else 0.0)

    teams: dict[int, dict[str, list[JobView]]] = defaultdict(lambda: defaultdict(list))
    for j in jobs:
        teams[j.priority][j.team].append(j)
    heaps: dict[int, list] = {}
    nxt: dict[tuple[int, str], int] = {}  # (class, team) -> index of its next job
    key = attrgetter("submit_time", "id")
    for prio, by_team in teams.items():
        h = []
        for team, js in by_team.items():
            js.sort(key=key)
            nxt[prio, team] = 0
            h.append((share(team), js[0].submit_time, js[0].id, team))
        heapq.heapify(h)
        heaps[prio] = h
    keys: dict[str, tuple] = {}  # job id -> its place between classes
    while heaps:
        best = None
        for prio, h in heaps.items():
            while True:  # shares only grow within a cycle: re-key a stale top lazily
                s, t, i, team = h[0]
                cur = share(team)
                if cur <= s + _EPS:
                    break
                heapq.heapreplace(h, (cur, t, i, team))
            j = teams[prio][h[0][3]][nxt[prio, h[0][3]]]
            k = keys.get(j.id)
            if k is None:
                k = keys[j.id] = (-effective_priority(j, now, config), j.submit_time, j.id)
            if best is None or k < best[0]:
                best = (k, prio)
        prio = best[1]
        h = heaps[prio]
        team = heapq.heappop(h)[3]
        js = teams[prio][team]
        i = nxt[prio, team]
        nxt[prio, team] = i + 1
        yield js[i]
        if i + 1 < len(js):
            heapq.heappush(h, (share(team), js[i + 1].submit_time, js[i + 1].id, team))
        elif not h:
            del heaps[prio]


def _over_whole_quota(job: JobView, quota: Quota | None) -> str | None:
    if quota is None:
        return None
    c, g = job.min_allowed * job.cpus_per_worker, job.min_allowed * job.gpus_per_worker
    if quota.cpus is not None and c > quota.cpus + _EPS:
        return f"min gang needs {c:g} CPU but team {job.team!r} quota is {quota.cpus:g} CPU"
    if quota.gpus is not None and g > quota.gpus + _EPS:
        return f"min gang needs {g:g} GPU but team {job.team!r} quota is {quota.gpus:g} GPU"
    return None


def _over_all_it_may_borrow(job: JobView, quotas: Mapping[str, Quota], cluster: ClusterState,
                            cache: dict[str, tuple[float, float]]) -> str | None:
    """Why the job's smallest gang needs more than its team could hold even on an idle cluster
    (its guarantee, the other guarantees of its cohort and the capacity no team guarantees, up
    to its max), else None. Only for a cluster that cannot grow."""
    if job.team not in cache:
        total = (sum(n.cpus for n in cluster.nodes), sum(n.gpus for n in cluster.nodes))
        g_all = [sum(q.guaranteed[r] for q in quotas.values()) for r in (0, 1)]
        q = quotas.get(job.team)
        cohort = q.cohort if q is not None else None
        most = q.most if q is not None else (_INF, _INF)
        own = q.guaranteed if q is not None else (0.0, 0.0)
        mates = [sum(o.guaranteed[r] for t, o in quotas.items()
                     if cohort and o.cohort == cohort and t != job.team) for r in (0, 1)]
        cache[job.team] = tuple(
            most[r] if g_all[r] <= _EPS else
            min(most[r], own[r] + mates[r] + max(0.0, total[r] - g_all[r])) for r in (0, 1))
    ceil = cache[job.team]
    for r, res, per in ((0, "CPU", job.cpus_per_worker), (1, "GPU", job.gpus_per_worker)):
        need = job.min_allowed * per
        if per > 0 and need > ceil[r] + _EPS:
            return (f"min gang needs {need:g} {res} but team {job.team!r} can hold at most "
                    f"{ceil[r]:g} {res} even on an idle cluster (its guarantee, its cohort's and "
                    f"what no team guarantees)")
    return None


class _Ledger:
    """Every team's use against its :class:`Quota`, per resource, kept up to date as the cycle
    admits and grows, so each question (:meth:`cap`, :meth:`within_guarantee`) costs O(1).

    Borrowing, per resource r: a team's *excess* is its use over its guarantee; its *lendable*
    part is its guarantee less its use and less what its own queued jobs that fit in it ask for
    (jobs that need to borrow themselves hold nothing back, so no two teams wait on each other's
    guarantee). A cohort's
    excess is served first by its members' lendable capacity, the rest by the *pool* (the
    cluster's total less all guarantees). Admission keeps the sum of those rests within the pool.
    A team without a cohort is a cohort of its own. Resources nobody guarantees skip all this: the
    max is the only limit (plain caps, as before guarantees existed).
    """

    def __init__(self, quotas: Mapping[str, Quota], usage: dict[str, list[float]],
                 waiting: Sequence[JobView], cluster: ClusterState):
        self.quotas = quotas
        self.use = usage
        self.total = (sum(n.cpus for n in cluster.nodes), sum(n.gpus for n in cluster.nodes))
        gc = sum(q.guaranteed_cpus for q in quotas.values())
        gg = sum(q.guaranteed_gpus for q in quotas.values())
        self.pool = (self.total[0] - gc, self.total[1] - gg)
        self.active = (gc > _EPS, gg > _EPS)
        self.want: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._wanting: set[str] = set()  # queued jobs counted in ``want``
        self.excess: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.lendable: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.drawn = [0.0, 0.0]  # from the pool, by all cohorts
        self.version = 0  # moves with every charge (caches of the caller key on it)
        self._over: dict[str, dict[str, list[float]]] = {}
        if not any(self.active):
            return
        for j in waiting:  # what the owners' queued jobs ask of their guarantees
            if self.within_guarantee(j):
                w = self.want[j.team]
                w[0] += j.min_allowed * j.cpus_per_worker
                w[1] += j.min_allowed * j.gpus_per_worker
                self._wanting.add(j.id)
        for team in set(usage) | set(quotas):
            k = self._group(team)
            e, l = self._el(team)
            for r in (0, 1):
                self.excess[k][r] += e[r]
                self.lendable[k][r] += l[r]
        for k, e in self.excess.items():
            for r in (0, 1):
                self.drawn[r] += max(0.0, e[r] - self.lendable[k][r])

    def _group(self, team: str) -> tuple[str, str]:
        q = self.quotas.get(team)
        return ("cohort", q.cohort) if q is not None and q.cohort else ("team", team)

    def _guaranteed(self, team: str) -> tuple[float, float]:
        q = self.quotas.get(team)
        return q.guaranteed if q is not None else (0.0, 0.0)

    def _el(self, team: str) -> tuple[list[float], list[float]]:
        """The team's (excess, lendable) per resource."""
        g, u = self._guaranteed(team), self.use.get(team, (0.0, 0.0))
        w = self.want.get(team, (0.0, 0.0))
        return ([max(0.0, u[r] - g[r]) for r in (0, 1)],
                [max(0.0, g[r] - u[r] - w[r]) for r in (0, 1)])

    def charge(self, team: str, cpus: float, gpus: float, asked: JobView | None = None) -> None:
        """The team now uses ``cpus``, ``gpus`` more; ``asked``: the queued job they went to (it
        asks for nothing any more)."""
        self.version += 1
        self._over.clear()
        track = any(self.active)
        if track:
            k = self._group(team)
            e0, l0 = self._el(team)
        u = self.use[team]
        u[0] += cpus
        u[1] += gpus
        if asked is not None and asked.id in self._wanting:
            self._wanting.discard(asked.id)
            w = self.want[team]
            w[0] -= asked.min_allowed * asked.cpus_per_worker
            w[1] -= asked.min_allowed * asked.gpus_per_worker
        if not track:
            return
        e1, l1 = self._el(team)
        E, L = self.excess[k], self.lendable[k]
        for r in (0, 1):
            before = max(0.0, E[r] - L[r])
            E[r] += e1[r] - e0[r]
            L[r] += l1[r] - l0[r]
            self.drawn[r] += max(0.0, E[r] - L[r]) - before

    def ceiling(self, team: str) -> tuple[list[float], list[float]]:
        """How much of each resource the team may hold now: (by its max and borrowing, by its
        max alone)."""
        q = self.quotas.get(team)
        most = q.most if q is not None else (_INF, _INF)
        out = list(most)
        if not any(self.active):
            return out, list(most)
        k = self._group(team)
        g = self._guaranteed(team)
        e, l = self._el(team)
        E, L = self.excess[k], self.lendable[k]
        for r in (0, 1):
            if not self.active[r]:
                continue
            # Over its guarantee the team lends nothing; its excess grows the cohort's, whose
            # rest beyond the others' lendable capacity must stay within the pool.
            pool_left = self.pool[r] - (self.drawn[r] - max(0.0, E[r] - L[r]))
            borrow = 0.0 if pool_left < -_EPS else max(0.0, pool_left + (L[r] - l[r]) - (E[r] - e[r]))
            out[r] = min(most[r], g[r] + borrow)
        return out, list(most)

    def cap(self, job: JobView, have: int = 0) -> int:
        """How many more workers the team's quota allows ``job`` (capped at what it can use)."""
        hi = job.max_allowed - have
        ceil, _ = self.ceiling(job.team)
        u = self.use.get(job.team, (0.0, 0.0))
        for r, per in ((0, job.cpus_per_worker), (1, job.gpus_per_worker)):
            if per > 0 and ceil[r] < _INF:
                hi = min(hi, int((ceil[r] - u[r] + _EPS) // per))
        return max(hi, 0)

    def within_guarantee(self, job: JobView) -> bool:
        """Whether the job's smallest gang fits in what its team has left of its guarantee."""
        g, u = self._guaranteed(job.team), self.use.get(job.team, (0.0, 0.0))
        need = (job.min_allowed * job.cpus_per_worker, job.min_allowed * job.gpus_per_worker)
        return any(need) and all(need[r] <= 0 or (self.active[r] and u[r] + need[r] <= g[r] + _EPS)
                                 for r in (0, 1))

    def over(self, job: JobView) -> dict[str, list[float]]:
        """Teams a reclaim for ``job`` may preempt, and how much each runs over its guarantee:
        the borrowers of its cohort, and, where the pool is over-drawn, every team over its
        guarantee. The job's own team is never one of them."""
        if job.team in self._over:
            return self._over[job.team]
        k = self._group(job.team)
        overdrawn = [self.active[r] and self.drawn[r] > self.pool[r] + _EPS for r in (0, 1)]
        out: dict[str, list[float]] = {}
        for team in self.use:
            if team == job.team:
                continue
            e, _ = self._el(team)
            same = k[0] == "cohort" and self._group(team) == k
            left = [e[r] if (same or overdrawn[r]) and self.active[r] else 0.0 for r in (0, 1)]
            if left[0] > _EPS or left[1] > _EPS:
                out[team] = left
        self._over[job.team] = out
        return out

    def runs_over(self, team: str) -> bool:
        """Whether the team uses more of some resource than it is guaranteed."""
        g, u = self._guaranteed(team), self.use.get(team, (0.0, 0.0))
        return u[0] > g[0] + _EPS or u[1] > g[1] + _EPS

    def same_cohort(self, a: str, b: str) -> bool:
        k = self._group(a)
        return k[0] == "cohort" and self._group(b) == k

    def detail(self, job: JobView) -> str:
        """Which of the team's limits holds the job's smallest gang back: its max (use/limit), or
        borrowing (use, guarantee and what it may borrow)."""
        ceil, most = self.ceiling(job.team)
        g, u = self._guaranteed(job.team), self.use.get(job.team, (0.0, 0.0))
        q = self.quotas.get(job.team)
        cohort = q.cohort if q is not None else None
        parts = []
        for r, res, per in ((0, "CPU", job.cpus_per_worker), (1, "GPU", job.gpus_per_worker)):
            need = job.min_allowed * per
            if per <= 0 or ceil[r] == _INF or (ceil[r] - u[r] + _EPS) // per >= job.min_allowed:
                continue
            if most[r] < _INF and (most[r] - u[r] + _EPS) // per < job.min_allowed:
                parts.append(f"team {job.team!r} {res} quota {u[r]:g}/{most[r]:g} in use, "
                             f"its gang needs {need:g} more")
            else:
                src = (f"idle guarantees of cohort {cohort!r} and capacity no team guarantees"
                       if cohort else "capacity no team guarantees (it has no cohort)")
                parts.append(f"team {job.team!r} {res} {u[r]:g} in use, {g[r]:g} guaranteed, its gang "
                             f"needs {need:g} more; borrowing: {max(0.0, ceil[r] - g[r]):g} {res} "
                             f"free to borrow from {src}")
        return "; ".join(parts)


def _gang(job: JobView) -> str:
    c, g = job.bundle
    return f"{job.min_allowed} x ({c:g} CPU{f', {g:g} GPU' if g else ''})"


def _reserved_shapes(cap: Capacity) -> Counter:
    """What reservations hide, as a change to ``cap``'s free shapes (count per free shape): the
    withheld nodes' shapes, and each node with held slots at its shape with them back."""
    out = Counter(cap.free[n] for n in cap.withheld)
    for n, (hc, hg) in cap.held.items():
        fc, fg = cap.free[n]
        out[cap.free[n]] -= 1
        out[(round(fc + hc, 6), round(fg + hg, 6))] += 1
    return out


def _starts(start: float, now: float, sep: str = "; ") -> str:
    """The estimated start of a reservation as a clause for :class:`Wait`'s detail."""
    if start == -_INF:
        return ""
    if start >= _INF:
        return f"{sep}no estimated start: jobs without a time limit hold what it needs"
    if start <= now:
        return f"{sep}estimated start now"
    m = int((start - now + 59) // 60)
    return f"{sep}estimated start in {m // 60}h{m % 60:02d}m, when running jobs reach their time limits"


def _room(job: JobView, cap: Capacity, reserved: Counter) -> tuple[int, str]:
    """How many of the job's workers the free nodes hold, counting nodes reserved for a blocked
    job (``reserved``: their free shapes), and a line with its need, the largest free node and
    the total free capacity. O(free shapes)."""
    shapes = Counter({s: len(ns) for s, ns in cap.by_shape.items() if ns})
    shapes.update(reserved)
    room, best, best_shape, fc, fg = 0, 0, (0.0, 0.0), 0.0, 0.0
    for shape, k in shapes.items():
        if k <= 0:
            continue
        w = _fit(shape, job.bundle)
        room += w * k
        fc, fg = fc + shape[0] * k, fg + shape[1] * k
        if (w, shape) > (best, best_shape):
            best, best_shape = w, shape
    gpu = job.gpus_per_worker > 0
    res = (lambda c, g: f"{c:g} CPU" + (f", {g:g} GPU" if gpu else ""))
    return room, (f"needs {_gang(job)}; largest free node {res(*best_shape)} (fits {best}), "
                  f"free in all {res(fc, fg)} (fits {room})")


def _behind(head: JobView, preemptor: JobView | None, config: PolicyConfig,
            on_reserved: bool = False, start: str = "") -> str:
    holders = head.id + (f" and {preemptor.id}" if preemptor is not None else "")
    if on_reserved:
        what = "slots" if config.slot_reservation else "nodes"
        return f"head {holders} holds the {what} it fits on (first in line{start})"
    why = "backfill is off" if not config.backfill else \
        f"backfill looks at {config.backfill_depth} jobs behind it per cycle"
    return f"head {holders} is first in line; {why}"


def _reserve_for(job: JobView, cap: Capacity, running: Sequence[JobView], *, config: PolicyConfig,
                 now: float, out: list[Decision], touched: set[str],
                 preempts_head: bool = False, ledger: "_Ledger | None" = None
                 ) -> tuple[str | None, float]:
    """Give a blocked job a reservation backfill cannot touch, preempting for it if it may.

    Order of resort: capacity already being released by stopping jobs; then shrinking elastic
    lower-class jobs to their smallest allowed count; then stopping lower-class victims (lowest
    class, freshest checkpoint first). Victims are only touched if the job then fits. Otherwise
    the job waits for running jobs to end: with ``estimate_start``, at the earliest time their
    time limits free room for its gang (Slurm's shadow time), it holds what it will use then and
    cannot get from jobs ending before; else (or if jobs without a limit stand in the way) it
    holds the nodes with most free room whose total size holds its gang. It holds slots (its
    workers' CPU and GPU on each node) or, without ``slot_reservation``, whole nodes.

    Returns what the job waits for besides free nodes, if anything (for :class:`Wait`), and its
    estimated start (``now`` when it waits only for stopping jobs, ``inf`` when unknown, ``-inf``
    when it holds nothing: ``reservation`` is off).
    """
    # Capacity that jobs already told to stop or shrink will hand back. A job outranking the head
    # by class may also take the head's nodes (the head got there by aging alone).
    trial = cap.copy(withheld=not preempts_head)
    free_now = dict(trial.free)
    stopping = []
    for r in running:
        if r.stopping:
            trial.give(_released(r, r.target_workers or 0), r.bundle)
            stopping.append(r)
    placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
    note = None
    if placement is not None:
        ids = sorted(r.id for r in stopping if set(r.placement) & set(placement))
        note = f"reserved nodes {', '.join(sorted(placement))}, freed by stopping {', '.join(ids)}" if ids else None
    elif config.preemption:
        n = len(out)
        placement = _preempt_for(job, trial, running, out, now - config.min_run_before_preempt_s,
                                 touched, ledger)
        if placement is not None:
            note = "preempting " + ", ".join(
                f"{d.job_id} ({'shrink to ' + str(d.to_workers) if isinstance(d, Shrink) else 'stop'})"
                for d in out[n:])
    if placement is not None:
        _hold(cap, job, placement, config)
        return note, now
    if not config.reservation:
        return None, -_INF  # it holds nothing
    if config.estimate_start:
        shadow = _estimated_start(job, trial, running, now)
        if shadow is not None:
            start, placement = shadow
            released = {n: (trial.free[n][0] - free_now[n][0], trial.free[n][1] - free_now[n][1])
                        for n in placement}
            _hold(cap, job, placement, config, released)
            return None, start
    _hold(cap, job, _slots_to_wait_for(job, cap), config)
    return None, _INF


def _estimated_start(job: JobView, trial: Capacity, running: Sequence[JobView], now: float
                     ) -> tuple[float, dict[str, int]] | None:
    """When the job's smallest gang fits if running jobs free their capacity at their time
    limits (``trial``: free capacity, stopping jobs' already given back; it is changed), and
    where it would go: ``(time, placement)``; None if jobs without a limit stand in the way.
    O(workers released) plus one placement."""
    ends = sorted((max(now, r.start_time + r.time_limit), r.id, r) for r in running
                  if r.time_limit is not None and r.start_time is not None and not r.stopping
                  and r.workers > 0)
    need, bundle = job.min_allowed, job.bundle
    room = sum(_fit(shape, bundle) * len(ns) for shape, ns in trial.by_shape.items() if ns)
    start = now
    for end, _, r in ends:
        if room >= need:
            break
        before = {n: _fit(trial.free[n], bundle) for n in r.placement
                  if n in trial.free and n not in trial.withheld}
        trial.give(r.placement, r.bundle)
        room += sum(_fit(trial.free[n], bundle) - k for n, k in before.items())
        start = end
    if room < need:
        return None
    placement = trial.place(need, need, bundle)
    return (start, placement) if placement is not None else None


def _hold(cap: Capacity, job: JobView, placement: Mapping[str, int], config: PolicyConfig,
          released: Mapping[str, tuple[float, float]] | None = None) -> None:
    """Reserve the job's ``placement`` on ``cap``: the slots (less what ``released`` says jobs
    ending before it starts free there) or, without ``slot_reservation``, the whole nodes."""
    if not config.slot_reservation:
        cap.withhold(placement)
        return
    c, g = job.bundle
    for n, w in placement.items():
        rc, rg = released.get(n, (0.0, 0.0)) if released else (0.0, 0.0)
        cap.hold(n, (w * c - rc, w * g - rg))


def _place_gang(cap: Capacity, job: JobView, hi: int) -> dict[str, int] | None:
    """Place the largest allowed count of ``job`` up to ``hi`` that fits now; None if its
    smallest allowed count does not."""
    placement = cap.place(job.min_allowed, hi, job.bundle)
    if placement is None:
        return None
    n = sum(placement.values())
    w = job.largest_allowed_at_most(n)
    if w is None:
        return None
    return placement if w == n else cap.place(w, w, job.bundle)


def _released(r: JobView, to_workers: int) -> dict[str, int]:
    """Workers per node freed when ``r`` goes down to ``to_workers`` (its last nodes first)."""
    drop = r.workers - to_workers
    out: dict[str, int] = {}
    for n, w in sorted(r.placement.items(), key=lambda nw: (nw[1], nw[0])):
        if drop <= 0:
            break
        k = min(w, drop)
        out[n] = k
        drop -= k
    return out


def _preempt_for(job: JobView, trial: Capacity, running: Sequence[JobView], out: list[Decision],
                 started_before: float, touched: set[str],
                 ledger: "_Ledger | None" = None) -> dict[str, int] | None:
    # With guarantees, a job of another team is a victim only while that team runs over its own.
    guarded = ledger is not None and any(ledger.active)
    useful = [r for r in running
              if r.preemptible and not r.stopping and r.priority < job.priority and r.state == "running"
              and r.id not in touched
              and (r.start_time is None or r.start_time <= started_before)
              and any(_fit(trial.total[n], job.bundle) > 0 for n in r.placement if n in trial.total)
              and (not guarded or r.team == job.team or ledger.runs_over(r.team))]
    if not useful:
        return None
    # Lowest class first; within a class, freshest checkpoint first (least work lost), then newest.
    useful.sort(key=lambda r: (r.priority, r.checkpoint_age if r.checkpoint_age is not None else float("inf"),
                               -(r.start_time or 0.0), r.id))
    why = f"for {job.id} (priority {job.priority} > {{p}}), which cannot fit otherwise"
    return _plan_victims(job, trial, useful, out, touched, lambda r: why.format(p=r.priority))


def _plan_victims(job: JobView, trial: Capacity, useful: list[JobView], out: list[Decision],
                  touched: set[str], reason, budget: dict[str, list[float]] | None = None
                  ) -> dict[str, int] | None:
    """Free room for ``job``'s smallest gang from ``useful`` (in the order to pick them): shrink
    elastic ones to their smallest allowed count first, then stop them, until it fits; then spare
    those whose nodes the placement does not use. ``budget`` (reclaim): team -> CPU and GPU it runs
    over its guarantee; a victim is taken only while its team is still over. Appends the
    :class:`Shrink` and :class:`Preempt` decisions (``reason(victim)``) only if the job fits."""
    plan: list[tuple[str, JobView, int, dict[str, int]]] = []
    budget = {t: list(v) for t, v in budget.items()} if budget is not None else None

    def may_take(r: JobView) -> bool:
        if budget is None:
            return True
        b = budget.get(r.team, (0.0, 0.0))
        return (r.cpus_per_worker > 0 and b[0] > _EPS) or (r.gpus_per_worker > 0 and b[1] > _EPS)

    def taken(r: JobView, workers: int) -> None:
        if budget is not None:
            b = budget[r.team]
            b[0] -= workers * r.cpus_per_worker
            b[1] -= workers * r.gpus_per_worker

    placement = None
    for r in useful:  # shrink elastic jobs first: nobody stops
        if r.workers > r.min_allowed and may_take(r):
            rel = _released(r, r.min_allowed)
            trial.give(rel, r.bundle)
            taken(r, r.workers - r.min_allowed)
            plan.append(("shrink", r, r.min_allowed, rel))
            placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
            if placement is not None:
                break
    if placement is None:
        for r in useful:  # then stop victims
            if not may_take(r):
                continue
            rel = _released(r, 0)
            shrunk = next((p for p in plan if p[1] is r), None)
            if shrunk is not None:
                plan.remove(shrunk)
                rel = {n: w - shrunk[3].get(n, 0) for n, w in rel.items() if w - shrunk[3].get(n, 0) > 0}
            trial.give(rel, r.bundle)
            taken(r, sum(rel.values()))
            plan.append(("stop", r, 0, _released(r, 0)))
            placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
            if placement is not None:
                break
    if placement is None:
        return None
    # Spare victims the placement did not need (e.g. on nodes it does not use).
    used = set(placement)
    plan = [p for p in plan if used & set(p[3])]
    for kind, r, to, rel in plan:
        touched.add(r.id)
        if kind == "shrink":
            out.append(Shrink(r.id, to, rel, reason(r)))
        else:
            out.append(Preempt(r.id, reason(r), checkpoint_first=True))
    return placement


def _reclaim_for(job: JobView, cap: Capacity, running: Sequence[JobView], ledger: _Ledger, *,
                 config: PolicyConfig, now: float, out: list[Decision], touched: set[str]) -> str | None:
    """A job within its team's guarantee that does not fit takes the share back: it reserves
    capacity that stopping borrowers are about to free, else preempts jobs of teams running over their
    guarantee (see :meth:`_Ledger.over`), whatever their class: its cohort's first, then lowest
    class, then most recently started; as few as make room, never more than a team runs over.
    Nodes reserved for the head stay its own. Returns what it waits for (its nodes are then
    withheld from backfill), or None if nothing it may reclaim makes room."""
    budget = ledger.over(job)
    if not budget:
        return None
    stopping = [r for r in running if r.stopping and r.team in budget]  # borrowers already going
    budget = {t: list(v) for t, v in budget.items()}
    trial = cap.copy()
    for r in stopping:
        rel = _released(r, r.target_workers or 0)
        trial.give(rel, r.bundle)
        b, n = budget[r.team], sum(rel.values())
        b[0] -= n * r.cpus_per_worker  # what a team already gives back counts against its excess
        b[1] -= n * r.gpus_per_worker
    placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
    if placement is not None:
        ids = sorted(r.id for r in stopping if set(r.placement) & set(placement))
        if not ids:  # it did not fit on free nodes: something was about to free there
            return None
        cap.withhold(placement)
        return (f"reclaiming the guaranteed share of team {job.team!r}: reserved nodes "
                f"{', '.join(sorted(placement))}, freed by stopping {', '.join(ids)}")
    if not config.preemption:
        return None
    started_before = now - config.min_run_before_preempt_s
    useful = [r for r in running
              if r.team in budget and r.preemptible and not r.stopping and r.state == "running"
              and r.id not in touched and (r.start_time is None or r.start_time <= started_before)
              and any(_fit(trial.total[n], job.bundle) > 0 for n in r.placement if n in trial.total)]
    if not useful:
        return None
    useful.sort(key=lambda r: (not ledger.same_cohort(job.team, r.team), r.priority,
                               -(r.start_time or 0.0), r.id))
    n = len(out)
    placement = _plan_victims(
        job, trial, useful, out, touched,
        lambda r: f"to give team {job.team!r} back its guaranteed share for {job.id}: "
                  f"team {r.team!r} runs over its own guarantee", budget)
    if placement is None:
        return None
    cap.withhold(placement)
    return f"reclaiming the guaranteed share of team {job.team!r}: preempting " + ", ".join(
        f"{d.job_id} ({'shrink to ' + str(d.to_workers) if isinstance(d, Shrink) else 'stop'})"
        for d in out[n:])


def _slots_to_wait_for(job: JobView, cap: Capacity) -> dict[str, int]:
    """Where a blocked gang will start (workers per node): the nodes with most free room first,
    each taking as many workers as the whole node holds, until they hold the gang."""
    need = job.min_allowed
    chosen: dict[str, int] = {}
    for shape, nodes in sorted(cap.by_shape.items(), key=lambda sn: -_fit(sn[0], job.bundle)):
        for n in sorted(nodes):
            size = min(_fit(cap.total[n], job.bundle), need)
            if size <= 0:
                continue
            chosen[n] = size
            need -= size
            if need <= 0:
                return chosen
    return chosen
