"""Loaders on a remote dataset many times larger than each node's cache, under a real local Ray and
a real S3 endpoint: four simulated nodes (one rank each, a cache directory and an S3 connection of
their own) read a partitioned shuffle, fetch about their share of the dataset per epoch (counted
on the wire), never hold more than their cache limit (polled from outside), and resume on other
world sizes exactly once. Plus the loader defects this work fixed."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from actors.data import DataLoader, ShardError, global_step_sample_ids, read_manifest, write_shards
from bench.data.s3proxy import CountingProxy
from bench.data.scale_node import dir_bytes

ROWS, ROW_BYTES, SHARDS = 64, 1024, 324   # 64 KiB shards, about 20 MiB in all
N = ROWS * SHARDS
G, MICRO = 192, 16   # splits over 1, 2, 3 and 4 ranks and 8 partitions
NODES = 4


@pytest.fixture(scope="module")
def big(s3_endpoint):
    """The dataset on S3, and one byte-counting connection to the endpoint per simulated node."""
    url = f"s3://{s3_endpoint.make_bucket()}/ds"
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (N, ROW_BYTES - 8), dtype=np.uint8)   # + the 8-byte id: 1 KiB rows
    m = write_shards({"x": x}, url, rows_per_shard=ROWS, progress=False)
    port = int(s3_endpoint.url.rsplit(":", 1)[1])
    proxies = [CountingProxy(port) for _ in range(NODES)]
    yield url, m, x, proxies
    for p in proxies:
        p.close()


def loaders(url, world, proxies, caches, limit, shuffle, state=None, ranks=None, **kw):
    return [DataLoader(url, global_batch_size=G, micro_batch_size=MICRO, rank=r, world_size=world,
                       shuffle=shuffle, storage_options={"endpoint_url": proxies[r].url},
                       cache_dir=str(caches[r]), cache_limit=limit, state=state, **kw)
            for r in (ranks if ranks is not None else range(world))]


def step(dls, x=None) -> np.ndarray:
    parts = []
    for dl in dls:
        for mb in dl.next_step():
            ids = mb["id"].numpy()
            if x is not None:
                assert np.array_equal(mb["x"].numpy(), x[ids])
            parts.append(ids)
    return np.concatenate(parts)


class CachePoller:
    """Polls each cache directory's size (shards and partial downloads) from outside the loaders."""

    def __init__(self, dirs):
        self.dirs, self.peak = [str(d) for d in dirs], [0] * len(dirs)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            for i, d in enumerate(self.dirs):
                self.peak[i] = max(self.peak[i], dir_bytes(d))
            self._stop.wait(0.002)

    def stop(self) -> list[int]:
        self._stop.set()
        self._t.join()
        return self.peak


@pytest.mark.parametrize("transport", ["mmap", "object_store", "stream"])
def test_four_nodes_each_fetch_their_share_per_epoch_within_a_cache_a_tenth_of_the_data(
        ray_local, big, tmp_path, transport):
    url, m, x, proxies = big
    limit = m.total_bytes // 10
    caches = [tmp_path / f"node{r}" for r in range(NODES)]
    shuffle = {"mode": "partitioned", "seed": 1, "partitions": 8, "block_shards": 4}
    dls = loaders(url, NODES, proxies, caches, limit, shuffle, transport=transport)
    assert dls[0].order.mode == "partitioned"
    poller = CachePoller(caches)
    per_epoch = N // G
    for epoch in range(2):
        for p in proxies:
            p.reset()
        seen = [step(dls, x if epoch == 0 else None) for _ in range(per_epoch)]
        fetched = [p.downloaded for p in proxies]
        ids = np.concatenate(seen)
        assert np.array_equal(np.sort(ids), np.arange(N))              # every sample once
        assert np.array_equal(ids, np.concatenate([                     # in the pure order
            global_step_sample_ids(N, 1, epoch, global_batch_size=G, step=s, mode="partitioned",
                                   window=4 * ROWS, rows_per_shard=ROWS, partitions=8, reassign=0.1)
            for s in range(per_epoch)]))
        print(f"epoch {epoch}: fetched per node", [round(f / m.total_bytes, 3) for f in fetched])
        for r, f in enumerate(fetched):   # on the wire: about a quarter each, never the whole dataset
            assert f <= 1.25 * m.total_bytes / NODES, (epoch, r, f / m.total_bytes)
    peaks = poller.stop()
    assert all(0 < p <= limit for p in peaks), (peaks, limit)
    stats = [dl.actor_info()["cache"] for dl in dls]
    assert all(s["peak_bytes"] <= limit and s["evicted_shards"] > 0 for s in stats)
    for dl in dls:
        dl.close()


