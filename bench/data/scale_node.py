"""One simulated node of ``bench.data.scale``: one rank of ``--world`` reading its share of a dataset
on S3 for ``--epochs`` epochs through a cache of its own, under a byte limit.

``python -m bench.data.scale_node CONTENDER --rank R --world W ... --out RESULT.json``

The node talks to the S3 endpoint through its own byte-counting proxy process (``--proxy``,
``--counter``: what it downloaded is counted on the wire, the same way for every loader), polls
its cache directory's size from a thread (peak bytes on disk), and records every batch's sample
ids (the bench reassembles each epoch's global order from all nodes and scores it). Imports only
what its contender needs: peers run under their own interpreter.

``raw`` is the limit: the node's share of the shards (a contiguous quarter), downloaded with 8
threads in order and sliced into batches, no shuffle and no cache.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dir_bytes(path: str) -> int:
    """Bytes of the files in a cache directory, each inode once, without its bookkeeping (``.lock``,
    ``.clients/``: a few KB). Where the directory is one of our shard caches, the walk holds the
    cache's lock, as every reader does to add or evict a shard, so it sees one consistent state,
    not a shard evicted before the walk reached the download that replaced it. (Also the tests'
    measure of a cache, from outside its code.)"""
    import fcntl
    lock = os.path.join(path, ".lock")
    fd = os.open(lock, os.O_RDWR) if os.path.exists(lock) else None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        sizes: dict[int, int] = {}
        for dirpath, dirs, names in os.walk(path):
            dirs[:] = [d for d in dirs if d != ".clients"]
            for name in names:
                if name == ".lock":
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue
                sizes[st.st_ino] = max(sizes.get(st.st_ino, 0), st.st_size)
        return sum(sizes.values())
    finally:
        if fd is not None:
            os.close(fd)


class Poller(threading.Thread):
    def __init__(self, path: str):
        super().__init__(daemon=True)
        self.path, self.peak, self.stopped = path, 0, False

    def run(self):
        while not self.stopped:
            self.peak = max(self.peak, dir_bytes(self.path))
            time.sleep(0.005)


def start_ray() -> None:
    """Ray is running before a job's loaders start: not part of their first-batch latency."""
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})


def ours(a, endpoint: str):
    from actors.data import DataLoader
    dl = DataLoader(a.url, global_batch_size=a.batch * a.world, micro_batch_size=a.batch, rank=a.rank,
                    world_size=a.world, shuffle={"mode": "partitioned", "seed": a.seed, "partitions": a.partitions,
                                                 "block_shards": a.block_shards},
                    storage_options={"endpoint_url": endpoint}, cache_dir=a.cache, cache_limit=a.limit,
                    cache_policy=a.policy)

    def epoch():
        for _ in range(dl.steps_per_epoch):
            yield dl.next_step()[0]
    return epoch, lambda: dl.actor_info()["cache"]


