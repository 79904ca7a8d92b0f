"""The shard store: shards of one dataset opened on demand, memory-mapped, and gathered by id.

Local shards are mapped in place after a checksum check recorded once per node per file
version. Remote shards (S3, ...) are downloaded whole, verified while downloading, into the
node's bounded cache (:mod:`actors.data.cache`) and mapped from there; ``release`` unmaps the
ones a reader is done with, so the cache may evict them.

Shards are mapped side by side in one address range (:mod:`actors.data.region`), so a column's
rows across all shards form one strided array and a batch is one fancy-indexing copy; while the
dataset fits in half of the node's available memory, each shard's pages are mapped when it opens
(``MAP_POPULATE``) rather than faulted in one row at a time.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np
import psutil
import pyarrow as pa

from actors.data import region
from actors.data.cache import NodeCache, default_cache_dir, default_limit, expand_cache_dir
from actors.data.shards import (Manifest, ShardError, ShardReader, read_manifest, sha256_of_path,
                                sha256_of_stream)
from orchestrator.storage import Storage, StorageError

log = logging.getLogger(__name__)


class BufferPool:
    """Reusable output arrays for gathered batches, handed out again only once nothing holds them.

    A new multi-megabyte array per batch is memory the allocator maps from the OS and unmaps again
    (page faults and zeroing on every batch). A pooled array counts as free when the only
    references left are the pool's own: a batch the caller (or any view or tensor made from it)
    still holds is never written over.
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


def where(storage: Storage, manifest: Manifest, i: int) -> str:
    """How errors name shard ``i``: its index and URL."""
    return f"{i} ({storage.url(manifest.shards[i].name)})"


def download(storage: Storage, manifest: Manifest, i: int, dst) -> None:
    """Copy shard ``i`` into the binary file ``dst`` while checking its sha256 (ShardError if not)."""
    info = manifest.shards[i]
    try:
        with storage.open_read(info.name, block_size=8 << 20, size=info.bytes) as src:
            got = sha256_of_stream(src, dst)
    except (StorageError, FileNotFoundError):
        raise ShardError(f"shard {where(storage, manifest, i)} is missing") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the cache names the disk
            raise
        raise ShardError(f"shard {where(storage, manifest, i)}: download failed ({e})") from None
    if got != info.sha256:
        raise ShardError(f"shard {where(storage, manifest, i)} is corrupt: sha256 {got[:12]}... does not "
                         f"match the manifest's {info.sha256[:12]}...")


def verify_all(url: str, storage_options: dict | None, threads: int = 8) -> Manifest:
    """Read every shard once and check its sha256 against the manifest, keeping nothing on disk.
    Raises ShardError naming the first bad shard (the read pool is shut down first)."""
    m = read_manifest(url, storage_options)
    st = Storage(url, storage_options)

    class _Null:
        def write(self, b):
            return len(b)

    pool = ThreadPoolExecutor(max_workers=threads)
    try:
        for f in [pool.submit(download, st, m, i, _Null()) for i in range(m.num_shards)]:
            f.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return m


