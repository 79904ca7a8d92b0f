"""The scheduling policy as a specification: plain data in, decisions out, no Ray."""

from __future__ import annotations

import copy
import dataclasses
import random
import time

import pytest

from orchestrator.policy import (PRIORITY, Admit, Capacity, ClusterState, Grow, JobView, Node,
                                 PolicyConfig, Preempt, Quota, Reject, Requeue, RequestResources,
                                 Shrink, Wait, decide, decide_with_reasons)

LOW, NORMAL, HIGH, CRIT = (PRIORITY[c] for c in ("low", "normal", "high", "critical"))
NOW = 100_000.0
CFG = PolicyConfig(min_run_before_preempt_s=0)
BIG = PolicyConfig(min_run_before_preempt_s=0, start_small=False)  # elastic jobs start at their largest


def nodes(n: int, cpus: float = 4, gpus: float = 0, used: dict[str, float] | None = None):
    used = used or {}
    return [Node(f"n{i}", cpus, gpus, cpus - used.get(f"n{i}", 0), gpus) for i in range(n)]


def cluster_with(running: list[JobView], n: int, cpus: float = 4, **kw) -> ClusterState:
    """n nodes whose free capacity is what ``running`` leaves."""
    used: dict[str, float] = {}
    for r in running:
        for node, w in r.placement.items():
            used[node] = used.get(node, 0) + w * r.cpus_per_worker
    return ClusterState.of(nodes(n, cpus, used=used), **kw)


def job(id, prio=NORMAL, mn=1, mx=None, cpus=1.0, t=0.0, **kw) -> JobView:
    return JobView(id, prio, min_workers=mn, max_workers=mx or mn, cpus_per_worker=cpus, submit_time=t, **kw)


def run(id, prio, placement, mn=None, mx=None, cpus=1.0, ckpt=None, start=0.0, **kw) -> JobView:
    w = sum(placement.values())
    return JobView(id, prio, min_workers=mn or w, max_workers=mx or w, cpus_per_worker=cpus,
                   state="running", workers=w, placement=dict(placement), checkpoint_age=ckpt,
                   start_time=start, **kw)


def of(kind, ds):
    return [d for d in ds if isinstance(d, kind)]


def admitted(ds):
    return {d.job_id: d for d in of(Admit, ds)}


# --- gangs --------------------------------------------------------------------------------------
def test_gang_admitted_only_when_min_workers_fit_on_nodes():
    # 2 nodes with 3 free CPUs each: 6 CPUs in all, but a 2-CPU worker fits once per node.
    c = ClusterState.of([Node("a", 4, 0, 3), Node("b", 4, 0, 3)])
    assert admitted(decide([job("three", mn=3, cpus=2)], [], c, None, NOW, CFG)) == {}
    d = admitted(decide([job("two", mn=2, cpus=2)], [], c, None, NOW, CFG))["two"]
    assert d.workers == 2 and d.placement == {"a": 1, "b": 1}


def test_elastic_job_admitted_with_as_many_workers_as_fit_up_to_max():
    c = ClusterState.of(nodes(2))
    assert admitted(decide([job("e", mn=2, mx=6)], [], c, None, NOW, CFG))["e"].workers == 6
    assert admitted(decide([job("e", mn=2, mx=20)], [], c, None, NOW, CFG))["e"].workers == 8


def test_a_gang_holds_only_its_allowed_worker_counts():
    # allowed {4, 8} in [3, 8] (a batch that splits over 4 and 8 workers only)
    j = job("j", mn=3, mx=8, allowed=(4, 8))
    assert admitted(decide([j], [], ClusterState.of(nodes(1, 3), [(4, 0)]), None, NOW, CFG)) == {}
    (a,) = admitted(decide([j], [], ClusterState.of(nodes(2, 3)), None, NOW, CFG)).values()
    assert a.workers == 4                                            # 6 fit, 4 is allowed
    r = run("j", NORMAL, {"n0": 4}, mn=3, mx=8, allowed=(4, 8))
    assert of(Grow, decide([], [r], cluster_with([r], 1, cpus=7), None, NOW, CFG)) == []  # room for 7
    (g,) = of(Grow, decide([], [r], cluster_with([r], 3), None, NOW, CFG))               # room for 12
    assert (g.to_workers, sum(g.placement.values())) == (8, 4)


def test_gang_is_packed_onto_as_few_nodes_as_possible():
    c = ClusterState.of([Node("small", 8, 0, 2), Node("big", 8, 0, 8)])
    assert admitted(decide([job("g", mn=4)], [], c, None, NOW, CFG))["g"].placement == {"big": 4}


def test_admissions_in_one_cycle_never_oversubscribe_a_node():
    c = ClusterState.of(nodes(3))
    ds = decide([job(f"j{i}", mn=3, t=i) for i in range(5)], [], c, None, NOW, CFG)
    per_node: dict[str, int] = {}
    for d in of(Admit, ds):
        for n, w in d.placement.items():
            per_node[n] = per_node.get(n, 0) + w
    assert len(of(Admit, ds)) == 4 and all(w <= 4 for w in per_node.values())


# --- order --------------------------------------------------------------------------------------
def test_fifo_within_a_priority_class():
    c = ClusterState.of(nodes(1))
    ds = decide([job("late", mn=4, t=20), job("early", mn=4, t=10)], [], c, None, NOW, CFG)
    assert list(admitted(ds)) == ["early"]


def test_higher_class_admitted_before_older_lower_class():
    c = ClusterState.of(nodes(1))
    ds = decide([job("old-low", LOW, mn=4, t=NOW - 60), job("new-high", HIGH, mn=4, t=NOW)], [], c,
                None, NOW, CFG)
    assert list(admitted(ds)) == ["new-high"]


def test_aging_eventually_admits_starved_low_priority_job():
    c = ClusterState.of(nodes(1))
    cfg = PolicyConfig(aging_per_hour=100, min_run_before_preempt_s=0)
    low = job("starved", LOW, mn=4, t=0.0)
    for hours in (0.25, 0.9):  # a newer normal job still goes first...
        fresh = job(f"normal-{hours}", NORMAL, mn=4, t=hours * 3600 - 60)
        assert list(admitted(decide([low, fresh], [], c, None, hours * 3600, cfg))) == [fresh.id]
    # ...until the low job has waited long enough to outrank newer normal and high jobs.
    fresh = [job("normal", NORMAL, mn=4, t=3 * 3600 - 60), job("high", HIGH, mn=4, t=3 * 3600 - 60)]
    assert list(admitted(decide([low, *fresh], [], c, None, 3 * 3600, cfg))) == ["starved"]


