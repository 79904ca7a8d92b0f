"""One contender per process: ``python -m bench.data.contenders NAME --workdir W ... --out R.json``.

Each contender is a function returning the batches (dicts with ``id`` and ``x``) of its next
epoch; the runner reads ``--epochs`` epochs, times the first batch, the first epoch and the
later ones (steady state: no start-up of the loader or of Ray still running alongside), samples
the process tree's memory (PSS, Ray workers included) and scores the order of the first epoch's
ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np


# ---------------------------------------------------------------------------------------------
# contenders: each returns an iterable of batches
# ---------------------------------------------------------------------------------------------
def _raw(url: str, storage_options, batch: int):
    """The limit: read each shard sequentially with pyarrow (a full copy into memory), slice."""
    from actors.data import read_manifest
    from orchestrator.storage import Storage
    m = read_manifest(url, storage_options)
    st = Storage(url, storage_options)
    return lambda: _raw_batches(m, st, batch)


def _raw_batches(m, st, batch: int):
    import pyarrow as pa
    import torch

    from actors.data.shards import column_view
    for s in m.shards:
        local = st.local_path(s.name)
        table = pa.ipc.open_file(pa.OSFile(local) if local else pa.py_buffer(st.read_bytes(s.name))).read_all()
        cols = {k: column_view(table.column(k), c["dtype"], c["shape"]) for k, c in m.schema.items()}
        for lo in range(0, s.rows, batch):
            yield {k: torch.from_numpy(v[lo:lo + batch]) for k, v in cols.items()}


_CLEANUP: list = []  # run when the contender is done


def _reference_take(url: str, batch: int, threads: int, seed: int):
    """The reference for a global shuffle: every column copied into anonymous memory first, then
    each epoch's random permutation gathered ``batch`` rows at a time with ``numpy.take`` into
    reused buffers, on ``threads`` threads (in order, ``2 x threads`` batches ahead). No loader, no
    page-cache mappings: what a gather of the same rows costs at best on this machine."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import torch

    from actors.data import read_manifest
    from actors.data.shards import column_view
    m = read_manifest(url, None)
    cols: dict[str, list] = {k: [] for k in m.schema}
    for s in m.shards:
        table = pa.ipc.open_file(pa.memory_map(os.path.join(url, s.name))).read_all()
        for k, c in m.schema.items():
            cols[k].append(np.array(column_view(table.column(k), c["dtype"], c["shape"])))
    data = {k: np.concatenate(v) for k, v in cols.items()}
    del cols
    n = len(next(iter(data.values())))
    depth = 2 * threads
    ring = [{k: np.empty((batch, *v.shape[1:]), v.dtype) for k, v in data.items()} for _ in range(depth + 2)]
    pool = ThreadPoolExecutor(max_workers=threads) if threads > 1 else None
    epoch = [0]

    def take(slot: int, idx: np.ndarray) -> dict:
        out = ring[slot]
        for k, v in data.items():
            np.take(v, idx, axis=0, out=out[k], mode="clip")
        return out

    def batches():
        perm = np.random.default_rng([seed, epoch[0]]).permutation(n)
        epoch[0] += 1
        steps = [perm[i * batch:(i + 1) * batch] for i in range(n // batch)]
        if pool is None:
            for i, idx in enumerate(steps):
                yield {k: torch.from_numpy(v) for k, v in take(i % len(ring), idx).items()}
            return
        futs = [pool.submit(take, i % len(ring), steps[i]) for i in range(min(depth, len(steps)))]
        for i in range(len(steps)):
            out = futs[i].result()
            if i + depth < len(steps):
                futs.append(pool.submit(take, (i + depth) % len(ring), steps[i + depth]))
            yield {k: torch.from_numpy(v) for k, v in out.items()}
    return batches


def _ours(url: str, storage_options, batch: int, mode: str, workdir: str, seed: int, transport: str = "auto",
          nodes: int = 1):
    """``nodes=2``: a two-node local cluster (``ray.cluster_utils.Cluster``, one CPU each), the
    loader actor on the second node, this process (the trainer) on the head: every batch crosses
    between the two nodes' object stores."""
    import ray

    from actors.data import DataLoader
    env = {"env_vars": {"PYTHONPATH": os.getcwd()}}
    node = None
    if nodes == 1:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env=env)
    else:
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        node = cluster.add_node(num_cpus=1).node_id
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, runtime_env=env)
        # shutting the cluster down also forgets its address, so a later ray.init starts its own
        _CLEANUP.extend([cluster.shutdown, ray.shutdown])
    cache = os.path.join(workdir, "cache", str(os.getpid()))
    dl = DataLoader(url, global_batch_size=batch, micro_batch_size=batch, rank=0, world_size=1,
                    shuffle={"mode": mode, "seed": seed, "window": 16384}, storage_options=storage_options,
                    cache_dir=cache, prefetch_batches=8, max_prefetch_mb=256, transport=transport,
                    actor_node=node)
    print(f"  transport: {dl.transport}", flush=True)
    return lambda: (dl.next_step()[0] for _ in range(dl.steps_per_epoch))


