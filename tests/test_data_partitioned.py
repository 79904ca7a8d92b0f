"""The partitioned (hierarchical) order and the bounded node cache, as pure units: no Ray.

The order: a pure function of (seed, epoch, layout, partitions, block); every sample once per
epoch; each rank's slice of every step drawn only from its own partitions; membership stable
across epochs but for the reassigned share; quality at the default block. The cache: the limit
is never exceeded, whatever the concurrency; eviction is Belady's (furthest next use), which
downloads less than LRU on a partitioned schedule; pinned shards stay; a full disk is a clear
error that leaves no partial file.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from actors.data import CacheFullError, EpochOrder, NodeCache, ShardError, plan, score_order
from actors.data.loader import DEFAULT_BLOCK_SHARDS, global_step_sample_ids
from actors.data.quality import reachable_shards_per_batch
from actors.data.shuffle import nested_order


def porder(n, k, p, g, *, block_shards=2, seed=3, carry=False, reassign=0.1, window=None):
    return EpochOrder(n, seed, "partitioned", window or block_shards * k, k, partitions=p,
                      global_batch_size=g, carry=carry, reassign=reassign)


# ---------------------------------------------------------------------------------------------
# the order
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, k, p, g, window, carry, reassign", [
    (1000, 100, 4, 40, 150, False, 0.0),
    (1000, 100, 4, 40, 150, True, 0.3),
    (997, 64, 8, 64, 100, True, 0.5),      # short last shard, boundary shards split
    (97, 10, 3, 9, 7, False, 0.2),         # partitions that do not divide the shards
    (5, 2, 2, 4, 3, True, 1.0),
    (3, 5, 4, 4, 2, True, 0.0),            # more partitions than shards (and than samples)
    (1, 1, 1, 1, 1, False, 0.0),
])
def test_partitioned_order_visits_each_sample_once_per_epoch(n, k, p, g, window, carry, reassign):
    o = porder(n, k, p, g, window=window, carry=carry, reassign=reassign)
    for epoch in (0, 1, 5):
        full = o.full(epoch)
        assert np.array_equal(np.sort(full), np.arange(n))
        pos = np.unique([0, n // 3, n // 2, n - 1])
        assert np.array_equal(o.ids(epoch, pos), full[pos])   # any position, without the rest


def test_partitioned_order_is_a_pure_function_of_seed_epoch_and_layout():
    a, b = porder(5000, 100, 4, 64), porder(5000, 100, 4, 64)
    assert np.array_equal(a.full(2), b.full(2))
    assert not np.array_equal(a.full(0), a.full(1))                         # reseeded per epoch
    assert not np.array_equal(a.full(0), porder(5000, 100, 4, 64, seed=4).full(0))
    assert not np.array_equal(a.full(0), porder(5000, 100, 4, 64, block_shards=3).full(0))
    assert not np.array_equal(a.full(0), porder(5000, 100, 8, 64).full(0))


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("carry", [False, True])
def test_each_rank_reads_only_the_shards_of_its_own_partitions(world, carry):
    n, k, p, g = 6000, 50, 4, 40
    o = porder(n, k, p, g, carry=carry)
    for epoch in (0, 1, 2):
        lay = o.partition_layout(epoch)
        full = o.full(epoch)
        offset = (epoch * n) % g if carry else 0
        slot = (offset + np.arange(n)) % g
        for r in range(world):
            lo, hi = r * g // world, (r + 1) * g // world
            mine = set(range(lo * p // g, hi * p // g))
            allowed = set(lay.piece_shard[np.isin(lay.piece_part, list(mine))].tolist())
            read = set((full[(slot >= lo) & (slot < hi)] // k).tolist())
            assert read <= allowed
            # its shards are about its share of the dataset (boundary shards are split)
            assert len(allowed) <= len(mine) * (n / k / p + 2)


def test_every_step_takes_the_same_number_of_samples_from_each_partition_and_partitions_balance():
    n, k, p, g = 10_007, 64, 8, 64
    for carry in (False, True):
        o = porder(n, k, p, g, carry=carry)
        for epoch in (0, 3):
            lay = o.partition_layout(epoch)
            assert lay.counts.max() - lay.counts.min() <= g // p        # balanced to the sample
            part, _ = o._index_in_partition(epoch, np.arange(n))
            offset = (epoch * n) % g if carry else 0
            full_steps = (offset + np.arange(n)) // g
            for s in np.unique(full_steps)[1:-1]:                        # whole steps of the epoch
                assert np.array_equal(np.bincount(part[full_steps == s], minlength=p), np.full(p, g // p))


@pytest.mark.parametrize("reassign", [0.0, 0.1, 0.5])
def test_membership_stays_where_it_is_cached_except_the_reassigned_share(reassign):
    n, k, p, g = 40_000, 100, 8, 64
    o = porder(n, k, p, g, reassign=reassign)

    def home(epoch):
        lay = o.partition_layout(epoch)
        part = np.full(o.num_shards, -1)
        whole = lay.piece_row == 0
        part[lay.piece_shard[whole]] = lay.piece_part[whole]
        return part
    moved = [np.mean(home(e) != home(e + 1)) for e in range(4)]
    if reassign == 0:
        assert moved == [0.0] * 4
    else:
        # a picked shard lands in its own partition again 1/p of the time; two epochs differ in both
        assert all(0.5 * reassign < m < 2.2 * reassign for m in moved), moved


def test_state_resumed_on_any_world_size_continues_the_same_stream():
    """World sizes that do and do not divide the partitions split every step the same way."""
    n, g, k, p = 2400, 48, 50, 4
    kw = dict(mode="partitioned", window=100, rows_per_shard=k, partitions=p, reassign=0.1)
    for step in (0, 7, 49, 50, 77):
        want = global_step_sample_ids(n, 5, 0, global_batch_size=g, step=step, **kw)
        c = plan.advance(plan.Cursor(), n, g, "drop", step)
        o = porder(n, k, p, g, window=100, seed=5)
        for world in (1, 2, 3, 4, 6):
            got = np.concatenate([plan.segment_ids(o, plan.rank_segments(c, n, g, "drop", r, world))
                                  for r in range(world)])
            assert np.array_equal(got, want), (step, world)


@pytest.mark.parametrize("n, k, p, g", [(1_000_000, 256, 8, 1024), (2_000_000, 1024, 16, 1024),
                                        (500_000, 128, 4, 512)])
def test_partitioned_order_at_the_default_block_meets_the_quality_goals(n, k, p, g):
    o = porder(n, k, p, g, block_shards=DEFAULT_BLOCK_SHARDS)
    for epoch in (0, 1):
        s = score_order(o.full(epoch), rows_per_shard=k, global_batch_size=g,
                        reachable=reachable_shards_per_batch(o, g))
        assert abs(s["spearman_rho"]) < 0.01, s
        assert s["displacement"] >= 0.95, s
        # a batch reads one block of each partition; within that it is as mixed as a uniform draw
        assert s["shards_per_batch_reachable_ratio"] >= 0.9, s


def test_nested_order_puts_one_item_of_each_range_in_every_aligned_run_of_ranks():
    m = 256
    for key in (1, 2, 3):
        order = nested_order(m, key)
        assert np.array_equal(np.sort(order), np.arange(m))
        for width in (2, 4, 16, 64):
            runs = order.reshape(-1, width)
            strata = runs // (m // width)
            assert all(np.array_equal(np.sort(r), np.arange(width)) for r in strata)
    assert not np.array_equal(nested_order(m, 1), nested_order(m, 2))
    assert np.array_equal(np.sort(nested_order(1000, 9)), np.arange(1000))


def test_shard_schedule_covers_every_read_and_lets_go_after_the_block():
    n, k, p, g = 8000, 100, 4, 80
    o = porder(n, k, p, g)
    sch = plan.ShardSchedule(o, n, g, "drop", 0, g // 2)
    for step in range(0, 2 * (n // g), 7):
        c = plan.advance(plan.Cursor(), n, g, "drop", step)
        ids = plan.segment_ids(o, plan.rank_segments(c, n, g, "drop", 0, 2))
        needed = set(sch.needed(step, step).tolist())
        assert set((ids // k).tolist()) <= needed
        assert len(needed) <= 2 * (2 + 1) * 2   # two partitions, a block of 2 (+1 straddled), at a hand-over
    shards, uses = sch.upcoming(0)
    assert len(set(shards.tolist())) == len(shards) and (np.diff(uses) >= 0).all()


# ---------------------------------------------------------------------------------------------
# the node cache
# ---------------------------------------------------------------------------------------------
SIZE = 1000


def writer(size=SIZE, log=None):
    def fetch(tmp):
        if log is not None:
            log.append(os.path.basename(tmp))
        with open(tmp, "wb") as f:
            f.write(b"x" * size)
    return fetch


def disk_bytes(d) -> int:
    """Bytes of every file in a cache directory (partial downloads included), each inode once: a
    download renamed into place while this runs is not counted twice."""
    from bench.data.scale_node import dir_bytes
    return dir_bytes(d)


def test_eviction_takes_the_shard_needed_furthest_ahead_never_a_pinned_one(tmp_path):
    c = NodeCache(str(tmp_path), 3 * SIZE)
    for s in "abc":
        c.get(s, SIZE, writer(), pin=False)
    c.plan({"a": 5, "b": 50, "c": 9, "d": 1}, clock=0)
    c.get("d", SIZE, writer())                     # full: b (next needed at 50) goes
    assert sorted(c.held()) == ["a", "c", "d"]
    c.get("a", SIZE, writer())                     # pinned now, like d
    c.plan({"a": 100, "c": 2, "d": 100, "e": 3}, clock=0)
    c.get("e", SIZE, writer())                     # a and d are further ahead but pinned: c goes
    assert sorted(c.held()) == ["a", "d", "e"]
    assert c.stats["evicted_shards"] == 2


def test_prefetch_never_evicts_a_shard_needed_sooner_and_may_be_told_to_use_free_space_only(tmp_path):
    c = NodeCache(str(tmp_path), 2 * SIZE)
    c.get("a", SIZE, writer(), pin=False)
    c.get("b", SIZE, writer(), pin=False)
    c.plan({"a": 1, "b": 4, "x": 3, "y": 9}, clock=0)
    assert c.get("y", SIZE, writer(), pin=False, prefetch=True) is None      # b and a are needed first
    assert c.get("x", SIZE, writer(), pin=False, prefetch=True, evict=False) is None
    assert c.get("x", SIZE, writer(), pin=False, prefetch=True) is not None  # b (4) is later than x (3)
    assert sorted(c.held()) == ["a", "x"]


def test_belady_downloads_less_than_lru_on_a_partitioned_schedule(tmp_path):
    """Two epochs of one rank's shard schedule through a cache of 40% of its share: the order is
    known, so what the next epoch needs first is kept; LRU keeps what was read last."""
    n, k, p, g = 20_000, 100, 4, 80
    o = porder(n, k, p, g)
    fetched = {}
    for policy in ("belady", "lru"):
        sch = plan.ShardSchedule(o, n, g, "drop", 0, g // 2)
        c = NodeCache(str(tmp_path / policy), 40 * SIZE, policy)
        mapped = set()
        for step in range(2 * (n // g)):
            shards, uses = sch.upcoming(step)
            c.plan({str(s): int(u) for s, u in zip(shards, uses)}, step)
            for s in sch.needed(step, step):
                if s not in mapped:
                    c.get(str(s), SIZE, writer())
                    mapped.add(s)
            gone = mapped - set(sch.needed(step + 1, step + 3).tolist())
            c.release([str(s) for s in gone])
            mapped -= gone
            for i, s in enumerate(shards[:16]):
                if c.get(str(s), SIZE, writer(), pin=False, prefetch=True, evict=i < 12) is None:
                    break
            assert disk_bytes(c.dir) <= 40 * SIZE
        fetched[policy] = c.stats["fetched_shards"]
    share = 2 * len(set(sch.upcoming(0)[0].tolist()))
    assert fetched["belady"] <= 0.85 * share < fetched["lru"], (fetched, share)


def _hammer(directory: str, limit: int, seed: int, rounds: int) -> None:
    """A client process: random pinned reads and releases against one shared cache."""
    rng = np.random.default_rng(seed)
    c = NodeCache(directory, limit, wait_s=60)
    held = []
    for _ in range(rounds):
        s = f"s{rng.integers(0, 40)}"
        c.get(s, SIZE, writer())
        held.append(s)
        if len(held) > 2:
            c.release([held.pop(0)])
    c.close()


def test_the_limit_holds_for_every_process_and_thread_sharing_a_cache(tmp_path):
    """Downloads reserve their size before they start: polled from outside, the bytes on disk
    (complete shards and partial downloads) never pass the limit."""
    d, limit = str(tmp_path / "cache"), 8 * SIZE
    NodeCache(d, limit).close()
    peak, stop = [0], threading.Event()

    def poll():
        while not stop.is_set():
            peak[0] = max(peak[0], disk_bytes(d))
    t = threading.Thread(target=poll, daemon=True)
    t.start()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_hammer, args=(d, limit, s, 60)) for s in range(3)]
    for pr in procs:
        pr.start()
    threads = [threading.Thread(target=_hammer, args=(d, limit, 10 + s, 60)) for s in range(2)]
    for th in threads:
        th.start()
    for w in procs + threads:
        w.join(120)
    stop.set()
    t.join()
    assert all(pr.exitcode == 0 for pr in procs)
    assert 0 < peak[0] <= limit


def test_a_cache_full_of_pinned_shards_is_an_error_naming_the_limit(tmp_path):
    c = NodeCache(str(tmp_path), 2 * SIZE, wait_s=0.5)
    c.get("a", SIZE, writer())
    c.get("b", SIZE, writer())
    with pytest.raises(CacheFullError, match=r"no room for a .* within the cache limit .* 2 shards are pinned"):
        c.get("c", SIZE, writer())
    c.release(["a"])
    assert c.get("c", SIZE, writer()) is not None


def test_pins_of_a_dead_process_do_not_hold_the_cache(tmp_path):
    d = str(tmp_path)
    code = (f"import sys; sys.path.insert(0, {os.getcwd()!r}); from actors.data import NodeCache; "
            f"c = NodeCache({d!r}, {2 * SIZE}); "
            f"[c.get(s, {SIZE}, lambda t: open(t, 'wb').write(b'x' * {SIZE})) for s in 'ab']")
    subprocess.run([sys.executable, "-c", code], check=True)   # pins a and b, then dies holding them
    c = NodeCache(d, 2 * SIZE, wait_s=5)
    assert c.get("c", SIZE, writer()) is not None and len(c.held()) == 2


def test_running_out_of_disk_mid_download_names_the_cache_and_leaves_no_partial_file(tmp_path):
    c = NodeCache(str(tmp_path / "cache"), 10 * SIZE)

    def full_disk(tmp):
        with open(tmp, "wb") as f:
            f.write(b"x" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(ShardError, match=r"shard cache .*cache: no space left on device .* partial file was removed"):
        c.get("a", SIZE, full_disk)
    assert os.listdir(tmp_path / "cache" / ".partial") == [] and c.held() == []
    assert c.usage() == 0                                      # the reservation went too
    assert c.get("a", SIZE, writer()) is not None


def test_a_real_full_disk_is_reported_the_same_way(tmp_path):
    """On a tiny tmpfs (needs root and a mount namespace that allows it; skipped otherwise)."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        c = NodeCache(str(mnt), 1 << 20)   # a limit larger than the disk: the disk runs out first
        with pytest.raises(ShardError, match="no space left on device"):
            c.get("big", 200_000, writer(200_000))
        assert os.listdir(mnt / ".partial") == []
        c.close()
    finally:
        subprocess.run(["umount", str(mnt)])


def test_a_shard_larger_than_the_limit_is_refused_at_once(tmp_path):
    c = NodeCache(str(tmp_path), SIZE)
    with pytest.raises(CacheFullError, match="does not fit the cache limit"):
        c.get("a", 2 * SIZE, writer(2 * SIZE))
    assert c.stats["waits"] == 0   # an error that would recur is not waited out