def test_aging_never_lifts_a_job_above_critical():
    c = ClusterState.of(nodes(1))
    ds = decide([job("ancient-low", LOW, mn=4, t=0), job("crit", CRIT, mn=4, t=NOW)], [], c, None,
                NOW * 100, CFG)
    assert list(admitted(ds)) == ["crit"]


# --- backfill -----------------------------------------------------------------------------------
def test_backfill_admits_small_job_on_nodes_the_head_does_not_need():
    # The head needs 2 whole nodes; n0 and n1 are half busy, n2 is busy. A 1-CPU job may use n2's
    # spare CPU but not n0/n1, which the head will start on.
    busy = [run("r0", NORMAL, {"n0": 2}), run("r1", NORMAL, {"n1": 2}), run("r2", NORMAL, {"n2": 3})]
    c = cluster_with(busy, 3)
    ds = decide([job("head", mn=8, t=1), job("small", mn=1, t=2), job("small2", mn=1, t=3)], busy, c,
                None, NOW, CFG)
    adm = admitted(ds)
    assert "head" not in adm
    assert adm["small"].placement == {"n2": 1} and "small2" not in adm


def test_backfill_disabled_keeps_everyone_behind_the_head():
    busy = [run("r0", NORMAL, {"n0": 3})]
    c = cluster_with(busy, 2)
    cfg = PolicyConfig(backfill=False, min_run_before_preempt_s=0)
    assert admitted(decide([job("head", mn=8, t=1), job("small", t=2)], busy, c, None, NOW, cfg)) == {}


def random_running(rng, n: int, classes, *, at_least: int, teams="t", start: bool = False) -> list:
    """``at_least``..8 running jobs placed at random on ``n`` nodes of 4 slots (a choice of one
    class or team draws no random number, so the seeds' scenarios stay what they were)."""
    def pick(xs):
        return xs[0] if len(xs) == 1 else rng.choice(xs)
    running, used = [], {f"n{i}": 0 for i in range(n)}
    for k in range(rng.randint(at_least, 8)):
        node = f"n{rng.randrange(n)}"
        w = rng.randint(1, 4 - used[node]) if used[node] < 4 else 0
        if w:
            used[node] += w
            cls = pick(classes)
            running.append(run(f"r{k}", cls, {node: w}, team=pick(teams), **({"start": float(k)} if start else {})))
    return running


@pytest.mark.parametrize("seed", range(40))
def test_backfill_never_delays_head_of_queue(seed):
    """Whatever backfills, the head fits as soon as the jobs running before it finish."""
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    running = random_running(rng, n, [HIGH], at_least=1)
    queue = [job(f"q{k}", NORMAL, mn=rng.randint(1, 6), t=k) for k in range(rng.randint(2, 10))]
    c = cluster_with(running, n)
    ds = decide(queue, running, c, None, NOW, CFG)
    adm = admitted(ds)
    order = sorted(queue, key=lambda j: j.submit_time)
    head = next((j for j in order if j.id not in adm), None)
    if head is None:
        return
    # Everything that ran before, or was ahead of the head, finishes; what backfilled behind the
    # head is still running. The head must fit then.
    behind = order[order.index(head) + 1:]
    cap = Capacity(nodes(n))
    for j in behind:
        if j.id in adm:
            cap.take(adm[j.id].placement, (1.0, 0.0))
    assert cap.place(head.min_workers, head.min_workers, head.bundle) is not None, (seed, adm, head)


# --- reservations by slot, estimated start, time-limit backfill -----------------------------------
def test_the_head_holds_only_its_slots_and_the_rest_of_its_node_backfills():
    # A 64-CPU, 8-GPU node runs 4 x (4 CPU, 1 GPU). The head needs 8 such workers (32 CPU, all
    # 8 GPUs): it holds the free GPUs and 32 CPUs; the 16 CPUs left take a CPU-only job now.
    r = JobView("r", NORMAL, min_workers=4, max_workers=4, cpus_per_worker=4, gpus_per_worker=1,
                state="running", workers=4, placement={"g0": 4}, start_time=0.0)
    c = ClusterState.of([Node("g0", 64, 8, 48, 4)])
    head = JobView("head", NORMAL, min_workers=8, max_workers=8, cpus_per_worker=4, gpus_per_worker=1)
    cpu16, cpu20 = job("cpu16", mn=4, cpus=4, t=1), job("cpu20", mn=5, cpus=4, t=2)
    assert set(admitted(decide([head, cpu16, cpu20], [r], c, None, NOW, CFG))) == {"cpu16"}
    # When r ends, the head fits beside what backfilled.
    cap = Capacity([Node("g0", 64, 8, 48 - 16, 4)])
    cap.give({"g0": 4}, r.bundle)
    assert cap.place(8, 8, head.bundle) is not None
    whole = PolicyConfig(slot_reservation=False, min_run_before_preempt_s=0)
    assert admitted(decide([head, cpu16], [r], c, None, NOW, whole)) == {}


def test_a_job_ending_before_the_heads_estimated_start_backfills_on_its_slots():
    # r frees 2 of n0's 4 CPUs at NOW + 1000 (its time limit); the head needs all 4 then.
    r = run("r", NORMAL, {"n0": 2}, start=NOW - 100, time_limit=1100)
    c = cluster_with([r], 1)
    queue = [job("head", mn=4, t=1), job("long", t=2, time_limit=2000), job("nolimit", t=3),
             job("short", t=4, time_limit=1000)]
    ds, waits = decide_with_reasons(queue, [r], c, None, NOW, CFG)
    assert set(admitted(ds)) == {"short"}
    w = why((ds, waits))
    assert w["long"].code == "behind_reserved_head"
    assert w["long"].detail.endswith("(first in line; estimated start in 0h17m, when running jobs "
                                     "reach their time limits)")
    assert "estimated start in 0h17m" in w["head"].detail
    # Without start estimates nobody may touch the head's slots.
    off = PolicyConfig(estimate_start=False, min_run_before_preempt_s=0)
    assert admitted(decide(queue, [r], c, None, NOW, off)) == {}


