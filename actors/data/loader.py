"""Loader actors and the trainer-side ``DataLoader`` client.

Each trainer rank owns one ``ShardServer`` actor (``num_cpus=0``, placed on the rank's node when
it can be). The client asks it for the rows of one exact global step slice,
``(order, epoch ranges, rank, world)``; the actor computes the sample ids from the pure order
function, gathers the rows from memory-mapped shards and returns them through the object store.
Requests name everything they need, so a restarted actor (``max_restarts=-1``,
``max_task_retries=-1``) re-serves exactly the same rows: nothing is lost or duplicated.

Prefetch is pull-based: the client keeps at most ``prefetch_batches`` requests in flight, fewer if
that many would exceed ``max_prefetch_mb`` (sizes are exact: fixed-shape columns). The actor never
runs ahead of the client, so the object store holds at most that much of this loader's data.

Transport (``transport=``): ``object_store`` sends every batch's rows from the actor through the Ray
object store (the actor may be on another node). ``mmap``, for an actor on the trainer's own node,
moves no rows between processes: the client computes its sample ids itself (the order is a pure
function, computed 64 steps at a time), asks the actor to download and verify any shard it has not
opened yet into the node cache, maps the same verified files, and ``gather_threads`` background
threads copy each prefetched batch out of them, so the bytes are copied once (page cache to batch)
instead of three times (gather, object store, deserialise). ``auto`` (the default) picks ``mmap``
when the actor landed on the trainer's node and ``object_store`` otherwise. Order, resume, prefetch
bounds and errors are the same in both.

Shards are mapped side by side in one address range (``actors.data.region``), so a column's rows
across all shards form one strided array and a batch is one fancy-indexing copy; while the dataset
fits in half of the node's available memory, each shard's pages are mapped when it opens
(``MAP_POPULATE``) rather than faulted in one row at a time.

Remote shards (S3, ...) are downloaded whole into a node-local cache (content-addressed by
sha256, verified while downloading) and memory-mapped; local shards are memory-mapped in place
after a checksum check recorded once per node.
"""

from __future__ import annotations

import collections
import fcntl
import logging
import mmap
import os
import sys
import tempfile
import threading
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import ray

from actors import warm
from actors.data import plan, region
from actors.data.shards import (Manifest, ShardError, ShardReader, read_manifest, sha256_of_path,
                                sha256_of_stream)
from actors.data.shuffle import EpochOrder
from orchestrator.storage import Storage, StorageError

log = logging.getLogger(__name__)
STATE_VERSION = 1
_IDS_AHEAD, _IDS_AHEAD_ELEMENTS = 64, 1 << 16
TRANSPORTS = ("auto", "object_store", "mmap")
_STATE_KEYS = ("seed", "epoch", "consumed", "mode", "window", "tail", "num_samples",
               "rows_per_shard", "global_batch_size")


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), "reo-shard-cache")


# ---------------------------------------------------------------------------------------------
# the actor
# ---------------------------------------------------------------------------------------------
class BufferPool:
    """Reusable output arrays for gathered batches, handed out again only once nothing holds them.

    A new multi-megabyte array per batch is memory the allocator maps from the OS and unmaps again,
    so every batch paid about 200 page faults and the kernel zeroing its pages: a third of the mmap
    transport's time on a 2-core machine (0.91 M samples/s became 1.42 M with reuse). A pooled array
    counts as free when the only references left are the pool's own: a batch the caller (or any
    view or tensor made from it) still holds is never written over.
    """

    _FREE_REFS = 2  # the pool's list and getrefcount's own argument

    def __init__(self, max_per_shape: int):
        if max_per_shape < 1:
            raise ValueError(f"max_per_shape must be >= 1, got {max_per_shape!r}")
        self.max_per_shape = max_per_shape
        self._bufs: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self.allocated = 0

    def take(self, shape: tuple, dtype) -> np.ndarray:
        """A free array of ``shape`` and ``dtype`` (contents undefined)."""
        key = (tuple(shape), np.dtype(dtype).str)
        with self._lock:
            bufs = self._bufs.setdefault(key, [])
            for i in range(len(bufs)):
                if sys.getrefcount(bufs[i]) == self._FREE_REFS:
                    return bufs[i]
            buf = np.empty(shape, dtype)
            self.allocated += 1
            if len(bufs) < self.max_per_shape:
                bufs.append(buf)
            return buf


