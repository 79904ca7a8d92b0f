"""A discrete-event cluster simulator that drives a scheduling function over a synthetic trace.

The scheduler under test is ``orchestrator.policy.decide`` itself, unchanged; the baseline is a
FIFO gang scheduler with the behaviour of plain ``ray job submit`` (each job's placement group is
placed, in submission order, as soon as it fits; no priorities, no reservation, no preemption).

Model: a job's work is worker-seconds; on ``w`` workers it progresses at ``w`` per second. A
preempted victim checkpoints first (holding its nodes ``ckpt_save_s``), and pays ``restart_s`` of
work again when it resumes; a resize pays ``resize_s``. Jobs checkpoint every ``ckpt_interval_s``.
The scheduler runs a cycle every ``tick_s`` simulated seconds in which anything changed.

Time limits (``scheduling.time_limit``) are the users' estimates: each run of a job may last its
limit from its start, and the policy sees it (``JobView.time_limit``). A run still going at its
limit is stopped as the service stops it: it checkpoints (``ckpt_save_s``) and ends *timed out*
(counted in ``timeouts``, not in goodput). FIFO is given the limits too and ignores them.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

import numpy as np

from orchestrator.policy import (PRIORITY, Admit, Capacity, ClusterState, Grow, JobView, Node,
                                 PolicyConfig, Preempt, Reject, Requeue, RequestResources, Shrink)

CLASSES = ("low", "normal", "high", "critical")


# ---------------------------------------------------------------------------------------------
# trace
# ---------------------------------------------------------------------------------------------
@dataclass
class TraceJob:
    id: str
    arrival: float
    priority: int
    team: str
    min_workers: int
    max_workers: int
    cpus: float
    gpus: float
    work: float  # worker-seconds
    time_limit: float | None = None  # the user's estimate of a run's wall time (seconds)


@dataclass
class Trace:
    nodes: list[tuple[str, float, float]]
    jobs: list[TraceJob]


def synthetic_trace(n_jobs: int = 10_000, n_nodes: int = 1_000, load: float = 1.05,
                    seed: int = 0, limit_error: tuple[float, float] | None = (1.7, 0.5)) -> Trace:
    """Mixed CPU/GPU cluster and jobs: 30% GPU nodes (64 CPU, 8 GPU), the rest 32-CPU nodes.

    Priorities low/normal/high/critical = 40/35/18/7%; gang sizes 1..64 (log-uniform-ish);
    durations log-normal (median 40 min, clipped 2 min..12 h); 40% of jobs elastic
    (min = max/2). Arrivals are Poisson, spaced so the offered load on the busier resource is
    ``load`` (above 1 the cluster is oversubscribed and queues build).

    Time limits: the true run time on the job's smallest gang (the longest it can take) times a
    log-normal estimate error of median ``limit_error[0]`` and sigma ``limit_error[1]``, never
    below 1 (users overestimate; a limit under the true run time would stop the job), plus 10
    minutes for checkpoints and resizes. ``None``: no job has a limit. The limits draw their own
    random numbers after everything else, so the rest of the trace is the same either way.
    """
    rng = np.random.default_rng(seed)
    n_gpu = int(round(n_nodes * 0.3))
    nodes = [(f"g{i}", 64.0, 8.0) for i in range(n_gpu)] + \
            [(f"c{i}", 32.0, 0.0) for i in range(n_nodes - n_gpu)]
    cap_cpu = sum(c for _, c, _ in nodes)
    cap_gpu = sum(g for _, _, g in nodes)
    prios = rng.choice(4, size=n_jobs, p=[0.40, 0.35, 0.18, 0.07])
    is_gpu = rng.random(n_jobs) < 0.45
    sizes = np.array([1, 2, 4, 8, 16, 32, 64])
    size_p = np.array([0.30, 0.22, 0.18, 0.13, 0.09, 0.05, 0.03])
    maxw = rng.choice(sizes, size=n_jobs, p=size_p / size_p.sum())
    elastic = (rng.random(n_jobs) < 0.4) & (maxw > 1)
    minw = np.where(elastic, np.maximum(1, maxw // 2), maxw)
    dur = np.clip(rng.lognormal(math.log(2400), 1.0, n_jobs), 120, 12 * 3600)
    teams = rng.choice(8, size=n_jobs)
    cpus = np.where(is_gpu, 8.0, 4.0)
    gpus = np.where(is_gpu, 1.0, 0.0)
    work = dur * maxw
    span = max((work * cpus).sum() / cap_cpu, (work * gpus).sum() / cap_gpu) / load
    arrivals = np.sort(rng.uniform(0, span, n_jobs))
    limits = [None] * n_jobs
    if limit_error is not None:
        median, sigma = limit_error
        err = np.maximum(1.0, rng.lognormal(math.log(median), sigma, n_jobs))
        limits = [float(x) for x in err * work / minw + 600.0]
    jobs = [TraceJob(f"j{i:05d}", float(arrivals[i]), PRIORITY[CLASSES[prios[i]]], f"team{teams[i]}",
                     int(minw[i]), int(maxw[i]), float(cpus[i]), float(gpus[i]), float(work[i]),
                     limits[i])
            for i in range(n_jobs)]
    return Trace(nodes, jobs)


# ---------------------------------------------------------------------------------------------
# baseline: what plain `ray job submit` gives
# ---------------------------------------------------------------------------------------------
def fifo_decide(queue, running, cluster, quotas, now, config=None):
    """FIFO gang: in submission order, every job whose gang fits now starts; nothing else."""
    cap = Capacity(cluster.nodes)
    out = []
    failed = set()
    for j in sorted(queue, key=lambda j: (j.submit_time, j.id)):
        key = (j.min_workers, j.cpus_per_worker, j.gpus_per_worker)
        if key in failed:
            continue
        p = cap.place(j.min_workers, j.max_workers, j.bundle)
        if p is None:
            failed.add(key)
            continue
        cap.take(p, j.bundle)
        out.append(Admit(j.id, sum(p.values()), p))
    return out


# ---------------------------------------------------------------------------------------------
# simulator
# ---------------------------------------------------------------------------------------------
@dataclass
class SimConfig:
    tick_s: float = 30.0
    ckpt_interval_s: float = 900.0
    ckpt_save_s: float = 60.0
    restart_s: float = 120.0
    resize_s: float = 60.0


@dataclass
class _Job:
    t: TraceJob
    view: JobView
    done: float = 0.0            # work completed
    need: float = 0.0            # work required (grows with restart/resize overhead)
    rate_since: float = 0.0      # when `workers` last changed (progress accounting)
    run_since: float = 0.0       # start of the current run (checkpoint cadence)
    first_start: float | None = None
    end: float | None = None
    version: int = 0             # invalidates stale finish events
    runs: int = 0                # admissions so far (a limit event is for one run)
    timed_out: bool = False
    preemptions: int = 0
    rejected: str | None = None


@dataclass
class Result:
    name: str
    decisions: int = 0
    decide_s: float = 0.0
    cycles: int = 0
    makespan: float = 0.0
    util_cpu: float = 0.0
    util_gpu: float = 0.0
    goodput: float = 0.0
    waits: dict[str, list[float]] = field(default_factory=dict)
    preemptions: int = 0
    shrinks: int = 0
    rejected: int = 0
    unfinished: int = 0
    timeouts: int = 0
    util_series: list[tuple[float, float, float]] = field(default_factory=list)
    util_window: float = 0.0     # allocated share while jobs were still arriving


    @property
    def utilization(self) -> float:
        return (self.util_cpu + self.util_gpu) / 2

    def wait_stats(self, cls: str) -> tuple[float, float]:
        w = self.waits.get(cls) or [0.0]
        return float(np.mean(w)), float(np.percentile(w, 95))


class Simulator:
    """Runs one trace to completion under one scheduling function."""

    def __init__(self, trace: Trace, decide_fn, name: str, config: PolicyConfig | None = None,
                 sim: SimConfig = SimConfig(), progress=None, quotas=None):
        self.trace, self.decide_fn, self.cfg, self.sim = trace, decide_fn, config or PolicyConfig(), sim
        self.quotas = quotas
        self.progress = progress
        self.free = {n: [c, g] for n, c, g in trace.nodes}
        self.total = {n: (c, g) for n, c, g in trace.nodes}
        self.cap_cpu = sum(c for _, c, _ in trace.nodes)
        self.cap_gpu = sum(g for _, _, g in trace.nodes)
        self.jobs: dict[str, _Job] = {}
        self.queue: dict[str, _Job] = {}
        self.running: dict[str, _Job] = {}
        self.events: list[tuple[float, int, str, str, int]] = []  # (time, seq, kind, job, version)
        self.seq = 0
        self.res = Result(name)
        self.used_cpu = self.used_gpu = 0.0
        self.finished = 0
        for tj in trace.jobs:
            self.push(tj.arrival, "arrive", tj.id, 0)
            self.jobs[tj.id] = _Job(tj, JobView(tj.id, tj.priority, tj.team, tj.min_workers,
                                                tj.max_workers, tj.cpus, tj.gpus, tj.arrival,
                                                time_limit=tj.time_limit),
                                    need=tj.work)

    def push(self, at: float, kind: str, jid: str, version: int) -> None:
        heapq.heappush(self.events, (at, self.seq, kind, jid, version))
        self.seq += 1

    # accounting ---------------------------------------------------------------------------------
    def settle(self, j: _Job, now: float) -> None:
        if not j.view.stopping:  # a victim saving its checkpoint makes no progress
            j.done += j.view.workers * (now - j.rate_since)
        j.rate_since = now

    def reschedule(self, j: _Job, now: float) -> None:
        j.version += 1
        if j.view.workers > 0:
            self.push(now + max(0.0, j.need - j.done) / j.view.workers, "finish", j.t.id, j.version)

    def hold(self, placement: dict[str, int], bundle, sign: int) -> None:
        c, g = bundle
        for node, w in placement.items():
            f = self.free[node]
            f[0] -= sign * w * c
            f[1] -= sign * w * g
        k = sum(placement.values()) * sign
        self.used_cpu += k * c
        self.used_gpu += k * g

    # the loop -----------------------------------------------------------------------------------
    def run(self) -> Result:
        res, sim, n = self.res, self.sim, len(self.trace.jobs)
        used_cpu_s = used_gpu_s = 0.0
        last_t, next_cycle, dirty = 0.0, 0.0, False
        wall0 = last_print = time.perf_counter()
        window_end = max(tj.arrival for tj in self.trace.jobs)
        win_s = 0.0
        while self.finished + res.rejected < n:
            next_event = self.events[0][0] if self.events else math.inf
            if next_event == math.inf and not dirty:
                res.unfinished = n - self.finished - res.rejected
                break
            cycle = dirty and next_cycle <= next_event
            t = max(next_cycle, last_t) if cycle else next_event
            used_cpu_s += self.used_cpu * (t - last_t)
            used_gpu_s += self.used_gpu * (t - last_t)
            if last_t < window_end:
                win_s += (self.used_cpu / self.cap_cpu + self.used_gpu / self.cap_gpu) / 2 * \
                    (min(t, window_end) - last_t)
            last_t = t
            if cycle:
                dirty = self.cycle(t)
                next_cycle = t + sim.tick_s
                if self.progress and time.perf_counter() - last_print > 2.0:
                    last_print = time.perf_counter()
                    self.progress(f"[{res.name}] sim t={t / 3600:6.1f} h  done {self.finished}/{n}  "
                                  f"queued {len(self.queue)}  running {len(self.running)}  cycles "
                                  f"{res.cycles}  decide {res.decide_s:.1f}s  wall {last_print - wall0:.0f}s")
                if not res.util_series or t - res.util_series[-1][0] >= 600:
                    res.util_series.append((t, self.used_cpu / self.cap_cpu, self.used_gpu / self.cap_gpu))
                continue
            _, _, kind, jid, ver = heapq.heappop(self.events)
            j = self.jobs[jid]
            if kind == "arrive":
                self.queue[jid] = j
            elif kind == "limit":  # the run reached its time limit: checkpoint, then stop for good
                if ver == j.runs and jid in self.running and not j.view.stopping:
                    self.settle(j, t)
                    j.view.stopping, j.view.target_workers, j.timed_out = True, 0, True
                    j.version += 1
                    self.push(t + sim.ckpt_save_s, "stopped", jid, j.version)
                continue
            elif ver != j.version or jid not in self.running:
                continue  # stale event
            elif kind == "finish":
                self.settle(j, t)
                self.hold(j.view.placement, j.view.bundle, -1)
                del self.running[jid]
                v = j.view
                v.workers, v.placement, v.state = 0, {}, "succeeded"
                j.end = t
                self.finished += 1
            elif kind == "stopped" and j.timed_out:
                self.settle(j, t)
                self.hold(j.view.placement, j.view.bundle, -1)
                del self.running[jid]
                v = j.view
                v.workers, v.placement, v.state, v.stopping, v.target_workers = 0, {}, "timed_out", False, None
                self.finished += 1
                res.timeouts += 1
            elif kind == "stopped":  # a victim saved its checkpoint and released its nodes
                self.settle(j, t)
                self.hold(j.view.placement, j.view.bundle, -1)
                del self.running[jid]
                j.need += sim.restart_s * j.t.min_workers
                v = j.view
                v.workers, v.placement, v.state, v.stopping, v.target_workers = 0, {}, "preempted", False, None
                v.start_time = None
                self.queue[jid] = j
            if not dirty:
                dirty, next_cycle = True, max(next_cycle, t)
        res.makespan = last_t
        res.util_window = win_s / window_end if window_end else 0.0
        res.util_cpu = used_cpu_s / (self.cap_cpu * last_t) if last_t else 0.0
        res.util_gpu = used_gpu_s / (self.cap_gpu * last_t) if last_t else 0.0
        useful = sum(j.t.work * (j.t.cpus / self.cap_cpu + j.t.gpus / self.cap_gpu) / 2
                     for j in self.jobs.values() if j.end is not None)
        res.goodput = useful / last_t if last_t else 0.0
        for j in self.jobs.values():
            if j.first_start is not None:
                res.waits.setdefault(CLASSES[j.t.priority // 100], []).append(j.first_start - j.t.arrival)
        return res

    def cycle(self, t: float) -> bool:
        """One scheduling cycle at time t; True if it changed capacity (run another soon)."""
        res = self.res
        res.cycles += 1
        for j in self.running.values():
            j.view.checkpoint_age = (t - j.run_since) % self.sim.ckpt_interval_s
        cluster = ClusterState(tuple(Node(nid, self.total[nid][0], self.total[nid][1], f[0], f[1])
                                     for nid, f in self.free.items()))
        t0 = time.perf_counter()
        ds = self.decide_fn([j.view for j in self.queue.values()],
                            [j.view for j in self.running.values()], cluster, self.quotas, t, self.cfg)
        res.decide_s += time.perf_counter() - t0
        res.decisions += len(ds)
        changed = False
        for d in ds:
            changed |= self.apply(d, t)
        return changed

    def apply(self, d, t: float) -> bool:
        """Act on one decision; True if it freed capacity."""
        res, sim = self.res, self.sim
        if isinstance(d, RequestResources):
            return False
        j = self.jobs[d.job_id]
        v = j.view
        if isinstance(d, Admit):
            self.queue.pop(d.job_id)
            v.state, v.workers, v.placement, v.start_time = "running", d.workers, dict(d.placement), t
            self.hold(d.placement, v.bundle, +1)
            self.running[d.job_id] = j
            j.rate_since = j.run_since = t
            if j.first_start is None:
                j.first_start = t
            self.reschedule(j, t)
            j.runs += 1
            if v.time_limit is not None:
                self.push(t + v.time_limit, "limit", d.job_id, j.runs)
            return False
        if isinstance(d, Grow):
            self.settle(j, t)
            self.hold(d.placement, v.bundle, +1)
            for node, w in d.placement.items():
                v.placement[node] = v.placement.get(node, 0) + w
            v.workers = d.to_workers
            j.need += sim.resize_s * v.workers
            self.reschedule(j, t)
            return False
        if isinstance(d, Shrink):
            self.settle(j, t)
            self.hold(d.release, v.bundle, -1)
            for node, w in d.release.items():
                left = v.placement[node] - w
                if left > 0:
                    v.placement[node] = left
                else:
                    del v.placement[node]
            v.workers = d.to_workers
            j.need += sim.resize_s * v.workers
            self.reschedule(j, t)
            res.shrinks += 1
            return True
        if isinstance(d, Preempt):
            self.settle(j, t)
            v.stopping, v.target_workers = True, 0
            j.preemptions += 1
            res.preemptions += 1
            j.version += 1
            self.push(t + (sim.ckpt_save_s if d.checkpoint_first else 0.0), "stopped", d.job_id, j.version)
            return False
        if isinstance(d, Requeue):
            v.state = "queued"
            return False
        if isinstance(d, Reject):
            self.queue.pop(d.job_id, None)
            j.rejected = d.reason
            res.rejected += 1
            return False
        raise TypeError(f"unknown decision {d!r}")


def simulate(trace: Trace, decide_fn, name: str, config: PolicyConfig | None = None,
             sim: SimConfig = SimConfig(), progress=None, quotas=None) -> Result:
    return Simulator(trace, decide_fn, name, config, sim, progress, quotas).run()


def cohort_quotas(trace: Trace, cohorts: int = 1) -> dict:
    """Every team of the trace guaranteed an equal share of the cluster's CPUs and GPUs, no max,
    the teams spread over ``cohorts`` cohorts: the policy's guarantees, borrowing, reclaim and
    fair share at work (FIFO ignores quotas)."""
    from orchestrator.policy import Quota
    teams = sorted({j.team for j in trace.jobs})
    cpus = sum(c for _, c, _ in trace.nodes) / len(teams)
    gpus = sum(g for _, _, g in trace.nodes) / len(teams)
    return {t: Quota(guaranteed_cpus=cpus, guaranteed_gpus=gpus, cohort=f"cohort{i % cohorts}")
            for i, t in enumerate(teams)}