def test_capacity_the_head_will_not_need_at_its_estimated_start_backfills_jobs_without_limits():
    # n0 frees at NOW + 1000 (r0's limit) and holds the head then; n1's 2 free CPUs are not
    # needed, though they are the most free room now (where a head without estimates waits).
    r0 = run("r0", NORMAL, {"n0": 4}, start=NOW, time_limit=1000)
    r1 = run("r1", NORMAL, {"n1": 2})
    c = cluster_with([r0, r1], 2)
    queue = [job("head", mn=4, t=1), job("nolimit", mn=2, t=2)]
    assert set(admitted(decide(queue, [r0, r1], c, None, NOW, CFG))) == {"nolimit"}
    off = PolicyConfig(estimate_start=False, min_run_before_preempt_s=0)
    assert admitted(decide(queue, [r0, r1], c, None, NOW, off)) == {}


def _fits_at(head: JobView, n: int, jobs: list[tuple[dict, float]]) -> float:
    """The earliest time ``head`` fits on ``n`` 4-CPU nodes if each of ``jobs`` (placement of
    1-CPU workers, end time; inf: never) holds its capacity until its end."""
    for t in sorted({0.0, *(end for _, end in jobs if end < float("inf"))}):
        cap = Capacity(nodes(n))
        for placement, end in jobs:
            if end > t:
                cap.take(placement, (1.0, 0.0))
        if cap.place(head.min_allowed, head.min_allowed, head.bundle) is not None:
            return t
    return float("inf")


@pytest.mark.parametrize("seed", range(60))
def test_time_limit_backfill_never_delays_the_heads_estimated_start(seed):
    """Jobs end at their time limits (no limit: never). Whatever backfills behind the head, the
    head fits no later than it would have if nothing had backfilled."""
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    running = random_running(rng, n, [HIGH], at_least=1)
    limit = lambda: rng.choice([None, 300.0, 900.0, 1800.0, 3600.0])  # noqa: E731
    for r in running:
        r.start_time, r.time_limit = NOW - rng.choice([0.0, 200.0]), limit()
    queue = [job(f"q{k}", NORMAL, mn=rng.randint(1, 6), t=k, time_limit=limit())
             for k in range(rng.randint(2, 10))]
    ds = decide(queue, running, cluster_with(running, n), None, NOW, CFG)
    adm = admitted(ds)
    order = sorted(queue, key=lambda j: j.submit_time)
    head = next((j for j in order if j.id not in adm), None)
    if head is None:
        return
    ahead = order[:order.index(head)]
    end = lambda j: float("inf") if j.time_limit is None else j.start_time + j.time_limit - NOW  # noqa: E731
    before = [(r.placement, end(r)) for r in running] + \
             [(adm[j.id].placement, j.time_limit or float("inf")) for j in ahead]
    backfilled = [(adm[j.id].placement, j.time_limit or float("inf"))
                  for j in order[order.index(head) + 1:] if j.id in adm]
    assert _fits_at(head, n, before + backfilled) <= _fits_at(head, n, before), (seed, adm, head)


def test_elastic_jobs_grow_into_capacity_the_blocked_head_cannot_use():
    # The head waits for g0's GPUs and needs 1 of its CPUs: an elastic CPU job grows to its
    # largest count on the CPUs it does not need.
    gpu = JobView("gpu-r", NORMAL, min_workers=1, max_workers=1, cpus_per_worker=1, gpus_per_worker=8,
                  state="running", workers=1, placement={"g0": 1}, start_time=0.0)
    e = run("e", NORMAL, {"c0": 1}, mn=1, mx=12)
    c = ClusterState.of([Node("g0", 16, 8, 15, 0), Node("c0", 8, 0, 7, 0)])
    head = JobView("head", NORMAL, min_workers=1, max_workers=1, cpus_per_worker=1, gpus_per_worker=8)
    [g] = of(Grow, decide([head], [gpu, e], c, None, NOW, CFG))
    assert g.to_workers == 12 and g.placement.get("g0", 0) <= 14
    off = PolicyConfig(grow_past_head=False, min_run_before_preempt_s=0)
    assert not of(Grow, decide([head], [gpu, e], c, None, NOW, off))


def test_elastic_jobs_do_not_grow_on_the_kind_of_node_a_waiting_gang_needs():
    # The CPU head holds n2's 3 free CPUs and one of n0's; n1's last CPU is free, but a CPU gang
    # waits, so the elastic CPU job does not take it.
    busy = [run("r0", NORMAL, {"n0": 3}), run("r1", NORMAL, {"n1": 3})]
    e = run("e", NORMAL, {"n2": 1}, mn=1, mx=4)
    ds = decide([job("head", mn=6, t=1)], busy + [e], cluster_with(busy + [e], 3), None, NOW, CFG)
    assert not of(Grow, ds) and not admitted(ds)


def test_workers_without_gpus_go_to_nodes_without_gpus_first():
    c = ClusterState.of([Node("g0", 32, 4), Node("c0", 64, 0)])
    cpu = job("cpu", mn=4, cpus=4)
    assert admitted(decide([cpu], [], c, None, NOW, CFG))["cpu"].placement == {"c0": 4}
    off = PolicyConfig(spare_gpu_nodes=False, min_run_before_preempt_s=0)
    assert admitted(decide([cpu], [], c, None, NOW, off))["cpu"].placement == {"g0": 4}  # tightest fit



@pytest.mark.parametrize("cpu_nodes, want", [
    (2, {"c0": 8, "c1": 8}),  # two CPU nodes hold the gang: not the one GPU node that also would
    (1, {"g0": 16}),          # they cannot: the GPU node is better than waiting
])
def test_a_gang_without_gpus_spreads_over_cpu_nodes_rather_than_fill_one_gpu_node(cpu_nodes, want):
    # 16 workers of 4 CPUs fit one 64-CPU GPU node alone (the tightest single node) and would
    # leave its 8 GPUs without CPUs; two 32-CPU nodes hold them as well
    c = ClusterState.of([Node("g0", 64, 8)] + [Node(f"c{i}", 32, 0) for i in range(cpu_nodes)])
    cpu = job("cpu", mn=16, cpus=4)
    assert admitted(decide([cpu], [], c, None, NOW, CFG))["cpu"].placement == want


def test_an_elastic_gang_without_gpus_starts_smaller_rather_than_take_a_gpu_node():
    c = ClusterState.of([Node("g0", 64, 8), Node("c0", 32, 0)])
    e = job("e", mn=4, mx=16, cpus=4)
    assert admitted(decide([e], [], c, None, NOW, CFG))["e"].placement == {"c0": 8}
    off = PolicyConfig(spare_gpu_nodes=False, min_run_before_preempt_s=0)
    assert sum(admitted(decide([e], [], c, None, NOW, off))["e"].placement.values()) == 16