class ShardStore:
    """Opens shards on demand (download + verify + memory-map) and gathers rows by sample id."""

    def __init__(self, url: str, storage_options: dict | None, cache_dir: str | None,
                 fetch_threads: int = 8, manifest: Manifest | None = None, prepare=None):
        self.url = url
        self.storage = Storage(url, storage_options)
        self.manifest: Manifest = manifest or read_manifest(url, storage_options)
        self.cache_dir = cache_dir or default_cache_dir()
        self.readers: dict[int, ShardReader] = {}
        # ``prepare(shards)`` runs before shards are opened here: the mmap client has its loader
        # actor download and verify them on the node first
        self._prepare = prepare
        self._lock = threading.Lock()  # one opener at a time: concurrent gathers map a shard once
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads)
        # a global shuffle reads every page of every shard each epoch: map each shard's pages when
        # it opens (MAP_POPULATE: first-epoch gathers 1.7x faster than one page fault per row)
        # unless the dataset would crowd this node's memory
        self._populate = bool(region.POPULATE) and \
            self.manifest.total_bytes <= psutil.virtual_memory().available // 2
        self._region: region.ShardRegion | None = None
        if region.available():
            try:
                self._region = region.ShardRegion([sh.bytes for sh in self.manifest.shards])
            except OSError as e:
                log.warning("shard region unavailable (%s); gathering shard by shard", e)
        self._views: dict[str, tuple[np.ndarray, int]] = {}  # column -> (rows over the region, start)
        self._rowbase = {k: np.full(self.manifest.num_shards, -1, dtype=np.int64) for k in self.manifest.schema}

    # opening ---------------------------------------------------------------------------------
    def _where(self, i: int) -> str:
        return f"{i} ({self.storage.url(self.manifest.shards[i].name)})"

    def _file(self, i: int) -> str:
        """The shard's verified file on this node (downloaded into the cache if remote)."""
        local = self.storage.local_path(self.manifest.shards[i].name)
        return self._verified_local(i, local) if local else self._cached(i)

    def _open(self, i: int) -> ShardReader:
        path = self._file(i)
        buf = self._region.map(i, path, self._populate) if self._region else _map(path, self._populate)
        return ShardReader(buf, self.manifest.shards[i], self.manifest.schema, self._where(i))

    def _index(self, i: int, reader: ShardReader) -> None:
        """Record where shard ``i``'s rows sit in the region, per column, when they line up with
        the column's strided view (same offset modulo the row size as the first shard's)."""
        for k, v in reader.columns.items():
            off = v.ctypes.data - self._region.base
            row_bytes = v.nbytes // max(1, len(v))
            if not (v.flags.c_contiguous and len(v) and 0 <= off < self._region.size):
                continue  # a copied column (bool, nullable): gathered shard by shard
            if k not in self._views:
                self._views[k] = self._region.rows(off, row_bytes)
            start = self._views[k][1]
            if (off - start) % row_bytes == 0:
                self._rowbase[k][i] = (off - start) // row_bytes

    def _verified_local(self, i: int, path: str) -> str:
        info = self.manifest.shards[i]
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardError(f"shard {self._where(i)} is missing") from None
        if st.st_size != info.bytes:
            raise ShardError(f"shard {self._where(i)} is corrupt: {st.st_size} bytes, manifest says {info.bytes}")
        # one full checksum per node per file version (stat key), not per actor or per epoch
        marker = os.path.join(self.cache_dir, "verified",
                              f"{info.sha256}-{st.st_size}-{st.st_mtime_ns}-{st.st_ino}")
        if not os.path.exists(marker):
            got = sha256_of_path(path)
            if got != info.sha256:
                raise ShardError(f"shard {self._where(i)} is corrupt: sha256 {got[:12]}... does not match "
                                 f"the manifest's {info.sha256[:12]}...")
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "wb").close()
        return path

    def _cached(self, i: int) -> str:
        info = self.manifest.shards[i]
        os.makedirs(self.cache_dir, exist_ok=True)
        path = os.path.join(self.cache_dir, f"{info.sha256}.arrow")
        if os.path.exists(path):
            return path
        with open(path + ".lock", "wb") as lock:  # one download per node, whoever gets here first
            fcntl.flock(lock, fcntl.LOCK_EX)
            if os.path.exists(path):
                return path
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with self.storage.open_read(info.name, block_size=8 << 20) as src, open(tmp, "wb") as dst:
                    got = sha256_of_stream(src, dst)
            except (StorageError, FileNotFoundError):
                _remove(tmp)
                raise ShardError(f"shard {self._where(i)} is missing") from None
            except OSError as e:
                _remove(tmp)
                raise ShardError(f"shard {self._where(i)}: download failed ({e})") from None
            if got != info.sha256:
                _remove(tmp)
                raise ShardError(f"shard {self._where(i)} is corrupt: sha256 {got[:12]}... does not match "
                                 f"the manifest's {info.sha256[:12]}...")
            os.replace(tmp, path)
        return path

    def fetch(self, shards) -> None:
        """Download (if remote) and verify these shards on this node without opening them."""
        self._each(self._file, [int(s) for s in shards])

    def ensure(self, shards: np.ndarray) -> None:
        if all(int(s) in self.readers for s in shards):
            return
        with self._lock:
            missing = [int(s) for s in shards if int(s) not in self.readers]
            if not missing:
                return
            if self._prepare is not None:
                self._prepare(missing)
            for i, reader in zip(missing, self._each(self._open, missing)):
                if self._region is not None:
                    self._index(i, reader)
                self.readers[i] = reader

    def _each(self, fn, items: list[int]) -> list:
        """``fn`` over ``items``, on the fetch pool when there is more than one."""
        return list(self._pool.map(fn, items)) if len(items) > 1 else [fn(i) for i in items]

    # gathering -------------------------------------------------------------------------------
    def gather(self, ids: np.ndarray, pool: BufferPool | None = None) -> dict[str, np.ndarray]:
        """The rows of ``ids`` in that order, as ``{column: array[len(ids), *shape]}``; into
        arrays from ``pool`` where given (columns read through the shard region)."""
        rps = self.manifest.rows_per_shard
        shard = ids // rps
        self.ensure(np.unique(shard))
        row = ids - shard * rps
        out, rest = {}, []
        for k, c in self.manifest.schema.items():
            base = self._rowbase[k][shard]
            good = base >= 0
            if k not in self._views or not good.any():
                rest.append(k)
                continue
            # one copy straight from the region; rows of shards laid out off the column's stride
            # (typically the short last shard) are read from a placeholder row, then patched
            idx = base + row
            bad = np.flatnonzero(~good)
            if len(bad):
                idx[bad] = idx[np.argmax(good)]
            view = self._views[k][0]
            if pool is None:
                rows = view[idx]
            else:  # mode="clip": no bounds-check copy of ``out`` (the ids are in range)
                rows = np.take(view, idx, axis=0, out=pool.take((len(idx), *view.shape[1:]), view.dtype),
                               mode="clip")
            out[k] = rows.view(c["dtype"]).reshape(len(ids), *c["shape"])
            if len(bad):
                out[k][bad] = self._gather_by_shard(ids[bad], shard[bad], [k])[k]
        if rest:
            out.update(self._gather_by_shard(ids, shard, rest))
        return out

    def _gather_by_shard(self, ids: np.ndarray, shard: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
        rps = self.manifest.rows_per_shard
        order = np.argsort(shard, kind="stable")
        sorted_shard = shard[order]
        cuts = np.flatnonzero(np.diff(sorted_shard)) + 1
        bounds = np.concatenate([[0], cuts, [len(ids)]])
        uniq = sorted_shard[bounds[:-1]] if len(ids) else np.zeros(0, np.int64)
        schema = self.manifest.schema
        out = {k: np.empty((len(ids), *schema[k]["shape"]), dtype=schema[k]["dtype"]) for k in columns}
        for s, a, b in zip(uniq, bounds[:-1], bounds[1:]):
            dst = order[a:b]
            rows = ids[dst] - int(s) * rps
            cols = self.readers[int(s)].columns
            for k, o in out.items():
                o[dst] = cols[k][rows]
        return out


def _map(path: str, populate: bool) -> pa.Buffer:
    """A read-only shared mapping of ``path`` (where shard regions are unavailable)."""
    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | (region.POPULATE if populate else 0)
        return pa.py_buffer(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ))


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


