"""One batch rule: spec, scheduler, trainer scaling policy, DeepSpeed config and data loader agree
on which worker counts split the global batch (DESIGN invariant 4). Pure: no Ray is started."""

from __future__ import annotations

import copy
import dataclasses
import random

import pytest

from orchestrator import spec as specmod
from orchestrator.batch import FIELD, BatchPlan, NoSplit
from orchestrator.policy import (Admit, ClusterState, Grow, JobView, Node, PolicyConfig, Preempt,
                                 Reject, RequestResources, Shrink, decide)
from orchestrator.store import JobStore

NOW = 100_000.0
CFG = PolicyConfig(min_run_before_preempt_s=0)
TRAIN = {
    "kind": "train", "name": "b", "max_steps": 10,
    "resources": {"min_workers": 3, "max_workers": 4, "cpus_per_worker": 1},
    "model": {"factory": "jobs.examples.models:mlp"}, "dataset": {"url": "memory://data"},
    "deepspeed": {"micro_batch_size": 8, "global_batch_size": 64},
    "checkpoint": {"url": "memory://ckpt"},
}


def train_spec(g=64, micro=8, lo=3, hi=4, **kw):
    d = copy.deepcopy(TRAIN)
    d["deepspeed"].update(global_batch_size=g, micro_batch_size=micro)
    d["resources"].update(min_workers=lo, max_workers=hi)
    d.update(kw)
    return specmod.parse_spec(d)


@pytest.fixture
def store(tmp_path):
    return JobStore(str(tmp_path / "jobs.db"))


@pytest.fixture
def view(store):
    """The scheduler's view of a spec, built the way the service builds it (through the store)."""
    return lambda spec: store.get(store.submit(spec)).view(NOW)


def slots(n: int, *, autoscale: bool = False, free: int | None = None) -> ClusterState:
    return ClusterState.of([Node("n0", n, 0, n if free is None else free)],
                           [(8.0, 0.0)] if autoscale else ())


def running(v: JobView, workers: int) -> JobView:
    return dataclasses.replace(v, state="running", workers=workers, placement={"n0": workers},
                               start_time=0.0)


# --- the plan ------------------------------------------------------------------------------------
def test_plan_lists_the_counts_that_split_the_batch_and_their_accumulation():
    p = BatchPlan(64, 8, 1, 8)
    assert p.allowed == (1, 2, 4, 8) and (p.min_allowed, p.max_allowed) == (1, 8)
    assert [p.accumulation(w) for w in p.allowed] == [8, 4, 2, 1]
    assert [p.per_rank(w) for w in p.allowed] == [64, 32, 16, 8]
    assert p.is_allowed(4) and not p.is_allowed(3)
    assert [p.largest_allowed_at_most(n) for n in range(0, 10)] == [None, 1, 2, 2, 4, 4, 4, 4, 8, 8]


def test_plan_refuses_counts_without_a_split_or_outside_the_range():
    p = BatchPlan(64, 8, 2, 4)
    with pytest.raises(ValueError, match="cannot be split over 3 workers"):
        p.accumulation(3)
    with pytest.raises(ValueError, match=r"outside \[2, 4\]"):
        p.accumulation(8)
    with pytest.raises(ValueError, match="micro_batch_size must be a positive integer"):
        BatchPlan(64, 0, 1, 1)


def test_a_range_without_any_split_names_the_global_batch_field():
    with pytest.raises(NoSplit) as exc:
        BatchPlan(64, 8, 3, 3)
    assert exc.value.field == FIELD == "deepspeed.global_batch_size"
    assert "for any allowed worker count w in [3, 3]" in str(exc.value)


# --- the scheduler -------------------------------------------------------------------------------
def test_job_view_carries_the_allowed_counts(view):
    v = view(train_spec())
    assert (v.min_workers, v.max_workers) == (3, 4)                  # the spec's range, as submitted
    assert v.allowed == (4,) and (v.min_allowed, v.max_allowed) == (4, 4)


def test_a_gang_whose_fewest_split_does_not_fit_waits_and_asks_room_for_it(view):
    # min 3, max 4, global 64, micro 8: only 4 workers split the batch
    v = view(train_spec())
    ds = decide([v], [], slots(3, autoscale=True), None, NOW, CFG)
    assert not [d for d in ds if isinstance(d, (Admit, Reject))]
    (req,) = [d for d in ds if isinstance(d, RequestResources)]
    assert len(req.bundles) == 4
    # on a cluster that can never hold 4 it is rejected, naming the count it needs
    (rej,) = [d for d in decide([v], [], slots(3), None, NOW, CFG) if isinstance(d, Reject)]
    assert rej.reason.startswith("4 workers (the fewest that split its batch)")
    # 3 of 8 slots free: it waits, and jobs behind it do not take its room
    assert [d for d in decide([v], [], slots(8, free=3), None, NOW, CFG) if isinstance(d, Admit)] == []


def test_a_gang_is_admitted_at_the_largest_count_that_splits_and_fits(view):
    (a,) = [d for d in decide([view(train_spec())], [], slots(4), None, NOW, CFG) if isinstance(d, Admit)]
    assert a.workers == 4 and a.placement == {"n0": 4}
    v = view(train_spec(lo=3, hi=7))                                 # 4 only: not 5, 6 or 7
    assert [d.workers for d in decide([v], [], slots(7), None, NOW, CFG) if isinstance(d, Admit)] == [4]