class ShardStore:
    """Opens shards on demand (verify or download, then map) and gathers rows by sample id.

    Remote shards go through this node's :class:`NodeCache` in ``cache_dir`` (``cache_limit``
    bytes): the store pins what it maps and unpins what it lets go. ``download(i, tmp_path)``
    writes a verified shard where the cache asks for it; by default this process downloads it,
    while a loader client has its loader actor (on the same node) do the work.
    """

    def __init__(self, url: str, storage_options: dict | None, cache_dir: str | None = None,
                 fetch_threads: int = 8, manifest: Manifest | None = None,
                 cache_limit: int | None = None, cache_policy: str = "belady",
                 download: Callable[[int, str], None] | None = None):
        self.url = url
        self.storage = Storage(url, storage_options)
        self.manifest: Manifest = manifest or read_manifest(url, storage_options)
        self.cache_dir = expand_cache_dir(cache_dir or default_cache_dir())
        self.remote = self.storage.local_path() is None
        self.cache: NodeCache | None = None
        if self.remote:
            self.cache = NodeCache(self.cache_dir, cache_limit or default_limit(self.cache_dir), cache_policy)
        self._download = download or self.download_into
        self.readers: dict[int, ShardReader] = {}
        self._lock = threading.Lock()  # guards readers, _opening and the region's index
        self._opening: dict[int, _Opening] = {}
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads)
        self._unpinner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reo-data-unpin")
        # a global shuffle reads every page of every shard each epoch: map each shard's pages when
        # it opens (MAP_POPULATE) unless the dataset would crowd this node's memory
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
        self._plain: dict[int, pa.Buffer] = {}  # mappings outside the region (no region support)
        self.checks = {"verified": 0, "failed": 0}  # shard checksums this process computed
        self._metrics = _DataMetrics(self)

    # fetching (the cache's side) -----------------------------------------------------------------
    def download_into(self, i: int, tmp: str) -> None:
        """Download shard ``i`` to the file ``tmp``, verifying it (ShardError if bad)."""
        try:
            with open(tmp, "wb") as dst:
                download(self.storage, self.manifest, i, dst)
        except ShardError:
            self.checks["failed"] += 1
            raise
        self.checks["verified"] += 1
        self._metrics.publish()

    def fetch(self, shards: list[int], pin: bool = True, prefetch: bool = False, evict: bool = True,
              pool: ThreadPoolExecutor | None = None) -> list[str | None]:
        """Cached, verified files of these remote shards (downloaded as needed, in parallel on
        ``pool``, default the store's); ``prefetch``: None for those the cache has no room for.
        ``pin``: kept from eviction until :meth:`unpin`."""
        m = self.manifest

        def one(i: int):
            info = m.shards[i]
            return self.cache.get(info.sha256, info.bytes, lambda tmp: self._download(i, tmp), pin=pin,
                                  prefetch=prefetch, evict=evict)
        return self._each(one, [int(s) for s in shards], pool)

    def unpin(self, shards: list[int]) -> None:
        self.cache.release([self.manifest.shards[i].sha256 for i in shards])

    # opening ---------------------------------------------------------------------------------
    def _verified_local(self, i: int) -> str:
        info = self.manifest.shards[i]
        path = self.storage.local_path(info.name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise ShardError(f"shard {where(self.storage, self.manifest, i)} is missing") from None
        if st.st_size != info.bytes:
            raise ShardError(f"shard {where(self.storage, self.manifest, i)} is corrupt: {st.st_size} bytes, "
                             f"manifest says {info.bytes}")
        # one full checksum per node per file version (stat key), not per actor or per epoch
        marker = os.path.join(self.cache_dir, "verified",
                              f"{info.sha256}-{st.st_size}-{st.st_mtime_ns}-{st.st_ino}")
        if not os.path.exists(marker):
            got = sha256_of_path(path)
            self.checks["verified" if got == info.sha256 else "failed"] += 1
            if got != info.sha256:
                raise ShardError(f"shard {where(self.storage, self.manifest, i)} is corrupt: sha256 "
                                 f"{got[:12]}... does not match the manifest's {info.sha256[:12]}...")
            os.makedirs(os.path.dirname(marker), exist_ok=True)
            open(marker, "wb").close()
        return path

    def _open(self, i: int, path: str) -> ShardReader:
        if self._region is not None:
            buf = self._region.map(i, path, self._populate)
        else:
            buf = self._plain[i] = _map(path, self._populate)
        return ShardReader(buf, self.manifest.shards[i], self.manifest.schema, where(self.storage, self.manifest, i))

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

    def ensure(self, shards) -> None:
        """Open (fetch, verify, map) these shards unless open already. Concurrent callers open a
        shard once; the lock is held only for bookkeeping, never across a fetch, so ``release``
        (the trainer's thread) does not wait for the next step's downloads."""
        if all(int(s) in self.readers for s in shards):
            return
        with self._lock:
            want = [int(s) for s in shards if int(s) not in self.readers]
            mine = [i for i in want if i not in self._opening]
            others = [self._opening[i] for i in want if i in self._opening]
            for i in mine:
                self._opening[i] = _Opening()
        if mine:
            self._open_all(mine)
        for o in others:
            o.wait()

    def _open_all(self, shards: list[int]) -> None:
        try:
            paths = self.fetch(shards) if self.remote else self._each(self._verified_local, shards)
            try:
                readers = self._each(lambda ip: self._open(*ip), list(zip(shards, paths)))
            except BaseException:
                if self.remote:
                    self.unpin(shards)
                raise
        except BaseException as e:
            with self._lock:
                for i in shards:
                    self._opening.pop(i).fail(e)
            raise
        with self._lock:
            for i, reader in zip(shards, readers):
                if self._region is not None:
                    self._index(i, reader)
                self.readers[i] = reader
                self._opening.pop(i).done()

    def release(self, shards) -> list[int]:
        """Unmap these shards (no reader may hold a batch view of them: gathers copy) and unpin
        them in the cache; returns the ones that were open."""
        with self._lock:
            gone = [int(s) for s in shards if int(s) in self.readers]
            for i in gone:
                del self.readers[i]
                for base in self._rowbase.values():
                    base[i] = -1
                if self._region is not None:
                    self._region.unmap(i)
                else:
                    self._plain.pop(i, None)
            if gone and self.remote:  # the caller need not wait for the cache's lock
                self._unpinner.submit(self.unpin, gone)
        return gone

    def close(self) -> None:
        self.release(list(self.readers))
        self._unpinner.shutdown(wait=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self.cache is not None:
            self.cache.close()

    def _each(self, fn, items: list, pool: ThreadPoolExecutor | None = None) -> list:
        """``fn`` over ``items``, on the fetch pool when there is more than one."""
        return list((pool or self._pool).map(fn, items)) if len(items) > 1 else [fn(i) for i in items]

    # gathering -------------------------------------------------------------------------------
    def gather(self, ids: np.ndarray, pool: BufferPool | None = None) -> dict[str, np.ndarray]:
        """The rows of ``ids`` in that order, as ``{column: array[len(ids), *shape]}``; into
        arrays from ``pool`` where given (columns read through the shard region)."""
        rps = self.manifest.rows_per_shard
        shard = ids // rps
        self.ensure(np.unique(shard))
        self._metrics.publish()
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


class _Opening:
    """A shard another thread is opening: wait for it, and share its failure."""

    def __init__(self):
        self._event = threading.Event()
        self._error: BaseException | None = None

    def done(self) -> None:
        self._event.set()

    def fail(self, e: BaseException) -> None:
        self._error = e
        self._event.set()

    def wait(self) -> None:
        self._event.wait()
        if self._error is not None:
            raise self._error


def _map(path: str, populate: bool) -> pa.Buffer:
    """A read-only shared mapping of ``path`` (where shard regions are unavailable)."""
    with open(path, "rb") as f:
        flags = mmap.MAP_SHARED | (region.POPULATE if populate else 0)
        return pa.py_buffer(mmap.mmap(f.fileno(), 0, flags=flags, prot=mmap.PROT_READ))


class _DataMetrics:
    """Publishes a store's counters (shard checks, and its node cache's fetches and hits) as
    deltas, and the node cache's size, at most once a second (``orchestrator.metrics.DATA``)."""

    EVERY_S = 1.0
    COUNTERS = (("orchestrator_data_fetched_bytes", "fetched_bytes"),
                ("orchestrator_data_fetched_shards", "fetched_shards"),
                ("orchestrator_data_cache_hits", "hits"),
                ("orchestrator_data_shard_verifications", "verified"),
                ("orchestrator_data_shard_failures", "failed"))

    def __init__(self, store: "ShardStore"):
        self.store = store
        self.rec = None
        self.sent: dict[str, float] = {}
        self.next = 0.0

    def publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if now < self.next and not force:
            return
        self.next = now + self.EVERY_S
        try:
            if self.rec is None:
                import ray
                if not ray.is_initialized():  # outside Ray (tools, tests): nowhere to export to
                    self.next = float("inf")
                    return
                from orchestrator.metrics import DATA, Recorder
                self.rec = Recorder(DATA, node=ray.get_runtime_context().get_node_id()[:12])
            cache = self.store.cache
            counts = {**self.store.checks, **(cache.stats if cache else {})}
            for metric, key in self.COUNTERS:
                cur = counts.get(key, 0)
                self.rec.inc(metric, cur - self.sent.get(key, 0))
                self.sent[key] = cur
            if cache is not None:
                self.rec.set("orchestrator_data_cache_bytes", cache.used_bytes())
                self.rec.set("orchestrator_data_cache_limit_bytes", cache.limit)
        except Exception as e:  # noqa: BLE001 - metrics never break reading data
            self.next = now + 60.0
            log.warning("data metrics not published (%s: %s)", type(e).__name__, e)