PRELOAD_HOOK = "actors.data.loader.preload"


def preload() -> None:
    """Ray worker setup hook of loader actor processes: what a loader actor imports, done before
    it waits as a warm spare (:mod:`actors.warm`). Its own hook also replaces the one a loader
    started by a trainer worker would inherit (the trainer's: torch, DeepSpeed)."""
    # importing this module (to find the hook) loaded numpy, pyarrow, Ray and the shard store;
    # what is left is fsspec's local filesystem, which every store opens
    import fsspec
    fsspec.filesystem("file")


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, runtime_env=warm.setup_hook_env(PRELOAD_HOOK))
class ShardServer:
    """Serves exact slices of the order. Stateless between calls apart from open shards."""

    def __init__(self, url: str, storage_options: dict | None, cache_dir: str | None):
        self.store = ShardStore(url, storage_options, cache_dir)
        self._orders: dict[tuple, EpochOrder] = {}
        self._buffers = BufferPool(8)

    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "runtime_env": ctx.get_runtime_env_string(),
                "open_shards": len(self.store.readers), "peak_rss_kb": _peak_rss_kb()}

    def batch(self, order: tuple, segments: list[tuple[int, int, int]]) -> dict[str, np.ndarray]:
        """Rows at the given ``(epoch, start, end)`` position ranges of ``EpochOrder(*order)``."""
        o = self._orders.get(order)
        if o is None:
            o = self._orders[order] = EpochOrder(*order)
        # arrays from the pool: Ray copies the return value into the object store, then lets go
        return self.store.gather(plan.segment_ids(o, segments), self._buffers)

    def prepare(self, shards: list[int]) -> None:
        """Download (if remote) and verify these shards into this node's cache; the client then
        maps the same files itself (mmap transport)."""
        self.store.fetch(shards)

    def gather(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        return self.store.gather(np.asarray(ids, dtype=np.int64))


def _peak_rss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------
def _shuffle_config(shuffle) -> Any:
    from orchestrator.spec import Shuffle
    if shuffle is None:
        return Shuffle()
    if isinstance(shuffle, Shuffle):
        return shuffle
    if isinstance(shuffle, dict):
        from pydantic import ValidationError
        try:
            return Shuffle(**shuffle)
        except ValidationError as e:
            raise ValueError("; ".join(f"shuffle.{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                       for err in e.errors())) from None
    raise ValueError(f"shuffle must be an orchestrator.spec.Shuffle, a dict or None, got {type(shuffle).__name__}")


class DataLoader:
    """This rank's view of the global stream: ``next_step()`` returns its micro-batches.

    Global step ``s`` covers positions ``[s*G, (s+1)*G)`` of the stream; rank ``r`` of ``W`` gets
    positions ``r*G/W ... (r+1)*G/W - 1`` of it as ``accumulation`` micro-batches of
    ``micro_batch_size`` rows. ``state_dict()`` is a small JSON-able record; loading it on any
    world size continues the same stream, so every sample of an epoch is visited exactly once.

    ``warm_spares``: after the first step, ask the loader actor's node to keep that many idle,
    preloaded processes (:mod:`actors.warm`), so the loader actor of a restarted trainer starts in
    one instead of a new process.

    Raises ValueError naming the argument when the batch geometry or the state is invalid, and
    ShardError (naming the shard) when a shard is missing or corrupt.
    """

    def __init__(self, url: str, *, global_batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, shuffle=None, storage_options: dict | None = None,
                 prefetch_batches: int = 4, max_prefetch_mb: int = 256, cache_dir: str | None = None,
                 name: str | None = None, state: dict | None = None, transport: str = "auto",
                 gather_threads: int = 2, warm_spares: int = 0, warm_spare_keep_alive_s: float = 600.0):
        cfg = _shuffle_config(shuffle)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if not isinstance(prefetch_batches, int) or prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be an integer >= 1, got {prefetch_batches!r}")
        if not isinstance(max_prefetch_mb, (int, float)) or max_prefetch_mb <= 0:
            raise ValueError(f"max_prefetch_mb must be > 0, got {max_prefetch_mb!r}")
        if not isinstance(gather_threads, int) or gather_threads < 1:
            raise ValueError(f"gather_threads must be an integer >= 1, got {gather_threads!r}")
        self.url = url
        self.manifest = read_manifest(url, storage_options)
        self.num_samples = self.manifest.num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.tail = cfg.tail
        self.accumulation = plan.check_batch(global_batch_size, micro_batch_size, world_size, rank,
                                             self.num_samples, self.tail)
        self.order = EpochOrder(self.num_samples, cfg.seed, cfg.mode, cfg.window, self.manifest.rows_per_shard)
        self.bytes_per_request = (global_batch_size // world_size) * self.manifest.row_bytes
        self.max_inflight = max(1, min(prefetch_batches, int(max_prefetch_mb * 2**20) // self.bytes_per_request))
        self._cursor = plan.Cursor()
        self._inflight: collections.deque = collections.deque()
        self._next_request = self._cursor
        self._stats = {"requests": 0, "steps": 0, "peak_inflight": 0, "peak_inflight_bytes": 0,
                       "measured_request_bytes": 0}
        if state is not None:
            self.load_state_dict(state)
        self._actor = self._make_actor(storage_options, cache_dir, name)
        # the actor's process starts in the background; the first request settles the transport,
        # so a trainer builds its engine meanwhile (a restart does not wait for it twice)
        self._want_transport = transport
        self._transport: str | None = None
        self._open_args = (url, storage_options, cache_dir, gather_threads)
        self._local: ShardStore | None = None
        self._gather_pool: ThreadPoolExecutor | None = None
        self._buffers: BufferPool | None = None
        self._ids: dict[tuple, np.ndarray] = {}  # mmap: sample ids of upcoming requests
        self._ids_lock = threading.Lock()
        # after the first step: idle, preloaded processes for the next loader actor on its node
        self._spares = warm.WarmSpares(warm_spares, warm_spare_keep_alive_s, "loader actors")

    @property
    def transport(self) -> str:
        """``mmap`` or ``object_store`` (``auto`` resolved: waits for the loader actor once)."""
        if self._transport is None:
            self._transport = self._resolve_transport(self._want_transport)
            if self._transport == "mmap":
                url, storage_options, cache_dir, gather_threads = self._open_args
                self._local = ShardStore(url, storage_options, cache_dir, fetch_threads=4,
                                         manifest=self.manifest, prepare=self._fetch_on_node)
                # batches in flight, the one the caller trains on, the one before it, and the
                # gather threads' next: reused without page faults once the caller lets go
                self._buffers = BufferPool(self.max_inflight + gather_threads + 2)
                self._gather_pool = ThreadPoolExecutor(max_workers=gather_threads,
                                                       thread_name_prefix="reo-data-gather")
        return self._transport

    def _resolve_transport(self, transport: str) -> str:
        if transport != "auto":
            return transport
        here = ray.get_runtime_context().get_node_id()
        return "mmap" if ray.get(self._actor.info.remote())["node_id"] == here else "object_store"

    def _make_actor(self, storage_options, cache_dir, name):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        opts: dict[str, Any] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True)}
        if name:
            opts.update(name=f"reo-data:{name}:rank{self.rank}", get_if_exists=True)
        return ShardServer.options(**opts).remote(self.url, storage_options, cache_dir)

    # properties ------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch (with tail='carry', steps starting in an epoch: this or one more)."""
        return self.num_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return plan.normalise(self._cursor, self.num_samples, self.global_batch_size, self.tail).epoch

    def _order_key(self) -> tuple:
        o = self.order
        return (o.num_samples, o.seed, o.mode, o.window, o.rows_per_shard)

    # iteration -------------------------------------------------------------------------------
    def _fill(self) -> None:
        n, g = self.num_samples, self.global_batch_size
        while len(self._inflight) < self.max_inflight:
            c = self._next_request
            if self.transport == "mmap":
                ref = self._gather_pool.submit(self._gather_here, self.order, c)
            else:
                segs = plan.rank_segments(c, n, g, self.tail, self.rank, self.world_size)
                ref = self._actor.batch.remote(self._order_key(), segs)
            self._inflight.append((c, ref))
            self._next_request = plan.advance(c, n, g, self.tail)
            self._stats["requests"] += 1
        k = len(self._inflight)
        self._stats["peak_inflight"] = max(self._stats["peak_inflight"], k)
        self._stats["peak_inflight_bytes"] = max(self._stats["peak_inflight_bytes"], k * self.bytes_per_request)

    def next_step(self) -> list[dict[str, "torch.Tensor"]]:  # noqa: F821
        """This rank's ``accumulation`` micro-batches of the next global step; advances the cursor."""
        import torch
        self._fill()
        c, ref = self._inflight.popleft()
        rows = ref.result() if self.transport == "mmap" else ray.get(ref)
        self._cursor = plan.advance(c, self.num_samples, self.global_batch_size, self.tail)
        self._fill()  # keep the pipe full while the caller trains on this step
        self._stats["steps"] += 1
        if self._stats["steps"] == 1 and self._spares.count:
            info = self.actor_info()
            self._spares.request(info["runtime_env"], info["node_id"])
        self._spares.renew_if_due()
        self._stats["measured_request_bytes"] = sum(a.nbytes for a in rows.values())
        m = self.micro_batch_size
        with warnings.catch_warnings():  # object-store arrays are flagged read-only; they are ours alone
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
        return [{k: t[i * m:(i + 1) * m] for k, t in tensors.items()} for i in range(self.accumulation)]

    def _ids_of(self, order: EpochOrder, c: plan.Cursor) -> np.ndarray:
        """This rank's sample ids of the step at ``c``. The order is a pure function, so they are
        computed here, ``_IDS_AHEAD`` steps at a time in one vectorised pass (a 1024-sample step
        alone costs 0.7 ms of numpy call overhead, 0.1 ms as one of 64)."""
        with self._ids_lock:
            ids = self._ids.pop((order, c), None)
            if ids is not None:
                return ids
            n, g, per_rank = self.num_samples, self.global_batch_size, self.global_batch_size // self.world_size
            cursors, segs = [], []
            for _ in range(max(1, min(_IDS_AHEAD, _IDS_AHEAD_ELEMENTS // per_rank))):
                cursors.append(c)
                segs += plan.rank_segments(c, n, g, self.tail, self.rank, self.world_size)
                c = plan.advance(c, n, g, self.tail)
            block = plan.segment_ids(order, segs).reshape(len(cursors), per_rank)
            if len(self._ids) > 4 * _IDS_AHEAD:  # requests dropped by a load_state_dict
                self._ids.clear()
            self._ids.update(((order, k), b) for k, b in zip(cursors[1:], block[1:]))
            return block[0]

    def _gather_here(self, order: EpochOrder, c: plan.Cursor) -> dict[str, np.ndarray]:
        return self._local.gather(self._ids_of(order, c), self._buffers)

    def _fetch_on_node(self, shards: list[int]) -> None:
        """The actor downloads and verifies these shards on this node; then they are mapped here."""
        ray.get(self._actor.prepare.remote(shards))

    def __iter__(self):
        while True:
            yield self.next_step()

    def actor_info(self) -> dict[str, Any]:
        """The loader actor's pid, node id, runtime env and open shards (waits for it to start)."""
        return ray.get(self._actor.info.remote())

    def prefetch_stats(self) -> dict[str, int]:
        """Requests issued, steps consumed, and the peak in-flight count and bytes (exact sizes)."""
        return dict(self._stats, max_inflight=self.max_inflight, bytes_per_request=self.bytes_per_request,
                    transport=self.transport)

    # state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The cursor at the step boundary after the last ``next_step()``: O(1), JSON-able."""
        c = plan.normalise(self._cursor, self.num_samples, self.global_batch_size, self.tail)
        o = self.order
        return {"version": STATE_VERSION, "seed": o.seed, "epoch": c.epoch, "consumed": c.consumed,
                "mode": o.mode, "window": o.window, "tail": self.tail, "num_samples": o.num_samples,
                "rows_per_shard": o.rows_per_shard, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved cursor with this loader's rank and world size.

        The saved order (seed, mode, window, tail) wins over this loader's shuffle config, so the
        stream continues unchanged. Raises ValueError naming the bad field.
        """
        if not isinstance(d, dict):
            raise ValueError(f"state must be a dict from DataLoader.state_dict(), got {type(d).__name__}")
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise ValueError(f"state is missing field(s) {missing}")
        if d["num_samples"] != self.num_samples or d["rows_per_shard"] != self.manifest.rows_per_shard:
            raise ValueError(
                f"state.num_samples/rows_per_shard ({d['num_samples']}/{d['rows_per_shard']}) do not match "
                f"the dataset at {self.url} ({self.num_samples}/{self.manifest.rows_per_shard})")
        for k in ("epoch", "consumed"):
            if not isinstance(d[k], int) or d[k] < 0:
                raise ValueError(f"state.{k} must be a non-negative integer, got {d[k]!r}")
        if d["tail"] not in plan.TAILS:
            raise ValueError(f"state.tail must be one of {plan.TAILS}, got {d['tail']!r}")
        self.order = EpochOrder(self.num_samples, int(d["seed"]), d["mode"], int(d["window"]),
                                self.manifest.rows_per_shard)
        self.tail = d["tail"]
        plan.check_batch(self.global_batch_size, self.micro_batch_size, self.world_size, self.rank,
                         self.num_samples, self.tail)
        self._cursor = plan.normalise(plan.Cursor(d["epoch"], d["consumed"]), self.num_samples,
                                      self.global_batch_size, self.tail)
        self._inflight.clear()  # requests for the old position: dropped, their objects freed
        self._next_request = self._cursor

    def actor(self):
        """The loader actor handle (for tests and diagnostics)."""
        return self._actor

    def close(self) -> None:
        for _, ref in self._inflight:
            if isinstance(ref, ray.ObjectRef):
                ray.cancel(ref)
            else:
                ref.cancel()
        self._inflight.clear()
        if getattr(self, "_gather_pool", None) is not None:
            self._gather_pool.shutdown(wait=True, cancel_futures=True)
            self._gather_pool = None
        if self._actor is not None:
            ray.kill(self._actor, no_restart=True)
            self._actor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def global_step_sample_ids(num_samples: int, seed: int | None, epoch_or_state: int | dict = 0, *,
                           global_batch_size: int | None = None, consumed: int = 0, step: int = 0,
                           mode: str = "global", tail: str = "drop", window: int = 4096,
                           rows_per_shard: int = 1) -> np.ndarray:
    """The ``global_batch_size`` sample ids of one global step, in stream order (world-size free).

    ``epoch_or_state`` is an epoch (the step is ``step`` steps after ``consumed`` in it) or a
    ``DataLoader.state_dict()`` (the step is ``step`` steps after that cursor; its order fields and
    global batch size are used, and ``seed`` may be None). ``rows_per_shard`` matters only for
    mode='local'.
    """
    if isinstance(epoch_or_state, dict):
        st = epoch_or_state
        if seed is not None and seed != st["seed"]:
            raise ValueError(f"seed ({seed}) differs from state.seed ({st['seed']})")
        if st["num_samples"] != num_samples:
            raise ValueError(f"num_samples ({num_samples}) differs from state.num_samples ({st['num_samples']})")
        seed, mode, tail, window, rows_per_shard = st["seed"], st["mode"], st["tail"], st["window"], st["rows_per_shard"]
        global_batch_size = global_batch_size or st["global_batch_size"]
        cursor = plan.Cursor(st["epoch"], st["consumed"])
    else:
        cursor = plan.Cursor(int(epoch_or_state), consumed)
    if not global_batch_size:
        raise ValueError("global_batch_size is required (or pass a state dict that has it)")
    if tail not in plan.TAILS:
        raise ValueError(f"tail must be one of {plan.TAILS}, got {tail!r}")
    order = EpochOrder(num_samples, seed or 0, mode, window, rows_per_shard)
    c = plan.advance(cursor, num_samples, global_batch_size, tail, step) if step else cursor
    return plan.segment_ids(order, plan.step_segments(c, num_samples, global_batch_size, tail))
