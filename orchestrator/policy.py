"""Scheduling policy: plain data in, plain decisions out (DESIGN invariant 6).

Nothing here imports Ray or touches the store. :func:`decide` is called by the scheduler service
(``orchestrator.service``) on the live cluster and by the simulator (``bench/scheduler``) on a
synthetic one; both act on the returned :class:`Decision` values themselves.

What one call does, in order:

1. Requeue jobs that were stopped by a preemption (``state == "preempted"``).
2. Reject queued jobs that can never run: their minimum gang does not pack onto the cluster's
   nodes even when empty, or needs more than their team's whole quota.
3. Walk the queue by *effective* priority (class + aging, FIFO inside a class) and admit every gang
   whose smallest allowed worker count packs onto nodes now (up to its largest), within team
   quotas. A job only ever holds a count in its ``allowed`` set (those that split its batch).
4. The first gang that does not fit is the *head*. It reserves the nodes it will start on; jobs
   behind it may start (backfill) only on other nodes, so they never delay it.
5. A blocked job whose class outranks running preemptible jobs gets capacity by first shrinking
   elastic lower-class jobs to their smallest allowed count, then stopping the lowest-class victims,
   freshest checkpoint first, after they checkpoint. Nothing is touched unless that frees enough.
6. Elastic jobs below their largest allowed count grow into capacity nobody queued needs.
7. Gangs still blocked are announced to the autoscaler (:class:`RequestResources`).

:func:`decide_with_reasons` makes the same decisions and also says, where each is made, why every
queued job it did not admit waits (:class:`Wait`, one code of :data:`WAIT_CODES`).
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
    admits, grows and shrinks jobs to allowed counts only.
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

    def __post_init__(self):
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
    """The most a team may hold at once. ``None`` is unlimited."""
    cpus: float | None = None
    gpus: float | None = None


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

# Why a queued job is not admitted. ``backoff`` is decided by the service (a failed job is not
# offered to the policy until its retry delay has passed); the others here, in :func:`decide`.
WAIT_CODES = ("quota", "gang_does_not_fit", "autoscaler", "behind_reserved_head", "backoff",
              "never_fits")


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

    def __init__(self, nodes: Iterable[Node]):
        self.total: dict[str, tuple[float, float]] = {}
        self.free: dict[str, tuple[float, float]] = {}
        self.by_shape: dict[tuple[float, float], set[str]] = defaultdict(set)
        self.withheld: set[str] = set()
        self.free_cpus = 0.0
        self.free_gpus = 0.0
        for n in nodes:
            self.total[n.id] = (n.cpus, n.gpus)
            self._set(n.id, (max(0.0, n.free_cpus), max(0.0, n.free_gpus)))

    def copy(self, *, withheld: bool = True) -> "Capacity":
        """An independent copy; ``withheld=False`` puts reserved nodes back in play."""
        c = Capacity.__new__(Capacity)
        c.total, c.free, c.withheld = self.total, dict(self.free), set(self.withheld)
        c.by_shape = defaultdict(set, {k: set(v) for k, v in self.by_shape.items() if v})
        c.free_cpus, c.free_gpus = self.free_cpus, self.free_gpus
        if not withheld:
            back, c.withheld = c.withheld, set()
            for n in back:
                shape = c.free[n]
                c.by_shape[shape].add(n)
                c.free_cpus += shape[0]
                c.free_gpus += shape[1]
        return c

    def _set(self, node: str, shape: tuple[float, float]) -> None:
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
        for n in nodes:
            if n in self.withheld or n not in self.free:
                continue
            shape = self.free[n]
            self.by_shape[shape].discard(n)
            self.free_cpus -= shape[0]
            self.free_gpus -= shape[1]
            self.withheld.add(n)

    def take(self, placement: Mapping[str, int], bundle: tuple[float, float]) -> None:
        c, g = bundle
        for n, w in placement.items():
            fc, fg = self.free[n]
            self._set(n, (fc - w * c, fg - w * g))

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
        take the most workers each, so a gang spans as few nodes as possible.
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
        want = min(hi, total)
        single = [(w, s) for w, s in fits if w >= want]
        if single:
            _, shape = min(single, key=lambda ws: (ws[0], ws[1]))
            return {min(self.by_shape[shape]): want}
        out: dict[str, int] = {}
        left = want
        for w, shape in sorted(fits, key=lambda ws: (-ws[0], ws[1])):
            for n in sorted(self.by_shape[shape]):
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
    cap = Capacity(cluster.nodes)
    usage: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for r in running:
        u = usage[r.team]
        u[0] += r.workers * r.cpus_per_worker
        u[1] += r.workers * r.gpus_per_worker

    # 1-2: requeue stopped victims; reject what can never run.
    waiting: list[JobView] = []
    never: dict[tuple[int, int, float, float], str | None] = {}
    for j in queue:
        if j.state == "preempted":
            out.append(Requeue(j.id, "preempted; resumes from its last checkpoint"))
        key = (j.min_workers, j.min_allowed, j.cpus_per_worker, j.gpus_per_worker)
        if key not in never:
            never[key] = fits_empty_cluster(j, cluster)
        reason = never[key] or _over_whole_quota(j, quotas.get(j.team))
        if reason:
            out.append(Reject(j.id, reason))
            if explain:
                waits.append(Wait(j.id, "never_fits", reason))
        else:
            waiting.append(j)

    # 3: FIFO inside each class, classes merged lazily by effective priority (aging).
    order = _by_effective_priority(waiting, now, config)
    head: JobView | None = None
    preemptor: JobView | None = None
    blocked: list[JobView] = []
    failed_shapes: set[tuple[int, float, float]] = set()  # min gangs that did not fit this cycle
    examined = 0
    touched: set[str] = set()  # jobs already told to shrink or stop this cycle
    # explain only: job id -> (code, detail) of a blocked job; "gang" becomes gang_does_not_fit or
    # autoscaler once step 7 knows what it asked for. Room on reserved nodes, by free shape.
    why: dict[str, tuple[str, str]] = {}
    reserved: Counter | None = None
    for j in order:
        if head is not None:
            if not config.backfill or examined >= config.backfill_depth:
                blocked.append(j)
                if explain:
                    why[j.id] = ("behind_reserved_head", _behind(head, preemptor, config))
                continue
            examined += 1
        if not _within_quota(j, j.min_allowed, usage, quotas.get(j.team)):
            if explain:
                waits.append(Wait(j.id, "quota", _quota_detail(j, usage, quotas[j.team])))
            continue  # over quota: waits without blocking other teams
        key = (j.min_allowed, j.cpus_per_worker, j.gpus_per_worker)
        placement = None
        if key not in failed_shapes:
            placement = _place_gang(cap, j, _quota_cap(j, usage, quotas.get(j.team)))
        if placement is None:
            failed_shapes.add(key)
            blocked.append(j)
            if explain:
                if reserved is None:
                    reserved = Counter(cap.free[n] for n in cap.withheld)
                room, detail = _room(j, cap, reserved)
                why[j.id] = (("behind_reserved_head", _behind(head, preemptor, config, on_reserved=True))
                             if head is not None and room >= j.min_allowed else ("gang", detail))
            if head is None:  # 4: the head reserves its nodes (and may preempt for them)
                head = j
                note = _reserve_for(j, cap, running, config=config, now=now, out=out, touched=touched)
                if explain:
                    why[j.id] = ("gang", why[j.id][1] + (f"; {note}" if note else ""))
                    reserved = None
                continue
            if not (config.preemption and preemptor is None and j.priority > head.priority):
                continue
            # 5: an aged head may outrank a newer job of a higher class, which may still take
            # the head's nodes or preempt for itself.
            preemptor = j
            hi = _quota_cap(j, usage, quotas.get(j.team))
            placement = _place_gang(cap.copy(withheld=False), j, hi)
            if placement is None:
                note = _reserve_for(j, cap, running, config=config, now=now, out=out, touched=touched,
                                    preempts_head=True)
                if explain:  # it fits nowhere now, reserved nodes included: its room stands
                    why[j.id] = ("gang", why[j.id][1] + (f"; {note}" if note else ""))
                    reserved = None
                continue
            blocked.pop()
            why.pop(j.id, None)
            reserved = None  # it may take reserved nodes
        workers = sum(placement.values())
        cap.take(placement, j.bundle)
        u = usage[j.team]
        u[0] += workers * j.cpus_per_worker
        u[1] += workers * j.gpus_per_worker
        out.append(Admit(j.id, workers, placement))

    # 6: nobody is waiting for capacity: elastic jobs grow into it.
    if config.grow and head is None:
        for r in sorted(running, key=lambda r: (-r.priority, r.submit_time, r.id)):
            if r.stopping or r.workers >= r.max_allowed or r.state != "running":
                continue
            hi = _quota_cap(r, usage, quotas.get(r.team), have=r.workers)
            if hi <= 0:
                continue
            add = cap.place(1, hi, r.bundle)
            to = r.largest_allowed_at_most(r.workers + sum(add.values())) if add else None
            if to is not None and to > r.workers:
                if to - r.workers < sum(add.values()):  # room for a count with no batch split
                    add = cap.place(to - r.workers, to - r.workers, r.bundle)
                n = sum(add.values())
                cap.take(add, r.bundle)
                usage[r.team][0] += n * r.cpus_per_worker
                usage[r.team][1] += n * r.gpus_per_worker
                out.append(Grow(r.id, r.workers + n, add))

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


def _over_whole_quota(job: JobView, quota: Quota | None) -> str | None:
    if quota is None:
        return None
    c, g = job.min_allowed * job.cpus_per_worker, job.min_allowed * job.gpus_per_worker
    if quota.cpus is not None and c > quota.cpus + _EPS:
        return f"min gang needs {c:g} CPU but team {job.team!r} quota is {quota.cpus:g} CPU"
    if quota.gpus is not None and g > quota.gpus + _EPS:
        return f"min gang needs {g:g} GPU but team {job.team!r} quota is {quota.gpus:g} GPU"
    return None


def _within_quota(job: JobView, workers: int, usage, quota: Quota | None) -> bool:
    return _quota_cap(job, usage, quota) >= workers


def _quota_cap(job: JobView, usage, quota: Quota | None, have: int = 0) -> int:
    """How many more workers the team's quota allows this job (capped at what it can use)."""
    hi = job.max_allowed - have
    if quota is None:
        return hi
    uc, ug = usage[job.team] if job.team in usage else (0.0, 0.0)
    if quota.cpus is not None and job.cpus_per_worker > 0:
        hi = min(hi, int((quota.cpus - uc + _EPS) // job.cpus_per_worker))
    if quota.gpus is not None and job.gpus_per_worker > 0:
        hi = min(hi, int((quota.gpus - ug + _EPS) // job.gpus_per_worker))
    return max(hi, 0)


def _gang(job: JobView) -> str:
    c, g = job.bundle
    return f"{job.min_allowed} x ({c:g} CPU{f', {g:g} GPU' if g else ''})"


def _quota_detail(job: JobView, usage, quota: Quota) -> str:
    """Which of the team's quotas holds the job's smallest gang back, with use and limit."""
    uc, ug = usage[job.team] if job.team in usage else (0.0, 0.0)
    parts = []
    for res, used, limit, per in (("CPU", uc, quota.cpus, job.cpus_per_worker),
                                  ("GPU", ug, quota.gpus, job.gpus_per_worker)):
        if limit is not None and per > 0 and int((limit - used + _EPS) // per) < job.min_allowed:
            parts.append(f"team {job.team!r} {res} quota {used:g}/{limit:g} in use, "
                         f"its gang needs {job.min_allowed * per:g} more")
    return "; ".join(parts)


def _room(job: JobView, cap: Capacity, reserved: Counter) -> tuple[int, str]:
    """How many of the job's workers the free nodes hold, counting nodes reserved for a blocked
    job (``reserved``: their free shapes), and a line with its need, the largest free node and
    the total free capacity. O(free shapes)."""
    shapes = Counter({s: len(ns) for s, ns in cap.by_shape.items() if ns})
    shapes.update(reserved)
    room, best, best_shape, fc, fg = 0, 0, (0.0, 0.0), 0.0, 0.0
    for shape, k in shapes.items():
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
            on_reserved: bool = False) -> str:
    holders = head.id + (f" and {preemptor.id}" if preemptor is not None else "")
    if on_reserved:
        return f"head {holders} holds the nodes it fits on (first in line)"
    why = "backfill is off" if not config.backfill else \
        f"backfill looks at {config.backfill_depth} jobs behind it per cycle"
    return f"head {holders} is first in line; {why}"


def _reserve_for(job: JobView, cap: Capacity, running: Sequence[JobView], *, config: PolicyConfig,
                 now: float, out: list[Decision], touched: set[str],
                 preempts_head: bool = False) -> str | None:
    """Give a blocked job a reservation backfill cannot touch, preempting for it if it may.

    Order of resort: capacity already being released by stopping jobs; then shrinking elastic
    lower-class jobs to their smallest allowed count; then stopping lower-class victims (lowest
    class, freshest checkpoint first). Victims are only touched if the job then fits. Otherwise the
    job reserves the nodes with most free room whose total size holds its gang.

    Returns what the job waits for besides free nodes, if anything (for :class:`Wait`).
    """
    # Capacity that jobs already told to stop or shrink will hand back. A job outranking the head
    # by class may also take the head's nodes (the head got there by aging alone).
    trial = cap.copy(withheld=not preempts_head)
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
                                 touched)
        if placement is not None:
            note = "preempting " + ", ".join(
                f"{d.job_id} ({'shrink to ' + str(d.to_workers) if isinstance(d, Shrink) else 'stop'})"
                for d in out[n:])
    if placement is not None:
        cap.withhold(placement)
        return note
    cap.withhold(_nodes_to_wait_for(job, cap))
    return None


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
                 started_before: float, touched: set[str]) -> dict[str, int] | None:
    useful = [r for r in running
              if r.preemptible and not r.stopping and r.priority < job.priority and r.state == "running"
              and r.id not in touched
              and (r.start_time is None or r.start_time <= started_before)
              and any(_fit(trial.total[n], job.bundle) > 0 for n in r.placement if n in trial.total)]
    if not useful:
        return None
    # Lowest class first; within a class, freshest checkpoint first (least work lost), then newest.
    useful.sort(key=lambda r: (r.priority, r.checkpoint_age if r.checkpoint_age is not None else float("inf"),
                               -(r.start_time or 0.0), r.id))
    plan: list[tuple[str, JobView, int, dict[str, int]]] = []
    placement = None
    for r in useful:  # shrink elastic jobs first: nobody stops
        if r.workers > r.min_allowed:
            rel = _released(r, r.min_allowed)
            trial.give(rel, r.bundle)
            plan.append(("shrink", r, r.min_allowed, rel))
            placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
            if placement is not None:
                break
    if placement is None:
        for r in useful:  # then stop victims
            rel = _released(r, 0)
            shrunk = next((p for p in plan if p[1] is r), None)
            if shrunk is not None:
                plan.remove(shrunk)
                rel = {n: w - shrunk[3].get(n, 0) for n, w in rel.items() if w - shrunk[3].get(n, 0) > 0}
            trial.give(rel, r.bundle)
            plan.append(("stop", r, 0, _released(r, 0)))
            placement = trial.place(job.min_allowed, job.min_allowed, job.bundle)
            if placement is not None:
                break
    if placement is None:
        return None
    # Spare victims the placement did not need (e.g. on nodes it does not use).
    used = set(placement)
    plan = [p for p in plan if used & set(p[3])]
    why = f"for {job.id} (priority {job.priority} > {{p}}), which cannot fit otherwise"
    for kind, r, to, rel in plan:
        touched.add(r.id)
        if kind == "shrink":
            out.append(Shrink(r.id, to, rel, why.format(p=r.priority)))
        else:
            out.append(Preempt(r.id, why.format(p=r.priority), checkpoint_first=True))
    return placement


def _nodes_to_wait_for(job: JobView, cap: Capacity) -> list[str]:
    """The nodes a blocked gang will start on: most free room first, until their size holds it."""
    need = job.min_allowed
    chosen: list[str] = []
    for shape, nodes in sorted(cap.by_shape.items(), key=lambda sn: -_fit(sn[0], job.bundle)):
        for n in sorted(nodes):
            size = _fit(cap.total[n], job.bundle)
            if size <= 0:
                continue
            chosen.append(n)
            need -= size
            if need <= 0:
                return chosen
    return chosen