def test_while_others_wait_an_elastic_job_starts_small_and_takes_the_rest_nobody_needs():
    c = ClusterState.of(nodes(2))  # 8 CPUs
    e, gang = job("e", mn=2, mx=8), job("gang", mn=4, t=1)
    started = admitted(decide([e, gang], [], c, None, NOW, CFG))
    assert started["e"].workers == 4 and started["gang"].workers == 4   # both start: 2 + the 2 left
    assert admitted(decide([e, gang], [], c, None, NOW, BIG)).keys() == {"e"}  # 8 workers: gang waits
    assert admitted(decide([e], [], c, None, NOW, CFG))["e"].workers == 8       # alone: its largest


def test_an_elastic_job_started_small_stays_small_while_a_gang_of_its_kind_waits():
    c = ClusterState.of(nodes(2))
    ds = decide([job("e", mn=2, mx=8), job("wide", mn=7, t=1)], [], c, None, NOW, CFG)
    assert admitted(ds)["e"].workers == 2 and "wide" not in admitted(ds)


def test_without_reservation_jobs_behind_the_head_take_any_free_capacity():
    busy = [run("r0", NORMAL, {"n0": 2}), run("r1", NORMAL, {"n1": 2})]
    queue = [job("head", mn=8, t=1), job("a", mn=2, t=2), job("b", mn=2, t=3)]
    assert set(admitted(decide(queue, busy, cluster_with(busy, 2), None, NOW, CFG))) == set()
    off = PolicyConfig(reservation=False, min_run_before_preempt_s=0)
    assert set(admitted(decide(queue, busy, cluster_with(busy, 2), None, NOW, off))) == {"a", "b"}


def test_a_time_limit_must_be_positive_naming_the_field():
    with pytest.raises(ValueError, match="time_limit"):
        job("j", time_limit=0)


# --- quotas and rejection -----------------------------------------------------------------------
def test_quota_holds_a_team_back_without_blocking_other_teams():
    held = run("a-running", NORMAL, {"n0": 4}, team="a")
    ds = decide([job("a-next", mn=4, t=1, team="a"), job("b-next", mn=4, t=2, team="b")], [held],
                cluster_with([held], 4), {"a": Quota(cpus=6)}, NOW, CFG)
    assert list(admitted(ds)) == ["b-next"] and not of(Reject, ds)


def test_quota_caps_an_elastic_job_below_its_max():
    ds = decide([job("e", mn=1, mx=8, team="a")], [], ClusterState.of(nodes(4)), {"a": Quota(cpus=3)},
                NOW, CFG)
    assert admitted(ds)["e"].workers == 3


def test_job_needing_more_than_its_team_quota_is_rejected_with_the_reason():
    ds = decide([job("big", mn=8, team="a")], [], ClusterState.of(nodes(4)), {"a": Quota(cpus=4)}, NOW, CFG)
    [r] = of(Reject, ds)
    assert r.job_id == "big" and "quota" in r.reason and "8 CPU" in r.reason


def test_job_that_can_never_fit_the_cluster_is_rejected_not_queued_forever():
    ds = decide([job("huge", mn=3, cpus=3), job("ok", mn=2, cpus=3)], [], ClusterState.of(nodes(2)),
                None, NOW, CFG)
    [r] = of(Reject, ds)
    assert r.job_id == "huge" and "even when empty" in r.reason and "room for 2" in r.reason
    assert list(admitted(ds)) == ["ok"]


def test_with_an_autoscaler_a_gang_is_rejected_only_if_no_node_type_can_hold_a_worker():
    c = ClusterState.of(nodes(1), autoscale_shapes=[(16, 0)])
    ds = decide([job("wide", mn=8, cpus=8), job("fat", cpus=32)], [], c, None, NOW, CFG)
    assert [r.job_id for r in of(Reject, ds)] == ["fat"]


def test_blocked_gangs_are_announced_to_the_autoscaler_with_running_bundles():
    busy = [run("r", NORMAL, {"n0": 2}, cpus=2)]
    c = cluster_with(busy, 1, autoscale_shapes=[(4, 0)])
    [req] = of(RequestResources, decide([job("g", mn=3, cpus=2)], busy, c, None, NOW, CFG))
    assert req.bundles == [{"CPU": 2.0}] * 5


# --- preemption ---------------------------------------------------------------------------------
def two_low_elastic_jobs():
    """The issue's scenario: two low elastic jobs (1..4 workers) fill a 2-node cluster."""
    return [run("low-a", LOW, {"n0": 4}, mn=1, mx=4, ckpt=30), run("low-b", LOW, {"n1": 4}, mn=1, mx=4, ckpt=300)]


def test_high_priority_job_shrinks_elastic_low_jobs_before_preempting():
    low = two_low_elastic_jobs()
    ds = decide([job("high", HIGH, mn=3, t=NOW)], low, cluster_with(low, 2), None, NOW, CFG)
    assert not of(Preempt, ds)
    [s] = of(Shrink, ds)
    assert s.to_workers == 1 and "high" in s.reason
    assert "high" not in admitted(ds)  # it starts once the shrink has freed the workers


def test_preemption_stops_the_victim_with_the_freshest_checkpoint_and_checkpoints_it_first():
    low = two_low_elastic_jobs()
    ds = decide([job("high", HIGH, mn=7, t=NOW)], low, cluster_with(low, 2), None, NOW, CFG)
    [p] = of(Preempt, ds)
    assert p.job_id == "low-a" and p.checkpoint_first  # low-a checkpointed 30 s ago, low-b 300 s ago


def test_lowest_class_is_preempted_before_a_higher_one():
    running = [run("normal", NORMAL, {"n0": 4}, ckpt=1), run("low", LOW, {"n1": 4}, ckpt=999)]
    ds = decide([job("crit", CRIT, mn=4, t=NOW)], running, cluster_with(running, 2), None, NOW, CFG)
    assert [p.job_id for p in of(Preempt, ds)] == ["low"]


def test_nothing_is_preempted_when_that_would_not_make_room():
    running = [run("low", LOW, {"n0": 4}), run("pinned", LOW, {"n1": 4}, preemptible=False)]
    ds = decide([job("high", HIGH, mn=8, t=NOW)], running, cluster_with(running, 2), None, NOW, CFG)
    assert not of(Preempt, ds) and not of(Shrink, ds)


def test_equal_or_higher_priority_jobs_are_never_preempted():
    running = [run("same", HIGH, {"n0": 4}), run("higher", CRIT, {"n1": 4})]
    ds = decide([job("high", HIGH, mn=4, t=NOW)], running, cluster_with(running, 2), None, NOW, CFG)
    assert not of(Preempt, ds) and not of(Shrink, ds)