def raw(a, endpoint: str):
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa

    from actors.data import read_manifest
    from actors.data.shards import column_view
    from orchestrator.storage import Storage
    st = Storage(a.url, {"endpoint_url": endpoint})
    m = read_manifest(a.url, {"endpoint_url": endpoint})
    mine = m.shards[a.rank * m.num_shards // a.world:(a.rank + 1) * m.num_shards // a.world]

    def epoch():
        held, rows = [], 0
        with ThreadPoolExecutor(8) as pool:
            for data in pool.map(lambda s: st.read_bytes(s.name), mine):
                t = pa.ipc.open_file(pa.py_buffer(data)).read_all()
                held.append({k: column_view(t.column(k), c["dtype"], c["shape"]) for k, c in m.schema.items()})
                rows += t.num_rows
                while rows >= a.batch:
                    cols = {k: np.concatenate([h[k] for h in held]) for k in held[0]}
                    yield {k: v[:a.batch] for k, v in cols.items()}
                    held, rows = [{k: v[a.batch:] for k, v in cols.items()}], rows - a.batch
    return epoch, lambda: None


def streaming(a, endpoint: str):
    sys.path.insert(0, ROOT)
    from bench.data.contenders import _stub_torchvision
    _stub_torchvision()
    os.environ.update({"S3_ENDPOINT_URL": endpoint, "WORLD_SIZE": str(a.world), "RANK": str(a.rank),
                       "LOCAL_WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    import streaming.base.dataset
    import streaming.base.util
    import torch
    from streaming import StreamingDataset
    # each simulated node runs on its own, one after another; Streaming needs torch.distributed
    # only for barriers between ranks that run together (it guards every one with is_initialized)
    streaming.base.dataset.maybe_init_dist = streaming.base.util.maybe_init_dist = lambda: False
    streaming.base.util.clean_stale_shared_memory()
    ds = StreamingDataset(remote=a.url, local=a.cache, shuffle=True, shuffle_algo="py1e", shuffle_seed=a.seed,
                          shuffle_block_size=a.block_shards * a.rows_per_shard, num_canonical_nodes=a.partitions,
                          batch_size=a.batch, cache_limit=a.limit)
    dl = torch.utils.data.DataLoader(ds, batch_size=a.batch, num_workers=a.workers, drop_last=True,
                                     persistent_workers=False)
    return lambda: iter(dl), lambda: None


def litdata(a, endpoint: str):
    os.environ.update({"WORLD_SIZE": str(a.world), "GLOBAL_RANK": str(a.rank), "NNODES": str(a.world)})
    import litdata as ld
    import litdata.streaming.downloader as lddl
    # LitData fetches chunks through obstore, which refuses a plain-http endpoint (it sets no
    # allow_http); its boto3 path, the one it uses where obstore is missing, reads the loopback one
    lddl._OBSTORE_AVAILABLE = False
    ds = ld.StreamingDataset(a.url, cache_dir=a.cache, shuffle=True, seed=a.seed, drop_last=True,
                             max_cache_size=a.limit, storage_options={"endpoint_url": endpoint})
    dl = ld.StreamingDataLoader(ds, batch_size=a.batch, num_workers=a.workers, drop_last=True)
    return lambda: iter(dl), lambda: None


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("contender", choices=["raw", "ours", "ours-lru", "streaming", "litdata"])
    p.add_argument("--url", required=True)
    p.add_argument("--proxy", required=True, help="URL of this node's counting proxy to the endpoint")
    p.add_argument("--counter", required=True, help="the proxy's byte counter file")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--batch", type=int, required=True, help="per rank")
    p.add_argument("--cache", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--partitions", type=int, required=True)
    p.add_argument("--block-shards", type=int, required=True)
    p.add_argument("--rows-per-shard", type=int, required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="peers: DataLoader worker processes")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    a.policy = "lru" if a.contender == "ours-lru" else "belady"
    sys.path.insert(0, ROOT)
    from bench.data.s3proxy import read_counter
    os.makedirs(a.cache, exist_ok=True)
    poller = Poller(a.cache)
    poller.start()
    if a.contender.startswith("ours"):
        start_ray()
    t0 = time.perf_counter()
    make = {"raw": raw, "ours": ours, "ours-lru": ours, "streaming": streaming, "litdata": litdata}[a.contender]
    next_epoch, cache_stats = make(a, a.proxy)
    epochs = []
    for e in range(a.epochs):
        before, te, ttfb, ids = read_counter(a.counter), time.perf_counter(), None, []
        for b in next_epoch():
            if ttfb is None:
                ttfb = time.perf_counter() - (t0 if e == 0 else te)
                t_first = time.perf_counter()
            i = np.asarray(b["id"]).reshape(-1).astype(np.int64)
            x = b["x"]
            _ = int(x[:, 0].sum()) if hasattr(x, "shape") else sum(v[0] for v in x)
            ids.append(i)
        wall = time.perf_counter() - te
        n = sum(len(i) for i in ids)
        after_first = (n - len(ids[0])) / max(time.perf_counter() - t_first, 1e-9) if ids else 0.0
        epochs.append({"samples": n, "wall_s": wall, "ttfb_s": ttfb, "samples_per_s": n / wall,
                       "samples_per_s_after_first": after_first,
                       "downloaded_bytes": read_counter(a.counter) - before})
        np.save(f"{a.out}.epoch{e}.npy", np.stack(ids) if ids else np.zeros((0, a.batch), np.int64))
        print(f"  {a.contender} node {a.rank}: epoch {e + 1}: {n} samples, {n / wall:,.0f} samples/s, "
              f"{epochs[-1]['downloaded_bytes'] / 2**20:,.1f} MiB downloaded, peak cache "
              f"{poller.peak / 2**20:,.1f} MiB", flush=True)
    poller.stopped = True
    poller.join()
    result = {"contender": a.contender, "rank": a.rank, "epochs": epochs, "peak_cache_bytes": poller.peak,
              "limit": a.limit, "cache": cache_stats(),
              "downloaded_bytes": read_counter(a.counter)}
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
