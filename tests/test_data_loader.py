"""Loader actors under a real local Ray: exact order, equal batches, exactly-once resume on any
world size, tails, S3, bad shards, bounded prefetch, and actor restarts."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import ray

from actors.data import (DataLoader, EpochOrder, ShardError, global_step_sample_ids, read_manifest,
                         write_shards)
from conftest import wait_until
from jobs.examples.datasets import classification
from orchestrator.storage import Storage

N = 960          # = 40 global batches of 24: "every sample of the epoch" is literal with tail=drop
G = 24           # divisible by micro(2) x world for world in 1, 2, 3, 4
MICRO = 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    data = classification(n=N, in_dim=8, seed=1)
    write_shards(data, str(root / "ds"), rows_per_shard=100, progress=False)
    return str(root / "ds"), data


@pytest.fixture(params=["object_store", "stream", "mmap"])
def transport(request):
    """Every loader test runs over both ways rows reach the trainer (see actors.data.loader)."""
    return request.param


def _loaders(url, world, tmp, state=None, **kw):
    return [DataLoader(url, global_batch_size=kw.pop("g", G), micro_batch_size=MICRO, rank=r,
                       world_size=world, cache_dir=str(tmp), state=state, **kw) for r in range(world)]


def _step(loaders) -> np.ndarray:
    """One global step across all ranks: the ids in stream order; checks equal micro-batches."""
    parts = []
    for dl in loaders:
        micro = dl.next_step()
        assert len(micro) == dl.accumulation
        assert all(len(b["id"]) == dl.micro_batch_size for b in micro)
        parts += [b["id"].numpy() for b in micro]
    return np.concatenate(parts)


def _close(loaders):
    for dl in loaders:
        dl.close()


def test_each_global_step_is_the_pure_order_slice_split_equally_over_ranks(ray_local, dataset, tmp_path, transport):
    url, data = dataset
    loaders = _loaders(url, 2, tmp_path, shuffle={"seed": 7}, transport=transport)
    assert loaders[0].steps_per_epoch == N // G and loaders[0].accumulation == G // (MICRO * 2)
    for s in range(3):
        micro = loaders[1].next_step()
        ids0 = np.concatenate([b["id"].numpy() for b in loaders[0].next_step()])
        ids1 = np.concatenate([b["id"].numpy() for b in micro])
        want = global_step_sample_ids(N, 7, 0, global_batch_size=G, step=s)
        assert np.array_equal(np.concatenate([ids0, ids1]), want)
        for b in micro:  # rows are the samples they claim to be
            np.testing.assert_array_equal(b["x"].numpy(), data["x"][b["id"].numpy()])
            np.testing.assert_array_equal(b["y"].numpy(), data["y"][b["id"].numpy()])
    st = loaders[0].state_dict()
    assert st == loaders[1].state_dict()
    assert (st["epoch"], st["consumed"], st["seed"]) == (0, 3 * G, 7)
    assert np.array_equal(global_step_sample_ids(N, None, st), global_step_sample_ids(N, 7, 0, global_batch_size=G, step=3))
    _close(loaders)


def test_state_dict_is_small_and_json_able(ray_local, dataset, tmp_path):
    (dl,) = _loaders(dataset[0], 1, tmp_path)
    for _ in range(5):
        dl.next_step()
    text = json.dumps(dl.state_dict())
    assert len(text) < 300 and json.loads(text)["consumed"] == 5 * G
    dl.close()


@pytest.mark.parametrize("before, after", [(2, 1), (2, 3), (1, 4)])
def test_resume_on_another_world_size_visits_every_sample_once(ray_local, dataset, tmp_path, before, after, transport):
    url, _ = dataset
    first = _loaders(url, before, tmp_path, shuffle={"seed": 3}, transport=transport)
    seen = [_step(first) for _ in range(13)]
    state = first[0].state_dict()
    assert all(dl.state_dict() == state for dl in first)
    _close(first)  # the old world is gone, prefetched batches with it
    second = _loaders(url, after, tmp_path, state=json.loads(json.dumps(state)), transport=transport)
    seen += [_step(second) for _ in range(second[0].steps_per_epoch - 13)]
    assert second[0].state_dict()["epoch"] == 1 and second[0].state_dict()["consumed"] == 0
    _close(second)
    ids = np.concatenate(seen)
    assert len(ids) == N and np.array_equal(np.sort(ids), np.arange(N))  # no duplicate, none missing
    assert np.array_equal(ids, EpochOrder(N, 3).full(0))                 # and the same global order


def test_drop_tail_skips_the_remainder_and_the_next_epoch_is_a_fresh_order(ray_local, tmp_path):
    url = str(tmp_path / "ds")
    write_shards({"v": np.arange(100, dtype=np.float32)}, url, rows_per_shard=40, progress=False)
    (dl,) = [DataLoader(url, global_batch_size=32, micro_batch_size=8, rank=0, world_size=1,
                        shuffle={"tail": "drop", "seed": 1}, cache_dir=str(tmp_path / "c"))]
    assert dl.steps_per_epoch == 3
    epoch0 = np.concatenate([np.concatenate([b["id"].numpy() for b in dl.next_step()]) for _ in range(3)])
    assert dl.state_dict()["epoch"] == 1 and dl.state_dict()["consumed"] == 0
    assert np.array_equal(epoch0, EpochOrder(100, 1).full(0)[:96]) and len(set(epoch0)) == 96
    nxt = np.concatenate([b["id"].numpy() for b in dl.next_step()])
    assert np.array_equal(nxt, EpochOrder(100, 1).full(1)[:32])
    dl.close()


def test_carry_tail_carries_the_remainder_into_the_next_epoch_across_a_resume(ray_local, tmp_path, transport):
    url = str(tmp_path / "ds")
    write_shards({"v": np.arange(100, dtype=np.float32)}, url, rows_per_shard=40, progress=False)
    kw = dict(global_batch_size=32, micro_batch_size=8, shuffle={"tail": "carry", "seed": 2},
              cache_dir=str(tmp_path / "c"), transport=transport)
    a = [DataLoader(url, rank=r, world_size=2, **kw) for r in range(2)]
    stream = [_step(a) for _ in range(3)]
    state = a[0].state_dict()  # 96 consumed: the next step straddles epochs 0 and 1
    _close(a)
    b = [DataLoader(url, rank=r, world_size=4, state=state, **kw) for r in range(4)]
    stream += [_step(b) for _ in range(22)]  # 25 steps x 32 = 800 samples = epochs 0..7
    _close(b)
    ids = np.concatenate(stream)
    want = np.concatenate([EpochOrder(100, 2).full(e) for e in range(8)])
    assert np.array_equal(ids, want)


def test_loader_reads_shards_from_s3_through_the_node_cache(ray_local, s3, tmp_path, transport):
    data = classification(n=300, in_dim=4)
    write_shards(data, f"{s3}/ds", rows_per_shard=64, progress=False)
    cache = tmp_path / "cache"
    (dl,) = [DataLoader(f"{s3}/ds", global_batch_size=60, micro_batch_size=30, rank=0, world_size=1,
                        cache_dir=str(cache), transport=transport)]
    seen = []
    for _ in range(dl.steps_per_epoch):
        for b in dl.next_step():
            np.testing.assert_array_equal(b["x"].numpy(), data["x"][b["id"].numpy()])
            seen.append(b["id"].numpy())
    assert np.array_equal(np.sort(np.concatenate(seen)), np.arange(300))
    m = read_manifest(f"{s3}/ds")
    assert sorted(p.name for p in cache.glob("*.arrow")) == sorted(f"{s.sha256}.arrow" for s in m.shards)
    dl.close()


def test_missing_local_shard_raises_an_error_naming_it(ray_local, tmp_path, transport):
    url = str(tmp_path / "ds")
    write_shards({"v": np.arange(50)}, url, rows_per_shard=10, progress=False)
    os.remove(tmp_path / "ds" / "shards" / "shard-00003.arrow")
    (dl,) = [DataLoader(url, global_batch_size=50, micro_batch_size=50, rank=0, world_size=1,
                        cache_dir=str(tmp_path / "c"), transport=transport)]
    with pytest.raises(ShardError, match=r"shard 3 \(.*shard-00003.arrow\) is missing"):
        dl.next_step()
    dl.close()


def test_corrupt_shard_on_s3_raises_a_checksum_error_naming_it(ray_local, s3, tmp_path, transport):
    write_shards({"v": np.arange(50)}, f"{s3}/ds", rows_per_shard=25, progress=False)
    st = Storage(f"{s3}/ds")
    data = bytearray(st.read_bytes("shards/shard-00001.arrow"))
    data[-64] ^= 0xFF
    st.write_bytes("shards/shard-00001.arrow", bytes(data))
    (dl,) = [DataLoader(f"{s3}/ds", global_batch_size=50, micro_batch_size=25, rank=0, world_size=1,
                        cache_dir=str(tmp_path / "c"), transport=transport)]
    with pytest.raises(ShardError, match=r"shard 1 \(s3://.*shard-00001.arrow\) is corrupt: sha256"):
        dl.next_step()
    m = read_manifest(f"{s3}/ds")
    assert not (tmp_path / "c" / f"{m.shards[1].sha256}.arrow").exists()  # nothing corrupt was cached
    dl.close()


def test_corrupt_local_shard_raises_a_checksum_error_naming_it(ray_local, tmp_path, transport):
    url = str(tmp_path / "ds")
    write_shards({"v": np.arange(50)}, url, rows_per_shard=25, progress=False)
    p = tmp_path / "ds" / "shards" / "shard-00000.arrow"
    data = bytearray(p.read_bytes())
    data[-64] ^= 0xFF
    p.write_bytes(bytes(data))
    (dl,) = [DataLoader(url, global_batch_size=50, micro_batch_size=25, rank=0, world_size=1,
                        cache_dir=str(tmp_path / "c"), transport=transport)]
    with pytest.raises(ShardError, match=r"shard 0 \(.*shard-00000.arrow\) is corrupt"):
        dl.next_step()
    dl.close()


def test_prefetch_is_bounded_by_batches_and_megabytes(ray_local, tmp_path, transport):
    url = str(tmp_path / "ds")
    write_shards({"x": np.zeros((512, 1024), np.float32)}, url, rows_per_shard=128, progress=False)  # 4 KiB rows
    # 64 rows x 4 KiB (+8 B id) per request: 1 MiB allows 3 in flight, fewer than prefetch_batches=8
    (dl,) = [DataLoader(url, global_batch_size=64, micro_batch_size=32, rank=0, world_size=1,
                        prefetch_batches=8, max_prefetch_mb=1, cache_dir=str(tmp_path / "c"), transport=transport)]
    assert dl.max_inflight == 3
    for _ in range(dl.steps_per_epoch * 2):
        dl.next_step()
    stats = dl.prefetch_stats()
    assert stats["peak_inflight"] == 3 and stats["peak_inflight_bytes"] <= 2**20
    assert stats["measured_request_bytes"] == stats["bytes_per_request"] == 64 * (4096 + 8)
    (dl2,) = [DataLoader(url, global_batch_size=64, micro_batch_size=32, rank=0, world_size=1,
                         prefetch_batches=2, max_prefetch_mb=256, cache_dir=str(tmp_path / "c"), transport=transport)]
    dl2.next_step()
    assert dl2.prefetch_stats()["peak_inflight"] == 2
    dl.close()
    dl2.close()


@pytest.mark.parametrize("prefetch", [5, 8])
def test_steps_asked_for_in_chunks_are_each_the_pure_order_slice_and_held_batches_stay_intact(
        ray_local, dataset, tmp_path, transport, prefetch):
    """Requests carry several steps each (half the prefetch depth, so the per-request cost is paid
    once per chunk); every step is still its own slice of the pure order, across an epoch boundary
    and a resume with chunks in flight, and batches the caller keeps are never written over."""
    url, data = dataset
    (dl,) = _loaders(url, 1, tmp_path, shuffle={"seed": 3}, transport=transport, prefetch_batches=prefetch)
    assert dl.chunk == prefetch // 2
    steps = dl.steps_per_epoch + 7                              # into the second epoch
    held = [dl.next_step() for _ in range(steps)]
    stats = dl.prefetch_stats()
    assert stats["peak_inflight"] <= prefetch
    assert stats["requests"] <= -(-(steps + prefetch) // dl.chunk) + 1  # chunks, not one call per step
    for s, micro in enumerate(held):
        ids = np.concatenate([b["id"].numpy() for b in micro])
        epoch, step = divmod(s, dl.steps_per_epoch)
        assert np.array_equal(ids, global_step_sample_ids(N, 3, epoch, global_batch_size=G, step=step)), s
        for b in micro:
            np.testing.assert_array_equal(b["x"].numpy(), data["x"][b["id"].numpy()])
    state = dl.state_dict()
    dl.next_step()                                              # chunks for later steps in flight
    dl.load_state_dict(state)                                   # back to the saved cursor: dropped
    ids = np.concatenate([b["id"].numpy() for b in dl.next_step()])
    assert np.array_equal(ids, global_step_sample_ids(N, 3, 1, global_batch_size=G, step=7))
    dl.close()


@pytest.mark.parametrize("kwargs, match", [
    (dict(global_batch_size=25, micro_batch_size=2, world_size=2), r"global_batch_size \(25\).*micro_batch_size \(2\).*world_size \(2\)"),
    (dict(global_batch_size=24, micro_batch_size=2, world_size=2, shuffle={"mode": "random"}), "shuffle.mode: Input should be"),
    (dict(global_batch_size=24, micro_batch_size=2, world_size=2, prefetch_batches=0), "prefetch_batches"),
    (dict(global_batch_size=24, micro_batch_size=2, world_size=2, transport="shm"), "transport must be one of"),
    (dict(global_batch_size=24, micro_batch_size=2, world_size=2, gather_threads=0), "gather_threads"),
    (dict(global_batch_size=24, micro_batch_size=2, world_size=2, state={"epoch": 0}), r"state is missing field\(s\)"),
])
def test_bad_loader_arguments_are_rejected_by_name(ray_local, dataset, kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataLoader(dataset[0], rank=0, **kwargs)


def test_actor_node_that_is_not_an_alive_node_is_rejected_by_name(ray_local, dataset, tmp_path):
    url, _ = dataset
    with pytest.raises(ValueError, match="actor_node 'f00d' is not an alive Ray node"):
        DataLoader(url, global_batch_size=G, micro_batch_size=MICRO, rank=0, world_size=1,
                   cache_dir=str(tmp_path), actor_node="f00d")


def test_state_from_another_dataset_is_rejected(ray_local, dataset, tmp_path):
    (dl,) = _loaders(dataset[0], 1, tmp_path)
    bad = dict(dl.state_dict(), num_samples=N + 1)
    with pytest.raises(ValueError, match="state.num_samples"):
        dl.load_state_dict(bad)
    dl.close()


def test_loader_actor_uses_no_cpu_and_sits_on_the_callers_node(ray_local, dataset, tmp_path):
    (dl,) = _loaders(dataset[0], 1, tmp_path, name="affinity-test")
    info = ray.get(dl.actor().info.remote())
    assert info["node_id"] == ray.get_runtime_context().get_node_id()
    assert dl.transport == "mmap"  # auto: the actor shares the node, so rows skip the object store
    total = ray.cluster_resources()["CPU"]  # a live loader actor holds no CPU the trainers need
    wait_until(lambda: ray.available_resources().get("CPU", 0) == total, 30, what="all CPUs free")
    assert dl.actor_name.startswith("reo-data:affinity-test:rank0:")
    again = ray.get_actor(dl.actor_name)
    assert ray.get(again.info.remote())["pid"] == info["pid"]
    dl.close()


@pytest.mark.slow
def test_killing_the_loader_actor_mid_epoch_loses_and_duplicates_nothing(ray_local, dataset, tmp_path, transport):
    url, data = dataset
    loaders = _loaders(url, 2, tmp_path, shuffle={"seed": 9}, transport=transport)
    seen = [_step(loaders) for _ in range(10)]
    victim = loaders[1].actor()
    old_pid = ray.get(victim.info.remote())["pid"]
    assert loaders[1].prefetch_stats()["max_inflight"] >= 2  # requests are in flight as it dies
    ray.kill(victim, no_restart=False)
    seen += [_step(loaders) for _ in range(loaders[0].steps_per_epoch - 10)]
    new_pid = wait_until(lambda: ray.get(victim.info.remote())["pid"], 60, what="restarted actor")
    assert new_pid != old_pid
    _close(loaders)
    ids = np.concatenate(seen)
    assert np.array_equal(ids, EpochOrder(N, 9).full(0))


@pytest.mark.multinode
def test_a_loader_actor_on_another_node_streams_the_pure_order(ray_cluster, dataset, tmp_path):
    url, _ = dataset
    other = ray_cluster.add_node(num_cpus=1).node_id
    ray_cluster.wait_for_nodes()
    dl = DataLoader(url, global_batch_size=G, micro_batch_size=MICRO, rank=0, world_size=1, shuffle={"seed": 5},
                    cache_dir=str(tmp_path), actor_node=other)
    assert dl.transport == "stream"  # auto, across nodes
    ids = np.concatenate([_step([dl]) for _ in range(dl.steps_per_epoch + 3)])  # over the epoch boundary
    order = EpochOrder(N, 5)
    assert np.array_equal(ids, np.concatenate([order.full(0), order.full(1)[:3 * G]]))
    dl.close()


def test_an_unreachable_stream_falls_back_to_the_object_store(ray_local, dataset, tmp_path, monkeypatch):
    import actors.data.loader as loader

    def refused(self, dl, connections=2):
        raise ConnectionRefusedError("connection refused")
    monkeypatch.setattr(loader.StreamTransport, "__init__", refused)
    (dl,) = _loaders(dataset[0], 1, tmp_path, shuffle={"seed": 2}, transport="stream")
    with pytest.warns(RuntimeWarning, match="rows come through the Ray object store instead"):
        assert dl.transport == "object_store"
    assert np.array_equal(_step([dl]), EpochOrder(N, 2).full(0)[:G])
    dl.close()