def _ray_data(path: str, batch: int, mode: str, seed: int):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    if mode == "global":
        ds = ray.data.read_parquet(path).random_shuffle(seed=seed)
        return lambda: ds.iter_torch_batches(batch_size=batch, drop_last=True)
    ds = ray.data.read_parquet(path, shuffle="files")
    return lambda: ds.iter_torch_batches(batch_size=batch, drop_last=True, local_shuffle_buffer_size=16384,
                                         local_shuffle_seed=seed)


def _mosaic(path: str, batch: int, workers: int, seed: int):
    _stub_torchvision()
    import torch
    from streaming import StreamingDataset
    ds = StreamingDataset(local=path, shuffle=True, shuffle_seed=seed, batch_size=batch)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    return lambda: iter(dl)  # each pass is the dataset's next epoch


def _litdata(path: str, batch: int, workers: int, seed: int, workdir: str):
    import litdata
    ds = litdata.StreamingDataset(path, shuffle=True, seed=seed, drop_last=True,
                                  cache_dir=os.path.join(workdir, "cache", str(os.getpid())))
    dl = litdata.StreamingDataLoader(ds, batch_size=batch, num_workers=workers, drop_last=True)
    return lambda: iter(dl)


def _stub_torchvision():
    """streaming imports torchvision at import time for its vision datasets (unused here); no CPU
    torchvision wheel matches torch 2.13, so give it an empty stand-in when the real one fails."""
    try:
        import torchvision  # noqa: F401
        return
    except Exception:  # noqa: BLE001 - missing or ABI-mismatched
        pass
    import importlib.machinery
    import types
    for name in ("torchvision", "torchvision.datasets", "torchvision.transforms",
                 "torchvision.transforms.functional"):
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = mod
    sys.modules["torchvision.datasets"].VisionDataset = object
    sys.modules["torchvision.datasets"].CIFAR10 = object
    sys.modules["torchvision.transforms.functional"].to_tensor = None


# ---------------------------------------------------------------------------------------------
# measuring
# ---------------------------------------------------------------------------------------------
class PeakMemory:
    """Peak PSS (proportional set size) of this process and all its descendants, sampled."""

    def __init__(self, interval: float = 1.0):
        import psutil
        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:  # noqa: BLE001 - process exited between listing and reading
                pass
        return total

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self.peak = max(self.peak, self._sample())
        self._stop.set()
        self._t.join()