def test_recently_started_jobs_are_not_preempted():
    running = [run("low", LOW, {"n0": 4}, start=NOW - 60)]
    cfg = PolicyConfig(min_run_before_preempt_s=600)
    assert not of(Preempt, decide([job("high", HIGH, mn=4, t=NOW)], running, cluster_with(running, 1),
                                  None, NOW, cfg))
    running[0].start_time = NOW - 601
    assert of(Preempt, decide([job("high", HIGH, mn=4, t=NOW)], running, cluster_with(running, 1),
                              None, NOW, cfg))


def test_capacity_already_being_released_is_not_preempted_for_again():
    running = [run("low-a", LOW, {"n0": 4}, stopping=True, target_workers=0), run("low-b", LOW, {"n1": 4})]
    ds = decide([job("high", HIGH, mn=4, t=NOW)], running, cluster_with(running, 2), None, NOW, CFG)
    assert not of(Preempt, ds)


def test_capacity_a_preemption_frees_is_not_backfilled_by_others():
    running = [run("low", LOW, {"n0": 4})]
    ds = decide([job("high", HIGH, mn=4, t=NOW), job("small", LOW, t=NOW)], running,
                cluster_with(running, 1), None, NOW, CFG)
    assert of(Preempt, ds) and admitted(ds) == {}


def test_a_higher_class_job_behind_an_aged_head_may_still_preempt():
    running = [run("low", LOW, {"n0": 4})]
    aged = job("aged-low", LOW, mn=4, t=0)  # waited so long it outranks a fresh high job
    ds = decide([aged, job("high", HIGH, mn=4, t=NOW)], running, cluster_with(running, 1), None, NOW, CFG)
    assert [p.job_id for p in of(Preempt, ds)] == ["low"]


def test_preempted_job_is_requeued_and_can_start_at_once():
    victim = job("victim", LOW, mn=2, t=5, state="preempted")
    ds = decide([victim], [], ClusterState.of(nodes(1)), None, NOW, CFG)
    assert of(Requeue, ds)[0].job_id == "victim" and "victim" in admitted(ds)
    assert ds.index(of(Requeue, ds)[0]) < ds.index(of(Admit, ds)[0])


# --- growth and purity --------------------------------------------------------------------------
def test_elastic_jobs_grow_into_idle_capacity_when_nobody_waits():
    running = [run("e", NORMAL, {"n0": 2}, mn=1, mx=6)]
    [g] = of(Grow, decide([], running, cluster_with(running, 2), None, NOW, CFG))
    assert g.to_workers == 6 and sum(g.placement.values()) == 4


def test_elastic_jobs_do_not_grow_while_a_gang_waits():
    running = [run("e", NORMAL, {"n0": 2}, mn=1, mx=6)]
    ds = decide([job("wait", NORMAL, mn=8)], running, cluster_with(running, 2), None, NOW, CFG)
    assert not of(Grow, ds)


def test_decide_does_not_modify_its_inputs():
    low = two_low_elastic_jobs()
    queue = [job("high", HIGH, mn=6, t=NOW), job("x", LOW, t=1)]
    c = cluster_with(low, 2)
    before = copy.deepcopy((queue, low, c))
    decide(queue, low, c, {"default": Quota(cpus=100)}, NOW, CFG)
    assert (queue, low, c) == before


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="aging_per_hour"):
        PolicyConfig(aging_per_hour=-1)
    with pytest.raises(ValueError, match="min_workers"):
        JobView("j", NORMAL, min_workers=3, max_workers=2)
    with pytest.raises(ValueError, match="allowed worker counts"):
        JobView("j", NORMAL, min_workers=3, max_workers=4, allowed=(2, 4))


def test_one_cycle_over_5000_queued_jobs_and_1000_nodes_is_fast():
    rng = random.Random(0)
    ns = [Node(f"n{i}", 32, 0, rng.choice([0, 4, 8, 32])) for i in range(1000)]
    queue = [job(f"q{i}", rng.choice([LOW, NORMAL, HIGH, CRIT]), mn=rng.choice([1, 2, 8, 64]), cpus=4,
                 t=float(i)) for i in range(5000)]
    t0 = time.perf_counter()
    decide(queue, [], ClusterState.of(ns), None, NOW, CFG)
    assert time.perf_counter() - t0 < 2.0


def test_a_job_is_never_told_to_shrink_or_stop_twice_in_one_cycle():
    running = [run("low-a", LOW, {"n0": 4}), run("low-b", LOW, {"n1": 4})]
    aged_normal = job("aged-normal", NORMAL, mn=4, t=0)  # outranks critical by aging, preempts lows
    ds = decide([aged_normal, job("crit", CRIT, mn=4, t=NOW)], running, cluster_with(running, 2), None,
                NOW, CFG)
    victims = [d.job_id for d in ds if isinstance(d, (Preempt, Shrink))]
    assert sorted(victims) == ["low-a", "low-b"]


# --- why a queued job waits (decide_with_reasons) -----------------------------------------------
def why(ds_waits) -> dict[str, Wait]:
    ds, waits = ds_waits
    assert len({w.job_id for w in waits}) == len(waits)  # one reason per job
    return {w.job_id: w for w in waits}


def test_a_job_held_by_its_teams_quota_waits_for_quota_naming_the_team_its_use_and_limit():
    held = run("a-running", NORMAL, {"n0": 4}, team="a")
    ds, waits = decide_with_reasons([job("a-next", mn=4, t=1, team="a"), job("b-next", mn=4, t=2, team="b")],
                                    [held], cluster_with([held], 4), {"a": Quota(cpus=6)}, NOW, CFG)
    assert list(admitted(ds)) == ["b-next"]
    assert waits == [Wait("a-next", "quota", "team 'a' CPU quota 4/6 in use, its gang needs 4 more")]


def test_a_gang_too_big_for_the_free_nodes_says_what_it_needs_and_what_is_free():
    c = ClusterState.of([Node("a", 4, 0, 3), Node("b", 4, 0, 1)])  # 4 CPUs free, one 2-CPU worker fits
    ds, waits = decide_with_reasons([job("g", mn=3, cpus=2)], [], c, None, NOW, CFG)
    assert ds == []  # no autoscaler: nothing asked
    assert waits == [Wait("g", "gang_does_not_fit", "needs 3 x (2 CPU); largest free node 3 CPU (fits 1), "
                                                    "free in all 4 CPU (fits 1)")]


