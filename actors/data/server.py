"""The loader actor: one per loader (trainer rank), on the rank's node when it can be.

It owns what happens on the node's disk for its rank: downloading and verifying shards into the
node cache, ahead of need in the order they will be read, as far as the cache limit allows
(the order is a pure function, so the actor computes the rank's shard schedule itself from the
order and the step the rank has reached). A trainer on the same node maps the cached files and
pins them itself, having the actor download what is missing (``download``); for one on another
node the actor gathers each step's rows and returns them through the object store (``rows``) or
its row stream (``stream_address``, :mod:`actors.data.stream`).

Requests name everything they need, so a restarted actor (``max_restarts=-1``,
``max_task_retries=-1``) serves exactly the same rows: nothing is lost or duplicated.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import ray

from actors import warm
from actors.data import plan
from actors.data.shards import ShardError
from actors.data.shuffle import EpochOrder
from actors.data.store import BufferPool, ShardStore
from actors.data.stream import StreamServer

log = logging.getLogger(__name__)

PRELOAD_HOOK = "actors.data.server.preload"
KEEP_AHEAD_STEPS = 2  # steps past the one served whose shards stay mapped (prefetch depth is added)
PLAN_EVERY_S = 0.2    # how often the next-use plan is rewritten while the rank moves on


def preload() -> None:
    """Ray worker setup hook of loader actor processes: what a loader actor imports, done before
    it waits as a warm spare (:mod:`actors.warm`). Its own hook also replaces the one a loader
    started by a trainer worker would inherit (the trainer's: torch, DeepSpeed)."""
    # importing this module (to find the hook) loaded numpy, pyarrow, Ray and the shard store;
    # what is left is fsspec's local filesystem, which every store opens
    import fsspec
    fsspec.filesystem("file")


class _Prefetcher(threading.Thread):
    """Fetches the rank's next shards in the order they will be read, within the cache limit, and
    tells the cache when each is next needed (what eviction weighs).

    Up to ``threads`` downloads run at once, always the next shards not yet cached. Only the next
    ``lead`` shards may evict (and only shards needed later than they are); those
    after them are fetched into free space only. A shard fetched early to evict one that a later
    epoch needs first would cost that one a second download, and the early one gains nothing.
    """

    def __init__(self, store: ShardStore, schedule: plan.ShardSchedule, max_ahead: int, lead: int,
                 threads: int):
        super().__init__(name="reo-data-prefetch", daemon=True)
        self.store, self.schedule, self.max_ahead, self.threads = store, schedule, max_ahead, threads
        self.lead = lead
        self.step = 0
        self.wake = threading.Event()
        self.stopped = False
        self.error: BaseException | None = None

    def advance(self, step: int) -> None:
        if step != self.step:
            self.step = step
            self.wake.set()

    def run(self) -> None:
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="reo-data-prefetch")
        shas = [s.sha256 for s in self.store.manifest.shards]
        index = {sha: i for i, sha in enumerate(shas)}
        cache = self.store.cache
        planned_at, planned_t = None, 0.0
        inflight: dict[int, Any] = {}   # shard -> its download, ``threads`` at most
        blocked_at = None               # the step at which the cache had no room for the next one
        while not self.stopped:
            step = self.step
            try:
                shards, uses = self.schedule.upcoming(step, None)
                if planned_at != step and time.monotonic() - planned_t >= PLAN_EVERY_S:
                    # eviction weighs only what is held or soon fetched: declare those shards' next use
                    # (beyond this epoch too, so what the next epoch needs first can stay cached)
                    held = {index[x] for x in cache.held() if x in index}
                    near = set(shards[:self.max_ahead].tolist())
                    cache.plan({shas[s]: int(u) for s, u in zip(shards, uses) if s in held or s in near}, step)
                    planned_at, planned_t = step, time.monotonic()
                for s, f in list(inflight.items()):
                    if f.done():
                        del inflight[s]
                        if f.result()[0] is None:
                            blocked_at = step  # full of what is needed sooner: wait for the rank to move
                if blocked_at != step:
                    blocked_at = None
                    for i, s in enumerate(shards[:self.max_ahead].tolist()):
                        if len(inflight) >= self.threads:
                            break
                        if s in inflight or os.path.exists(cache.path(shas[s])):
                            continue
                        f = pool.submit(self.store.fetch, [s], False, True, i < self.lead)
                        f.add_done_callback(lambda _: self.wake.set())
                        inflight[s] = f
            except Exception as e:  # noqa: BLE001 - reported by the next demand fetch instead
                if self.error is None:
                    log.warning("prefetch stopped: %s", e)
                self.error = e
            self.wake.wait(1.0)
            self.wake.clear()
        pool.shutdown(wait=False, cancel_futures=True)


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1, concurrency_groups={"io": 4, "batch": 2},
            runtime_env=warm.setup_hook_env(PRELOAD_HOOK))