def measure(next_epoch, rows_per_shard: int, batch: int, epochs: int = 1) -> dict:
    """Read ``epochs`` epochs from ``next_epoch()``; score the first epoch's order."""
    from actors.data import score_order
    ids, touched = [], 0
    ttfb = None
    later_n, later_wall = 0, 0.0
    with PeakMemory(interval=0.25) as mem:
        t0 = time.perf_counter()
        for e in range(epochs):
            te, n = time.perf_counter(), 0
            for b in next_epoch():
                if ttfb is None:
                    ttfb = time.perf_counter() - t0
                i = np.array(b["id"]).reshape(-1)  # a copy: a view would pin the loader's whole buffer
                n += len(i)
                if e == 0:
                    ids.append(i)
                x = b["x"]
                touched += int(x[:, 0].sum()) if hasattr(x, "shape") else sum(v[0] for v in x)
            if e == 0:
                wall = time.perf_counter() - t0
            else:
                later_n, later_wall = later_n + n, later_wall + time.perf_counter() - te
    first = len(ids[0]) if ids else 0
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    out = {"samples": int(len(ids)), "wall_s": wall, "ttfb_s": ttfb, "epoch_samples_per_s": len(ids) / wall,
           "samples_per_s": (len(ids) - first) / max(wall - ttfb, 1e-9),
           "epochs": epochs, "later_epochs_samples_per_s": later_n / later_wall if later_wall else None,
           "peak_pss_mb": mem.peak / 2**20, "unique": int(len(np.unique(ids)))}
    try:
        order = ids
        n = len(order)
        if n and (np.sort(order) != np.arange(n)).any():  # a dropped tail: rank the ids it did visit
            order = np.searchsorted(np.sort(order), order)
        out.update(score_order(order, rows_per_shard=rows_per_shard, global_batch_size=batch))
    except ValueError as e:
        out["quality_error"] = str(e)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--workdir", required=True)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--rows-per-shard", type=int, default=8192)
    p.add_argument("--s3-url")
    p.add_argument("--endpoint-url")
    p.add_argument("--peer-workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    w = a.workdir
    s3_opts = {"endpoint_url": a.endpoint_url} if a.endpoint_url else None
    makers = {
        "raw-local": lambda: _raw(os.path.join(w, "ours"), None, a.batch),
        "raw-s3": lambda: _raw(a.s3_url, s3_opts, a.batch),
        "take1-local": lambda: _reference_take(os.path.join(w, "ours"), a.batch, 1, a.seed),
        "take2-local": lambda: _reference_take(os.path.join(w, "ours"), a.batch, 2, a.seed),
        "ours-global-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "global", w, a.seed),
        "ours-global-objstore-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "global", w, a.seed,
                                                    transport="object_store"),
        "ours-global-objstore-2node-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "global", w,
                                                          a.seed, transport="object_store", nodes=2),
        "ours-global-stream-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "global", w, a.seed,
                                                  transport="stream"),
        "ours-global-stream-2node-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "global", w,
                                                        a.seed, nodes=2),  # auto: the stream across nodes
        "ours-global-s3": lambda: _ours(a.s3_url, s3_opts, a.batch, "global", w, a.seed),
        "ours-local-local": lambda: _ours(os.path.join(w, "ours"), None, a.batch, "local", w, a.seed),
        "ray-data-global-local": lambda: _ray_data(os.path.join(w, "parquet"), a.batch, "global", a.seed),
        "ray-data-local-local": lambda: _ray_data(os.path.join(w, "parquet"), a.batch, "local", a.seed),
        "mosaic-local": lambda: _mosaic(os.path.join(w, "mds"), a.batch, a.peer_workers, a.seed),
        "litdata-local": lambda: _litdata(os.path.join(w, "litdata"), a.batch, a.peer_workers, a.seed, w),
    }
    if a.name not in makers:
        print(f"unknown contender {a.name!r}; one of {sorted(makers)}", file=sys.stderr)
        return 2
    try:
        result = {"name": a.name, **measure(makers[a.name](), a.rows_per_shard, a.batch, a.epochs)}
    finally:
        for fn in reversed(_CLEANUP):
            fn()
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
