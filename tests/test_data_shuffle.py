"""The epoch order is a pure function of (seed, epoch); the step plan is world-size free; scores."""

from __future__ import annotations

import numpy as np
import pytest

from actors.data import EpochOrder, expected_shards_per_batch, global_step_sample_ids, score_order
from actors.data import plan
from actors.data.shuffle import permute


@pytest.mark.parametrize("mode", ["global", "local", "none"])
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 4097])
def test_every_mode_visits_each_sample_once_per_epoch(mode, n):
    o = EpochOrder(n, seed=5, mode=mode, window=64, rows_per_shard=100)
    for epoch in (0, 3):
        assert np.array_equal(np.sort(o.full(epoch)), np.arange(n))


def test_order_at_any_position_matches_the_full_order_without_materialising_it():
    o = EpochOrder(100_003, seed=11)
    full = o.full(2)
    pos = np.array([0, 1, 99_999, 100_002, 31_337])
    assert np.array_equal(o.ids(2, pos), full[pos])
    local = EpochOrder(100_003, seed=11, mode="local", window=1000, rows_per_shard=777)
    assert np.array_equal(local.ids(2, pos), local.full(2)[pos])


def test_order_depends_only_on_seed_and_epoch():
    a, b = EpochOrder(5000, seed=1), EpochOrder(5000, seed=1)
    assert np.array_equal(a.full(0), b.full(0))
    assert not np.array_equal(a.full(0), a.full(1))
    assert not np.array_equal(a.full(0), EpochOrder(5000, seed=2).full(0))


def test_permute_is_a_bijection_with_per_element_keys():
    keys = np.arange(10, dtype=np.uint64).repeat(16)
    out = permute(np.tile(np.arange(16), 10), 16, keys).reshape(10, 16)
    assert all(np.array_equal(np.sort(r), np.arange(16)) for r in out)


def test_global_mode_meets_quality_targets_on_one_million_samples():
    n, rows_per_shard, g = 1_000_000, 8192, 1024
    s = score_order(EpochOrder(n, seed=0).full(0), rows_per_shard=rows_per_shard, global_batch_size=g)
    assert abs(s["spearman_rho"]) < 0.01
    assert s["displacement"] >= 0.95
    assert abs(s["shards_per_batch_ratio"] - 1) <= 0.10
    local = score_order(EpochOrder(n, seed=0, mode="local", window=16384, rows_per_shard=rows_per_shard).full(0),
                        rows_per_shard=rows_per_shard, global_batch_size=g)
    print(f"\nglobal: {s}\nlocal(window=16384): {local}")
    assert local["shards_per_batch_ratio"] < 0.1  # the cheap mode reads few shards per batch


def test_scores_of_a_sequential_order_are_the_worst():
    s = score_order(np.arange(10_000), rows_per_shard=100, global_batch_size=100)
    assert s["spearman_rho"] == pytest.approx(1.0)
    assert s["displacement"] == pytest.approx(0.0)
    assert s["shards_per_batch"] == 1.0
    assert expected_shards_per_batch(10_000, 100, 100) == pytest.approx(100 * (1 - 0.99 ** 100), rel=0.02)


def test_score_order_rejects_a_non_permutation():
    with pytest.raises(ValueError, match="not a permutation"):
        score_order(np.array([0, 0, 1]), rows_per_shard=1, global_batch_size=1)


def test_global_step_samples_do_not_depend_on_world_size():
    n, g, micro = 1000, 48, 4
    for world in (1, 2, 3, 4, 6):
        c = plan.Cursor(1, 96)
        got = np.concatenate([plan.segment_ids(EpochOrder(n, 3), plan.rank_segments(c, n, g, "drop", r, world))
                              for r in range(world)])
        assert np.array_equal(got, global_step_sample_ids(n, 3, 1, consumed=96, global_batch_size=g))
        assert plan.check_batch(g, micro, world, 0, n, "drop") == g // (micro * world)


def test_drop_tail_gives_n_div_g_steps_and_skips_the_remainder():
    n, g = 100, 30
    c, seen = plan.Cursor(), []
    for _ in range(3):
        seen.append(global_step_sample_ids(n, 0, c.epoch, consumed=c.consumed, global_batch_size=g))
        c = plan.advance(c, n, g, "drop")
    assert c == plan.Cursor(1, 0)
    ids = np.concatenate(seen)
    assert len(np.unique(ids)) == 90
    assert set(ids) == set(EpochOrder(n, 0).full(0)[:90])


def test_carry_tail_straddles_epochs_and_drops_nothing():
    n, g = 100, 30
    c, seen = plan.Cursor(), []
    for _ in range(10):  # 300 samples = 3 epochs exactly
        segs = plan.step_segments(c, n, g, "carry")
        seen.append(plan.segment_ids(EpochOrder(n, 0), segs))
        c = plan.advance(c, n, g, "carry")
    assert c == plan.Cursor(3, 0)
    stream = np.concatenate(seen)
    for e in range(3):
        assert np.array_equal(stream[e * n:(e + 1) * n], EpochOrder(n, 0).full(e))


@pytest.mark.parametrize("g, micro, world, rank, match", [
    (48, 5, 2, 0, r"global_batch_size \(48\) must be a multiple of micro_batch_size \(5\) x world_size \(2\)"),
    (48, 4, 2, 2, "rank must be in"),
    (0, 4, 2, 0, "global_batch_size must be a positive integer"),
    (2000, 4, 2, 0, "exceeds the dataset's 1000 samples"),
])
def test_bad_batch_geometry_is_rejected_by_name(g, micro, world, rank, match):
    with pytest.raises(ValueError, match=match):
        plan.check_batch(g, micro, world, rank, 1000, "drop")


def test_bad_shuffle_mode_is_rejected_by_name():
    with pytest.raises(ValueError, match="shuffle.mode"):
        EpochOrder(10, mode="bogus")