class ShardServer:
    """Serves exact slices of the order and keeps the node cache ahead of its rank."""

    def __init__(self, url: str, storage_options: dict | None, cache_dir: str | None,
                 cache_limit: int | None = None, cache_policy: str = "belady", fetch_threads: int = 4):
        self.store = ShardStore(url, storage_options, cache_dir, fetch_threads=fetch_threads,
                                cache_limit=cache_limit, cache_policy=cache_policy)
        self._buffers = BufferPool(8)
        self._serving: dict[int, int] = {}  # batch calls in progress: id -> first step they read
        self._serving_lock = threading.Lock()
        self._calls = itertools.count()
        self._prefetch: _Prefetcher | None = None
        self._schedule: plan.ShardSchedule | None = None
        self._geometry: tuple | None = None
        self._keep = KEEP_AHEAD_STEPS
        self._fetch_threads = fetch_threads
        self._stream: StreamServer | None = None

    @ray.method(concurrency_group="io")
    def info(self) -> dict[str, Any]:
        ctx = ray.get_runtime_context()
        cache = self.store.cache
        return {"pid": os.getpid(), "node_id": ctx.get_node_id(), "runtime_env": ctx.get_runtime_env_string(),
                "open_shards": len(self.store.readers), "peak_rss_kb": _peak_rss_kb(),
                "cache_dir": self.store.cache_dir, "remote": self.store.remote,
                "cache_limit": cache.limit if cache else None,
                "cache": dict(cache.stats) if cache else None}

    @ray.method(concurrency_group="io")
    def configure(self, order: EpochOrder, n: int, g: int, tail: str, lo: int, hi: int, keep: int,
                  step: int, lead: int) -> None:
        """The rank's reading geometry (slots ``[lo, hi)`` of every step) and where it stands, how
        many steps past it stay mapped (``keep``) and how many shards ahead may evict (``lead``);
        starts fetching ahead (remote datasets)."""
        geometry = (order, n, g, tail, lo, hi)
        self._keep = keep
        if geometry == self._geometry:
            self.progress(step)
            return
        self._geometry = geometry
        self._schedule = plan.ShardSchedule(order, n, g, tail, lo, hi)
        if self._prefetch is not None:
            self._prefetch.stopped = True
            self._prefetch.wake.set()
            self._prefetch = None
        if self.store.remote:
            m = self.store.manifest
            capacity = max(1, self.store.cache.limit // max(s.bytes for s in m.shards))
            self._prefetch = _Prefetcher(self.store, self._schedule, min(m.num_shards, 2 * capacity),
                                         lead, self._fetch_threads)
            self._prefetch.step = step
            self._prefetch.start()

    @ray.method(concurrency_group="io")
    def progress(self, step: int) -> None:
        """The rank is about to read step ``step`` (the clock of :func:`plan.step_index`)."""
        if self._prefetch is not None:
            self._prefetch.advance(step)

    @ray.method(concurrency_group="io")
    def download(self, shard: int, tmp: str) -> None:
        """Download and verify shard ``shard`` into ``tmp``, a place in the node cache a reader on
        this node reserved for it (the reader then publishes and pins it)."""
        try:
            self.store.download_into(shard, tmp)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise ShardError(f"shard cache {os.path.dirname(os.path.dirname(tmp))}: no space left on device "
                             f"while downloading shard {shard}: lower dataset.cache_limit or free disk space") from None

    @ray.method(concurrency_group="io")
    def stream_address(self) -> tuple[str, int, bytes]:
        """``(node IP, port, token)`` of this actor's row stream (:mod:`actors.data.stream`),
        started on first call: the ``stream`` transport reads :meth:`rows` through it."""
        with self._serving_lock:
            if self._stream is None:
                self._stream = StreamServer(ray.util.get_node_ip_address(), self._rows,
                                            list(self.store.manifest.schema))
        return (*self._stream.address, self._stream.token)

    @ray.method(concurrency_group="batch")
    def rows(self, ids: np.ndarray, step: int | None = None, first: int | None = None) -> dict[str, np.ndarray]:
        """The rows of sample ``ids`` (object-store transport): one or more whole steps of a rank,
        ``first`` to ``step``, the request's clock, so shards the rank is done with are let go.
        Two calls run at once (the gathers release the GIL)."""
        return self._rows(ids, step, first)

    def _rows(self, ids: np.ndarray, step: int | None = None, first: int | None = None) -> dict[str, np.ndarray]:
        """:meth:`rows` for any caller in this process (the object store's or the stream's)."""
        with self._serving_lock:
            key = next(self._calls)
            self._serving[key] = first if first is not None else step if step is not None else 0
        try:
            # arrays from the pool: Ray copies the return value into the object store, then lets go
            rows = self.store.gather(np.asarray(ids, dtype=np.int64), self._buffers)
        finally:
            with self._serving_lock:  # a call registers (then maps what it reads) before or after this
                del self._serving[key]
                if step is not None and self._schedule is not None and self.store.remote:
                    # what a call still gathering reads stays mapped: keep from its first step on
                    since = min([step + 1, *self._serving.values()])
                    keep = set(self._schedule.needed(since, step + 1 + self._keep).tolist())
                    self.store.release([s for s in list(self.store.readers) if s not in keep])
        return rows


def _peak_rss_kb() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