def test_a_gang_the_autoscaler_was_asked_for_says_so_and_how_much():
    busy = [run("r", NORMAL, {"n0": 2}, cpus=2)]
    c = cluster_with(busy, 1, autoscale_shapes=[(4, 0)])
    ds, waits = decide_with_reasons([job("g", mn=3, cpus=2, gpus_per_worker=0)], busy, c, None, NOW, CFG)
    [req] = of(RequestResources, ds)
    assert req.bundles == [{"CPU": 2.0}] * 5
    [w] = waits
    assert (w.job_id, w.code) == ("g", "autoscaler")
    assert w.detail.startswith("requested 3 x (2 CPU) from the autoscaler; needs 3 x (2 CPU); "
                               "largest free node 0 CPU (fits 0)")


def test_a_job_that_fits_only_on_the_heads_reserved_nodes_waits_behind_the_head_naming_it():
    busy = [run("r0", NORMAL, {"n0": 2}), run("r1", NORMAL, {"n1": 2}), run("r2", NORMAL, {"n2": 3})]
    ds, waits = decide_with_reasons([job("wide", mn=8, t=1), job("small", t=2), job("small2", t=3)], busy,
                                    cluster_with(busy, 3), None, NOW, CFG)
    assert list(admitted(ds)) == ["small"]
    w = why((ds, waits))
    assert w["small2"] == Wait("small2", "behind_reserved_head",
                               "head wide holds the slots it fits on (first in line; no estimated "
                               "start: jobs without a time limit hold what it needs)")
    assert w["wide"].code == "gang_does_not_fit" and w["wide"].detail.startswith("needs 8 x (1 CPU);")
    # Without backfill nobody behind the head is even tried.
    cfg = PolicyConfig(backfill=False, min_run_before_preempt_s=0)
    _, waits = decide_with_reasons([job("wide", mn=8, t=1), job("small", t=2)], busy, cluster_with(busy, 3),
                                   None, NOW, cfg)
    assert why((_, waits))["small"].detail == ("head wide is first in line; backfill is off; no estimated "
                                               "start: jobs without a time limit hold what it needs")


def test_a_head_that_preempts_says_whom_it_waits_for():
    ds, waits = decide_with_reasons([job("high", HIGH, mn=8, t=NOW)], two_low_elastic_jobs(),
                                    cluster_with(two_low_elastic_jobs(), 2), None, NOW, CFG)
    assert {d.job_id for d in of(Preempt, ds)} == {"low-a", "low-b"}
    [w] = waits
    assert w.code == "gang_does_not_fit" and w.detail.endswith("; preempting low-a (stop), low-b (stop)")


def test_a_job_that_can_never_fit_is_rejected_and_its_wait_is_never_fits_with_the_same_reason():
    ds, waits = decide_with_reasons([job("huge", mn=3, cpus=3), job("ok", mn=2, cpus=3)], [],
                                    ClusterState.of(nodes(2)), None, NOW, CFG)
    [r] = of(Reject, ds)
    assert waits == [Wait("huge", "never_fits", r.reason)] and "even when empty" in r.reason
    with pytest.raises(ValueError, match="not one of"):
        Wait("x", "bored", "")


@pytest.mark.parametrize("seed", range(30))
def test_reasons_change_no_decision_and_every_job_not_admitted_has_one(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 6)
    running = random_running(rng, n, [LOW, NORMAL], at_least=0, teams="ab")
    queue = [job(f"q{k}", rng.choice([LOW, NORMAL, HIGH]), mn=rng.randint(1, 10), t=k, team=rng.choice("ab"))
             for k in range(rng.randint(1, 12))]
    quotas = rng.choice([None, {"a": Quota(cpus=rng.randint(4, 16))}])
    shapes = rng.choice([[], [(4, 0)]])
    cfg = PolicyConfig(min_run_before_preempt_s=0, backfill_depth=rng.choice([0, 2, 100]))
    c = cluster_with(running, n, autoscale_shapes=shapes)
    ds, waits = decide_with_reasons(queue, running, c, quotas, NOW, cfg)
    assert ds == decide(queue, running, c, quotas, NOW, cfg)
    assert {w.job_id for w in waits} == {j.id for j in queue} - set(admitted(ds))
    for w in waits:
        if w.code == "autoscaler":
            assert shapes and of(RequestResources, ds)


def test_one_cycle_with_reasons_over_5000_queued_jobs_and_1000_nodes_is_fast():
    rng = random.Random(0)
    ns = [Node(f"n{i}", 32, 0, rng.choice([0, 4, 8, 32])) for i in range(1000)]
    queue = [job(f"q{i}", rng.choice([LOW, NORMAL, HIGH, CRIT]), mn=rng.choice([1, 2, 8, 64]), cpus=4,
                 t=float(i)) for i in range(5000)]
    t0 = time.perf_counter()
    ds, waits = decide_with_reasons(queue, [], ClusterState.of(ns), {"default": Quota(cpus=20_000)}, NOW, CFG)
    assert time.perf_counter() - t0 < 2.0
    assert len(waits) == 5000 - len(admitted(ds))


# --- guaranteed shares, cohorts, borrowing, reclaim, fair share ----------------------------------
def share(g, mx=None, cohort="ml", gpus=(0.0, None)):
    """A quota of ``g`` CPUs guaranteed, at most ``mx`` (None: no limit), in ``cohort``."""
    return Quota(cpus=mx, gpus=gpus[1], guaranteed_cpus=g, guaranteed_gpus=gpus[0], cohort=cohort)


def test_a_team_borrows_idle_guaranteed_capacity_of_its_cohort_but_not_of_another():
    quotas = {"a": share(4, 8), "b": share(4)}               # 8 CPUs, all guaranteed
    ds = decide([job("a-big", mn=1, mx=8, team="a")], [], ClusterState.of(nodes(2)), quotas, NOW, CFG)
    assert admitted(ds)["a-big"].workers == 8                # b's 4 idle CPUs lent to a
    quotas["b"] = share(4, cohort="other")
    ds, waits = decide_with_reasons([job("a-big", mn=1, mx=8, team="a"), job("a-gang", mn=3, t=1, team="a")],
                                    [], ClusterState.of(nodes(2)), quotas, NOW, BIG)
    assert admitted(ds)["a-big"].workers == 4                # its guarantee, nothing lent
    [w] = waits
    assert (w.job_id, w.code) == ("a-gang", "quota") and "borrowing: 0 CPU" in w.detail
    assert "team 'a' CPU 4 in use, 4 guaranteed, its gang needs 3 more" in w.detail