def test_growth_never_targets_a_count_without_a_split(view):
    v = view(train_spec(g=32, lo=2, hi=4))                           # allowed 2, 4
    assert v.allowed == (2, 4)
    one_more = running(v, 2)
    assert [d for d in decide([], [one_more], slots(3, free=1), None, NOW, CFG) if isinstance(d, Grow)] == []
    (g,) = [d for d in decide([], [one_more], slots(5, free=3), None, NOW, CFG) if isinstance(d, Grow)]
    assert g.to_workers == 4 and g.placement == {"n0": 2}


def test_shrink_for_a_higher_job_stops_at_an_allowed_count(view):
    low = running(view(train_spec(lo=3, hi=8, scheduling={"priority": "low"})), 8)
    assert low.allowed == (4, 8)
    high = view(train_spec(lo=4, hi=4, name="hi", scheduling={"priority": "high"}))
    ds = decide([high], [low], slots(8, free=0), None, NOW, CFG)
    (s,) = [d for d in ds if isinstance(d, Shrink)]
    assert s.to_workers == 4 and s.release == {"n0": 4}


def test_a_job_at_its_fewest_split_is_stopped_not_shrunk_below_it(view):
    # raw min_workers 3, but 3 has no split: freeing 1 slot means stopping it, not shrinking to 3
    low = running(view(train_spec(lo=3, hi=8, scheduling={"priority": "low"})), 4)
    high = view(train_spec(g=8, micro=8, lo=1, hi=1, name="hi", scheduling={"priority": "high"}))
    ds = decide([high], [low], slots(4, free=0), None, NOW, CFG)
    assert [d for d in ds if isinstance(d, Shrink)] == []
    assert [d.job_id for d in ds if isinstance(d, Preempt)] == [low.id]


# --- every component derives the same numbers ----------------------------------------------------
def _cases(n: int, seed: int = 16):
    rng = random.Random(seed)
    for _ in range(n):
        micro = rng.randint(1, 16)
        g = micro * rng.randint(1, 48) if rng.random() < 0.85 else rng.randint(1, 512)
        lo = rng.randint(1, 12)
        yield g, micro, lo, rng.randint(lo, 16)


def test_spec_scheduler_trainer_deepspeed_and_loader_agree_on_the_split(view):
    import ray.train

    from actors.data import plan as dataplan
    from actors.trainer.loop import deepspeed_config
    from actors.trainer.trainer import BatchAwareScalingPolicy
    rng = random.Random(7)
    valid = 0
    for g, micro, lo, hi in _cases(500):
        try:
            plan = BatchPlan(g, micro, lo, hi)
        except NoSplit:
            plan = None
        try:
            spec = train_spec(g, micro, lo, hi)
        except specmod.SpecError as e:
            assert plan is None, (g, micro, lo, hi, e.errors)
            assert [f for f, _ in e.errors] == ["deepspeed.global_batch_size"]
            continue
        assert plan is not None and BatchPlan.of(spec) == plan, (g, micro, lo, hi)
        assert plan.allowed == tuple(w for w in range(lo, hi + 1) if g % (micro * w) == 0)
        valid += 1
        case = (g, micro, lo, hi, plan.allowed)

        # loader: accepts exactly the allowed counts, with the plan's accumulation
        for w in range(lo, hi + 1):
            if plan.is_allowed(w):
                assert dataplan.check_batch(g, micro, w, 0, 10**9, "carry") == plan.accumulation(w), case
            else:
                with pytest.raises(ValueError, match="must be a multiple"):
                    dataplan.check_batch(g, micro, w, 0, 10**9, "carry")

        # DeepSpeed config: the plan's numbers at every allowed count, refused elsewhere
        for w in range(lo, hi + 1):
            if plan.is_allowed(w):
                cfg = deepspeed_config(spec, w)
                assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
                        cfg["gradient_accumulation_steps"]) == (g, micro, plan.accumulation(w)), case
                assert w * micro * cfg["gradient_accumulation_steps"] == g
            else:
                with pytest.raises(ValueError):
                    deepspeed_config(spec, w)

        # scheduler: the job view carries the plan; admission and growth pick allowed counts only
        v = view(spec)
        assert (v.allowed, v.min_allowed, v.max_allowed) == (plan.allowed, plan.min_allowed,
                                                           plan.max_allowed), case
        room = rng.randint(1, hi + 2)
        got = [d.workers for d in decide([v], [], slots(room, autoscale=True), None, NOW, CFG)
               if isinstance(d, Admit)]
        assert got == ([plan.largest_allowed_at_most(room)] if room >= plan.min_allowed else []), case
        extra = rng.randint(0, hi)
        r = running(v, plan.min_allowed)
        grown = [d.to_workers for d in decide([], [r], slots(plan.min_allowed + extra, free=extra),
                                              None, NOW, CFG) if isinstance(d, Grow)]
        best = plan.largest_allowed_at_most(plan.min_allowed + extra)
        assert grown == ([best] if best > plan.min_allowed else []), case

        # trainer: Ray Train's elastic policy only ever starts or resizes to allowed counts
        if plan.min_allowed < plan.max_allowed:
            sc = ray.train.ScalingConfig(num_workers=(plan.min_allowed, plan.max_allowed),
                                         resources_per_worker={"CPU": 1})
            policy = BatchAwareScalingPolicy(sc, plan, "job")
            for n in range(0, hi + 3):
                policy._cap = None
                w = policy._count_possible_workers({"n0": {"CPU": n}})
                assert w == (plan.largest_allowed_at_most(min(n, plan.max_allowed)) or -1), (case, n)
                policy._cap = n or None
                assert policy._get_num_workers_for_resource_request() in plan.allowed, (case, n)
    assert valid >= 150