@pytest.mark.parametrize("after", [3, 2])
def test_resume_mid_epoch_on_fewer_nodes_is_exactly_once_and_the_new_owner_fetches_what_it_needs(
        ray_local, big, tmp_path, after):
    """3 does not divide the 8 partitions: two nodes share one, and both fetch its shards."""
    url, m, x, proxies = big
    limit = m.total_bytes // 5
    caches = [tmp_path / f"node{r}" for r in range(NODES)]
    shuffle = {"mode": "partitioned", "seed": 2, "partitions": 8, "block_shards": 2}
    first = loaders(url, NODES, proxies, caches, limit, shuffle)
    seen = [step(first) for _ in range(50)]
    state = json.loads(json.dumps(first[0].state_dict()))
    assert all(dl.state_dict() == state for dl in first) and state["partitions"] == 8
    for dl in first:
        dl.close()
    for p in proxies:
        p.reset()
    second = loaders(url, after, proxies, caches, limit, {"mode": "global"}, state=state)  # the state wins
    assert second[0].order.mode == "partitioned"
    seen += [step(second, x) for _ in range(N // G - 50)]
    for dl in second:
        dl.close()
    ids = np.concatenate(seen)
    assert np.array_equal(np.sort(ids), np.arange(N))
    want = [global_step_sample_ids(N, None, {**state, "epoch": 0, "consumed": 0}, step=s) for s in range(N // G)]
    assert np.array_equal(ids, np.concatenate(want))
    # each of the remaining nodes now reads 8/after partitions: more than its old share, and no more
    remaining = (N // G - 50) / (N // G)
    for r in range(after):
        assert proxies[r].downloaded <= remaining * m.total_bytes * (1 / after + 2 / 8) * 1.25


def test_auto_mode_is_partitioned_for_a_remote_dataset_larger_than_the_cache_else_global(ray_local, big, tmp_path):
    url, m, _, proxies = big
    small, = loaders(url, 1, proxies, [tmp_path / "a"], m.total_bytes // 4, None)
    roomy, = loaders(url, 1, proxies, [tmp_path / "b"], 2 * m.total_bytes, None)
    assert (small.order.mode, roomy.order.mode) == ("partitioned", "global")
    assert small.order.partitions == 1 and small.state_dict()["mode"] == "partitioned"
    local = str(tmp_path / "local")
    write_shards({"v": np.arange(100)}, local, rows_per_shard=10, progress=False)
    here = DataLoader(local, global_batch_size=10, micro_batch_size=10, rank=0, world_size=1, cache_limit=1)
    assert here.order.mode == "global"   # local data is mapped in place: no cache to outgrow
    for dl in (small, roomy, here):
        dl.close()


def test_a_cache_limit_below_one_block_of_the_ranks_partitions_is_refused_naming_the_field(ray_local, big, tmp_path):
    url, m, _, proxies = big
    shuffle = {"mode": "partitioned", "partitions": 8, "block_shards": 4}
    with pytest.raises(ValueError, match=r"dataset.cache_limit .* smaller than the working set .* the blocks"):
        loaders(url, 4, proxies, [tmp_path] * 4, 5 * m.shards[0].bytes, shuffle, ranks=[0])
    with pytest.raises(ValueError, match=r"dataset.cache_limit .* a global shuffle reads any shard"):
        loaders(url, 1, proxies, [tmp_path], m.total_bytes // 2, {"mode": "global"})


def test_two_live_loaders_with_one_name_never_share_an_actor(ray_local, tmp_path):
    """Concurrent Tune trials name their loaders alike: each keeps its own actor and dataset, and
    closing one leaves the other serving."""
    urls = []
    for i in range(2):
        urls.append(str(tmp_path / f"ds{i}"))
        write_shards({"v": np.full(40, i, dtype=np.int64)}, urls[-1], rows_per_shard=10, progress=False)
    a, b = [DataLoader(u, global_batch_size=20, micro_batch_size=20, rank=0, world_size=1,
                       cache_dir=str(tmp_path / "c"), name="trial") for u in urls]
    assert a.actor_name != b.actor_name and a.actor_info()["pid"] != b.actor_info()["pid"]
    assert (a.next_step()[0]["v"] == 0).all() and (b.next_step()[0]["v"] == 1).all()
    a.close()
    assert (b.next_step()[0]["v"] == 1).all()
    b.close()


def test_a_state_from_other_data_or_another_global_batch_is_refused_naming_what_differs(ray_local, tmp_path):
    for i in range(2):  # same size, different content
        write_shards({"v": np.arange(100) * (i + 1)}, str(tmp_path / f"ds{i}"), rows_per_shard=10, progress=False)
    kw = dict(micro_batch_size=10, rank=0, world_size=1, cache_dir=str(tmp_path / "c"))
    a = DataLoader(str(tmp_path / "ds0"), global_batch_size=20, **kw)
    a.next_step()
    st = a.state_dict()
    with pytest.raises(ValueError, match=r"state.fingerprint .* saved over other data"):
        DataLoader(str(tmp_path / "ds1"), global_batch_size=20, state=st, **kw)
    with pytest.raises(ValueError, match=r"state.global_batch_size \(20\) differs .* \(10\)"):
        DataLoader(str(tmp_path / "ds0"), global_batch_size=10, state=st, **kw)
    a.close()


def test_missing_remote_shard_in_partitioned_mode_names_it(ray_local, s3, tmp_path):
    from orchestrator.storage import Storage
    url = f"{s3}/ds"
    write_shards({"v": np.arange(400)}, url, rows_per_shard=20, progress=False)
    Storage(url).delete("shards/shard-00007.arrow")
    dl = DataLoader(url, global_batch_size=40, micro_batch_size=40, rank=0, world_size=1,
                    shuffle={"mode": "partitioned", "partitions": 2, "block_shards": 2},
                    cache_dir=str(tmp_path / "c"), cache_limit=read_manifest(url).total_bytes)
    with pytest.raises(ShardError, match=r"shard 7 \(s3://.*shard-00007.arrow\) is missing"):
        for _ in range(dl.steps_per_epoch):
            dl.next_step()
    dl.close()


def _train_spec_file(tmp_path, url, **dataset):
    import yaml
    spec = yaml.safe_load(open("jobs/examples/mlp_train.yaml"))
    spec["dataset"] = {"url": url, **dataset}
    spec["checkpoint"]["url"] = str(tmp_path / "ckpt")
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def test_validate_says_which_shuffle_a_remote_dataset_gets_and_refuses_a_cache_below_a_block(s3, tmp_path, capsys):
    """Before anything starts: auto picks partitioned for a dataset 4x the cache, a limit below
    what one worker holds is an error naming dataset.cache_limit, and a global shuffle of a
    dataset larger than the cache is refused."""
    from jobs.examples.datasets import classification
    from orchestrator.cli import main
    url = f"{s3}/cls"
    m = write_shards(classification(20_000, in_dim=32), url, rows_per_shard=64, progress=False)
    assert main(["validate", _train_spec_file(tmp_path, url, cache_limit=m.total_bytes // 4)]) == 0
    out = capsys.readouterr().out
    assert "shuffle auto -> partitioned, 2 partitions" in out and "node cache limit" in out
    assert main(["validate", _train_spec_file(tmp_path, url, cache_limit=3 * m.shards[0].bytes)]) == 2
    err = capsys.readouterr().err
    assert "dataset.cache_limit: dataset.cache_limit (0.0 MiB) is smaller than the working set" in err
    assert main(["validate", _train_spec_file(tmp_path, url, cache_limit=m.total_bytes // 2,
                                              shuffle={"mode": "global"})]) == 2
    assert "a global shuffle reads any shard" in capsys.readouterr().err