def test_capacity_no_team_guarantees_is_anyones_up_to_its_max():
    quotas = {"a": share(4, cohort=None)}                    # 12 CPUs, 4 guaranteed to a
    ds = decide([job("z", mn=1, mx=12, team="z")], [], ClusterState.of(nodes(3)), quotas, NOW, CFG)
    assert admitted(ds)["z"].workers == 8                    # no quota: the 8 nobody guarantees
    quotas["z"] = Quota(cpus=6)
    ds = decide([job("z", mn=1, mx=12, team="z")], [], ClusterState.of(nodes(3)), quotas, NOW, CFG)
    assert admitted(ds)["z"].workers == 6


def test_a_gang_larger_than_all_its_team_could_ever_borrow_is_rejected_unless_the_cluster_can_grow():
    quotas = {"a": share(4, cohort="x"), "b": share(4, cohort="y"), "c": share(2, cohort="x")}
    gang = job("wide", mn=8, team="a")                       # 12 CPUs: a 4 + c 2 + 2 nobody's = 8
    assert admitted(decide([gang], [], ClusterState.of(nodes(3)), quotas, NOW, CFG))["wide"].workers == 8
    ds, waits = decide_with_reasons([job("wider", mn=9, team="a")], [], ClusterState.of(nodes(3)), quotas,
                                    NOW, CFG)
    [r] = of(Reject, ds)
    assert "min gang needs 9 CPU but team 'a' can hold at most 8 CPU even on an idle cluster" in r.reason
    assert waits == [Wait("wider", "never_fits", r.reason)]
    grows = ClusterState.of(nodes(3), autoscale_shapes=[(4, 0)])
    assert not of(Reject, decide([job("wider", mn=9, team="a")], [], grows, quotas, NOW, CFG))


def test_the_max_caps_borrowing():
    quotas = {"a": share(2, 6), "b": share(6)}
    ds, waits = decide_with_reasons([job("a-e", mn=1, mx=8, team="a"), job("a-more", t=1, team="a")], [],
                                    ClusterState.of(nodes(2)), quotas, NOW, BIG)
    assert admitted(ds)["a-e"].workers == 6
    assert waits == [Wait("a-more", "quota", "team 'a' CPU quota 6/6 in use, its gang needs 1 more")]


def test_a_borrower_does_not_take_capacity_its_owners_queued_job_asks_for():
    quotas = {"a": share(4, 8), "b": share(4, 8)}
    busy = [run("b1", NORMAL, {"n0": 4}, team="b")]
    ds = decide([job("b2", HIGH, mn=4, team="b"), job("a1", LOW, mn=4, t=1, team="a")], busy,
                cluster_with(busy, 2), quotas, NOW, CFG)
    assert list(admitted(ds)) == ["a1"]                      # b2 would borrow what a1 asks for


def borrowed_cohort():
    """8 CPUs; a and b are guaranteed 4 each, c nothing (cohort ml); b runs 8 (it borrowed a's
    4): b-old (4 workers, n0), b-mid and b-new (2 each, n1, started later)."""
    quotas = {"a": share(4, 8), "b": share(4, 8), "c": share(0, 8)}
    busy = [run("b-old", HIGH, {"n0": 4}, team="b", start=0), run("b-mid", HIGH, {"n1": 2}, team="b", start=10),
            run("b-new", HIGH, {"n1": 2}, team="b", start=20)]
    return quotas, busy


def test_a_job_within_its_guarantee_reclaims_it_from_borrowers_whatever_their_class():
    quotas, busy = borrowed_cohort()
    ds, waits = decide_with_reasons([job("a1", LOW, mn=4, team="a")], busy, cluster_with(busy, 2),
                                    quotas, NOW, CFG)
    preempted = sorted(p.job_id for p in of(Preempt, ds))
    assert preempted == ["b-mid", "b-new"] and not of(Shrink, ds) and admitted(ds) == {}
    assert all("team 'a'" in p.reason and "guaranteed share" in p.reason for p in of(Preempt, ds))
    [w] = waits
    assert w.code == "gang_does_not_fit" and w.detail.endswith(
        "reclaiming the guaranteed share of team 'a': preempting b-new (stop), b-mid (stop)")
    # Next cycle the victims are stopping: a1 holds their nodes, preempts nobody else and nothing
    # backfills there.
    stopping = [busy[0]] + [dataclasses.replace(r, stopping=True, target_workers=0) for r in busy[1:]]
    ds, waits = decide_with_reasons([job("a1", LOW, mn=4, team="a"), job("c1", HIGH, t=1, team="c")],
                                    stopping, cluster_with(stopping, 2), quotas, NOW, CFG)
    assert not of(Preempt, ds) and admitted(ds) == {}
    assert "freed by stopping b-mid, b-new" in why((ds, waits))["a1"].detail
    # Then they are gone and requeued: a1 starts; the borrowers wait, however high their class.
    requeued = [job(r.id, HIGH, mn=2, team="b", state="preempted") for r in busy[1:]]
    ds, waits = decide_with_reasons([*requeued, job("a1", LOW, mn=4, t=5, team="a")], busy[:1],
                                    cluster_with(busy[:1], 2), quotas, NOW, CFG)
    assert list(admitted(ds)) == ["a1"]
    assert {w.job_id: w.code for w in waits} == {"b-mid": "quota", "b-new": "quota"}


def test_reclaim_preempts_only_borrowers_and_only_as_much_as_needed():
    quotas, busy = borrowed_cohort()
    busy.append(run("c-low", LOW, {"n2": 4}, team="x"))      # a 12-CPU cluster; team x, of the
    quotas["x"] = share(4, 4)                                # cohort too, runs its own guarantee
    ds = decide([job("a1", LOW, mn=2, team="a")], busy, cluster_with(busy, 3), quotas, NOW, CFG)
    assert [p.job_id for p in of(Preempt, ds)] == ["b-new"]  # most recent borrower, 2 of 2 needed
    # Without a guarantee to reclaim (a already uses its 4) nothing is preempted for a's job.
    a_busy = busy[:2] + [run("a0", LOW, {"n1": 2}, team="a"), busy[3]]
    ds = decide([job("a1", NORMAL, mn=4, team="a")], a_busy, cluster_with(a_busy, 3),
                {**quotas, "a": share(2, 8)}, NOW, CFG)
    assert not of(Preempt, ds) and not of(Shrink, ds)
    # A team within its guarantee is never a victim, even of the lowest class.
    within = [run("b-low", LOW, {"n0": 4}, team="b"), run("x-low", LOW, {"n1": 4}, team="x")]
    ds = decide([job("a1", LOW, mn=4, team="a")], within, cluster_with(within, 2),
                {"a": share(4, 8), "b": share(4, 8), "x": share(0, 8)}, NOW, CFG)
    assert [p.job_id for p in of(Preempt, ds)] == ["x-low"]  # x runs 4 over its guarantee of 0


def test_priority_preemption_spares_other_teams_jobs_within_their_guarantee():
    quotas = {"a": share(4, 8), "b": share(4, 8), "x": share(0, 8)}
    busy = [run("a-low", LOW, {"n0": 4}, team="a"), run("x-pinned", NORMAL, {"n1": 4}, team="x", preemptible=False)]
    ds, waits = decide_with_reasons([job("b-high", HIGH, mn=4, team="b")], busy, cluster_with(busy, 2),
                                    quotas, NOW, CFG)
    assert not of(Preempt, ds) and not of(Shrink, ds)     # x's borrowing is pinned, a's is its own
    assert why((ds, waits))["b-high"].code == "gang_does_not_fit"
    busy[0] = run("a-low", LOW, {"n0": 4}, team="z")      # a team with no quota: fair game
    assert [p.job_id for p in of(Preempt, decide([job("b-high", HIGH, mn=4, team="b")], busy,
                                                 cluster_with(busy, 2), quotas, NOW, CFG))] == ["a-low"]


def test_fair_share_admits_the_team_using_least_first_within_a_class():
    busy = [run("a-run", NORMAL, {"n0": 4}, team="a")]
    queue = [job("a-next", mn=4, t=1, team="a"), job("b-next", mn=4, t=2, team="b")]
    c = cluster_with(busy, 2)
    assert list(admitted(decide(queue, busy, c, None, NOW, CFG))) == ["a-next"]  # FIFO without quotas
    quotas = {"a": Quota(), "b": Quota()}
    assert list(admitted(decide(queue, busy, c, quotas, NOW, CFG))) == ["b-next"]
    # The dominant resource counts: a holds 1 of 2 GPUs (50%), b 4 of 12 CPUs (33%).
    gpu = [run("a-gpu", NORMAL, {"g0": 1}, team="a", gpus_per_worker=1),
           run("b-cpu", NORMAL, {"n0": 4}, team="b")]
    c = ClusterState.of([Node("g0", 2, 2, 1, 1), Node("n0", 4, 0, 0, 0), Node("n1", 6, 0, 4, 0)])
    ds = decide([job("a-2", mn=4, t=1, team="a"), job("b-2", mn=4, t=2, team="b")], gpu, c, quotas, NOW, CFG)
    assert list(admitted(ds)) == ["b-2"]
    # Shares count what the cycle admits; a higher class still goes first.
    queue = [job("a1", t=1, team="a"), job("a2", t=2, team="a"), job("b1", t=3, team="b"),
             job("c1", LOW, t=0, team="c"), job("h", HIGH, t=9, team="a")]
    ds = decide(queue, [], ClusterState.of([Node("n", 3, 0)]), quotas, NOW, CFG)
    assert [d.job_id for d in of(Admit, ds)] == ["h", "b1", "a1"]
    assert decide(queue, [], ClusterState.of([Node("n", 3, 0)]), quotas, NOW,
                  PolicyConfig(min_run_before_preempt_s=0, fair_share=False))[1].job_id == "a1"


def test_quota_values_are_checked_naming_the_field():
    with pytest.raises(ValueError, match="guaranteed_gpus"):
        Quota(guaranteed_gpus=-1)
    with pytest.raises(ValueError, match=r"Quota.cpus \(the max, 2\) must be >= guaranteed_cpus"):
        Quota(cpus=2, guaranteed_cpus=4)


def test_one_cycle_with_guarantees_and_fair_share_over_5000_jobs_and_1000_nodes_is_fast():
    rng = random.Random(0)
    ns = [Node(f"n{i}", 32, 0, rng.choice([0, 4, 8, 32])) for i in range(1000)]
    teams = [f"t{k}" for k in range(8)]
    queue = [job(f"q{i}", rng.choice([LOW, NORMAL, HIGH, CRIT]), mn=rng.choice([1, 2, 8, 64]), cpus=4,
                 t=float(i), team=rng.choice(teams)) for i in range(5000)]
    quotas = {t: share(4000, None, cohort="all" if k % 2 else None) for k, t in enumerate(teams)}
    t0 = time.perf_counter()
    ds, waits = decide_with_reasons(queue, [], ClusterState.of(ns), quotas, NOW, CFG)
    assert time.perf_counter() - t0 < 2.0
    assert len(waits) == 5000 - len(admitted(ds)) and admitted(ds)


@pytest.mark.parametrize("seed", range(30))
def test_with_random_guarantees_no_team_passes_its_max_and_reclaim_takes_only_from_borrowers(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 5)
    teams = "abcd"
    quotas = {}
    for t in teams[:rng.randint(1, 4)]:
        g = rng.choice([0, 2, 4])
        quotas[t] = Quota(cpus=rng.choice([None, g, g + 4]), guaranteed_cpus=g,
                          cohort=rng.choice([None, "x", "x", "y"]))
    running = random_running(rng, n, [LOW, NORMAL, HIGH], at_least=0, teams=teams, start=True)
    queue = [job(f"q{k}", rng.choice([LOW, NORMAL, HIGH]), mn=rng.randint(1, 4), mx=rng.randint(4, 6),
                 t=k, team=rng.choice(teams)) for k in range(rng.randint(1, 10))]
    c = cluster_with(running, n)
    ds, waits = decide_with_reasons(queue, running, c, quotas, NOW, CFG)
    assert ds == decide(queue, running, c, quotas, NOW, CFG)
    assert {w.job_id for w in waits} == {j.id for j in queue} - set(admitted(ds))
    use: dict[str, float] = {}
    for r in running:
        use[r.team] = use.get(r.team, 0) + r.workers
    before = dict(use)
    for d in of(Admit, ds) + of(Grow, ds):
        team = next(j.team for j in queue + running if j.id == d.job_id)
        use[team] = use.get(team, 0) + sum(d.placement.values())
    for t, q in quotas.items():
        if q.cpus is not None:
            assert use.get(t, 0) <= max(q.cpus, before.get(t, 0)), (t, use, quotas)
    for p in of(Preempt, ds) + of(Shrink, ds):
        if "guaranteed share" in p.reason:
            victim = next(r for r in running if r.id == p.job_id)
            g = quotas[victim.team].guaranteed_cpus if victim.team in quotas else 0
            assert before[victim.team] > g, (p, quotas)
