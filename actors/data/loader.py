"""The trainer-side ``DataLoader``: one per rank, backed by its own loader actor.

Global step ``s`` covers positions ``[s*G, (s+1)*G)`` of the stream (:mod:`actors.data.plan`);
rank ``r`` of ``W`` reads the contiguous slots ``[r*G/W, (r+1)*G/W)`` of every step. The client
keeps at most ``prefetch_batches`` steps in flight (fewer if that many would exceed
``max_prefetch_mb``: sizes are exact, fixed-shape columns) through one of two transports:

* ``mmap`` (the loader actor is on this node): the client computes its sample ids itself (the
  order is a pure function), has the actor fetch and pin the shards it needs in the node cache,
  maps the same files and copies each batch out of them with ``gather_threads`` threads. Shards it
  is done with are unmapped and unpinned, so a bounded cache can evict them.
* ``stream`` (the actor is on another node): the actor gathers each chunk's rows and writes them
  to a TCP stream of its own that the client reads into reused buffers (:mod:`actors.data.stream`;
  token-checked, not encrypted).
* ``object_store``: the actor gathers each chunk's rows and returns them through the Ray object
  store (what ``stream`` falls back to when the actor's port cannot be reached).

``auto`` (default) picks ``mmap`` when the actor landed on this node, else ``stream`` (else
``object_store`` when Ray runs with TLS, ``RAY_USE_TLS``: the stream is not encrypted). Order,
resume, prefetch bounds and errors are the same in all three. Either way the actor fetches the rank's next shards ahead
of need, within the node's cache limit (:mod:`actors.data.server`).
"""

from __future__ import annotations

import collections
import hashlib
import math
import os
import threading
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import ray

from actors import warm
from actors.data import plan
from actors.data.cache import POLICIES, default_cache_dir, default_limit, expand_cache_dir
from actors.data.server import ShardServer
from actors.data.shards import Manifest, read_manifest
from actors.data.shuffle import EpochOrder
from actors.data.store import BufferPool, ShardStore
from actors.data.stream import StreamClient

if TYPE_CHECKING:
    import torch

STATE_VERSION = 2
_IDS_AHEAD, _IDS_AHEAD_ELEMENTS = 64, 1 << 16
TRANSPORTS = ("auto", "object_store", "stream", "mmap")
DEFAULT_BLOCK_SHARDS = 8
PROGRESS_EVERY_S = 0.02  # how often the loader actor hears where its rank is
_STATE_KEYS = ("seed", "epoch", "consumed", "mode", "window", "tail", "num_samples",
               "rows_per_shard", "global_batch_size")


def fingerprint(m: Manifest) -> str:
    """Identity of a dataset's content: its layout and every shard's checksum."""
    h = hashlib.sha256(f"{m.num_samples}:{m.rows_per_shard}:".encode())
    for s in m.shards:
        h.update(s.sha256.encode())
    return h.hexdigest()[:16]


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


def resolve_mode(mode: str, manifest: Manifest, remote: bool, cache_limit: int) -> str:
    """``auto``: ``partitioned`` for a remote dataset larger than the node cache, else ``global``."""
    if mode != "auto":
        return mode
    return "partitioned" if remote and manifest.total_bytes > cache_limit else "global"


def block_samples(cfg, manifest: Manifest) -> int:
    """Samples mixed together in partitioned mode (``block_samples``, else ``block_shards`` shards)."""
    if cfg.block_samples:
        return int(cfg.block_samples)
    return int((cfg.block_shards or DEFAULT_BLOCK_SHARDS) * manifest.rows_per_shard)


def order_for(cfg, manifest: Manifest, *, global_batch_size: int, partitions: int, remote: bool,
              cache_limit: int) -> EpochOrder:
    """The epoch order a shuffle config gives over this dataset (``cfg``: a spec ``Shuffle``)."""
    mode = resolve_mode(cfg.mode, manifest, remote, cache_limit)
    n, k = manifest.num_samples, manifest.rows_per_shard
    if mode == "partitioned":
        return EpochOrder(n, cfg.seed, mode, block_samples(cfg, manifest), k, partitions=int(partitions),
                          global_batch_size=global_batch_size, carry=cfg.tail == "carry",
                          reassign=float(cfg.reassign))
    return EpochOrder(n, cfg.seed, mode, cfg.window, k)


def working_set_bytes(order: EpochOrder, manifest: Manifest, lo: int, hi: int, steps: int = 1) -> int:
    """Most bytes of shards a reader of step slots ``[lo, hi)`` holds at once while ``steps``
    consecutive steps are in flight: for each of its partitions, every block those steps reach
    (samples are mixed inside a block, so any step may read any of its shards), each block
    ``ceil(block / rows_per_shard) + 1`` shards (a block may straddle one more)."""
    biggest = max(s.bytes for s in manifest.shards)
    k, g = manifest.rows_per_shard, order.global_batch_size
    if order.mode == "global":
        return manifest.total_bytes
    if order.mode == "none":
        return min(manifest.total_bytes, (math.ceil(steps * (hi - lo) / k) + 1) * biggest)
    per_block = math.ceil(order.window / k) + 1
    if order.mode == "local":
        blocks = math.ceil(steps * max(hi - lo, g) / order.window) + 1
        return min(manifest.total_bytes, blocks * per_block * biggest)
    gp = g // order.partitions
    mine = -(-hi // gp) - lo // gp
    blocks = math.ceil(steps * gp / order.window) + 1
    return min(manifest.total_bytes, mine * blocks * per_block * biggest)


def check_cache(order: EpochOrder, manifest: Manifest, lo: int, hi: int, cache_limit: int, where: str,
                steps: int = 1) -> None:
    """Raises ValueError naming ``dataset.cache_limit`` when a reader's working set cannot fit."""
    need = working_set_bytes(order, manifest, lo, hi, steps)
    if need > cache_limit:
        what = {"global": "a global shuffle reads any shard at any step, so the whole dataset",
                "local": f"the shuffle windows {steps} steps in flight reach",
                "none": f"the shards {steps} steps in flight reach"}.get(
            order.mode, f"the blocks ({order.window} samples each) of each partition it reads that "
                        f"{steps} steps in flight reach")
        raise ValueError(
            f"dataset.cache_limit ({cache_limit / 2**20:,.1f} MiB) is smaller than the working set of a "
            f"loader on {where}: {what} take {need / 2**20:,.1f} MiB (raise the limit, or use shuffle.mode "
            f"'partitioned' with smaller blocks, or fewer prefetch_batches)")


# ---------------------------------------------------------------------------------------------
# transports: how a step's rows reach the trainer
# ---------------------------------------------------------------------------------------------
class _IdsAhead:
    """A rank's sample ids of upcoming steps, computed ``_IDS_AHEAD`` steps at a time in one
    vectorised pass (numpy's per-call overhead dominates a single step)."""

    def __init__(self, loader: "DataLoader"):
        self.loader = loader
        self._ids: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()

    def __call__(self, order: EpochOrder, c: plan.Cursor) -> np.ndarray:
        dl = self.loader
        with self._lock:
            ids = self._ids.pop((order, c), None)
            if ids is not None:
                return ids
            n, g, per_rank = dl.num_samples, dl.global_batch_size, dl.global_batch_size // dl.world_size
            cursors, segs = [], []
            for _ in range(max(1, min(_IDS_AHEAD, _IDS_AHEAD_ELEMENTS // per_rank))):
                cursors.append(c)
                segs += plan.rank_segments(c, n, g, dl.tail, dl.rank, dl.world_size)
                c = plan.advance(c, n, g, dl.tail)
            block = plan.segment_ids(order, segs).reshape(len(cursors), per_rank)
            if len(self._ids) > 4 * _IDS_AHEAD:  # requests dropped by a load_state_dict
                self._ids.clear()
            self._ids.update(((order, k), b) for k, b in zip(cursors[1:], block[1:]))
            return block[0]

    def chunk(self, order: EpochOrder, cursors: list[plan.Cursor]) -> np.ndarray:
        ids = [self(order, c) for c in cursors]
        return ids[0] if len(ids) == 1 else np.concatenate(ids)


class ObjectStoreTransport:
    """The loader actor gathers the rows and returns them through the Ray object store."""

    name = "object_store"

    def __init__(self, loader: "DataLoader"):
        self.loader = loader
        self._ids = _IdsAhead(loader)  # the order is a pure function: computed here, not in the actor
        self._got: tuple[Any, dict] | None = None  # the chunk being read, fetched once

    def submit(self, order: EpochOrder, cursors: list[plan.Cursor], steps: list[int]):
        return self.loader._actor.rows.remote(self._ids.chunk(order, cursors), steps[-1], steps[0])

    def result(self, ref) -> dict[str, np.ndarray]:
        if self._got is None or self._got[0] is not ref:
            self._got = (ref, ray.get(ref))
        return self._got[1]

    def cancel(self, ref) -> None:
        ray.cancel(ref)

    def after_step(self, step: int) -> None:
        pass  # the actor lets go of shards itself (it knows each request's step)

    def close(self) -> None:
        self._got = None


class StreamTransport:
    """The loader actor gathers the rows and writes them to a TCP stream this client reads into
    reused buffers (:mod:`actors.data.stream`); a request is answered by one of ``connections``
    connections, so the actor gathers that many at once."""

    name = "stream"

    def __init__(self, loader: "DataLoader", connections: int = 2):
        self.loader = loader
        self._ids = _IdsAhead(loader)
        actor = loader._actor
        # chunks in flight, the one the caller trains on, the one before it, one per connection
        self.buffers = BufferPool(-(-loader.max_inflight // loader.chunk) + connections + 2)
        columns = [(k, np.dtype(c["dtype"]), tuple(c["shape"])) for k, c in loader.manifest.schema.items()]
        # after a restart the actor listens elsewhere: ask Ray again (it waits for the restart)
        self.client = StreamClient(lambda: ray.get(actor.stream_address.remote()), columns, self.buffers,
                                   connections)

    def submit(self, order: EpochOrder, cursors: list[plan.Cursor], steps: list[int]):
        return self.client.submit(self._ids.chunk(order, cursors), steps[-1], steps[0])

    def result(self, fut) -> dict[str, np.ndarray]:
        return fut.result()

    def cancel(self, fut) -> None:
        fut.cancel()  # its rows still arrive, and are dropped

    def after_step(self, step: int) -> None:
        pass  # the actor lets go of shards itself (it knows each request's step)

    def close(self) -> None:
        self.client.close()


class MmapTransport:
    """The client maps the node cache's files and gathers its rows itself."""

    name = "mmap"

    def __init__(self, loader: "DataLoader", gather_threads: int, actor_info: dict):
        self.loader = loader
        actor = loader._actor
        # this process maps the node cache's files and pins them itself; what is not there yet
        # the loader actor downloads into the place the cache reserved (same node, same disk)
        self.store = ShardStore(loader.url, loader.storage_options, actor_info["cache_dir"], fetch_threads=4,
                                manifest=loader.manifest, cache_limit=actor_info["cache_limit"],
                                cache_policy=loader.cache_policy,
                                download=lambda i, tmp: ray.get(actor.download.remote(i, tmp)))
        # chunks in flight, the one the caller trains on, the one before it, and the gather
        # threads' next: reused without page faults once the caller lets go
        self.buffers = BufferPool(-(-loader.max_inflight // loader.chunk) + gather_threads + 2)
        self.pool = ThreadPoolExecutor(max_workers=gather_threads, thread_name_prefix="reo-data-gather")
        self._ids = _IdsAhead(loader)

    def submit(self, order: EpochOrder, cursors: list[plan.Cursor], steps: list[int]):
        return self.pool.submit(self._gather, order, cursors)

    def result(self, fut) -> dict[str, np.ndarray]:
        return fut.result()

    def cancel(self, fut) -> None:
        fut.cancel()

    def _gather(self, order: EpochOrder, cursors: list[plan.Cursor]) -> dict[str, np.ndarray]:
        return self.store.gather(self._ids.chunk(order, cursors), self.buffers)

    def after_step(self, step: int) -> None:
        """Unmap (and unpin) the shards no step from ``step`` to the last one in flight reads."""
        dl = self.loader
        if not self.store.remote or not self.store.readers:
            return
        keep = set(dl.schedule.needed(step, step + dl.max_inflight + 1).tolist())
        gone = [s for s in list(self.store.readers) if s not in keep]
        if gone:
            self.store.release(gone)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()


# ---------------------------------------------------------------------------------------------
# the client
# ---------------------------------------------------------------------------------------------
class DataLoader:
    """This rank's view of the global stream: ``next_step()`` returns its micro-batches.

    Global step ``s`` covers positions ``[s*G, (s+1)*G)`` of the stream; rank ``r`` of ``W`` gets
    positions ``r*G/W ... (r+1)*G/W - 1`` of it as ``accumulation`` micro-batches of
    ``micro_batch_size`` rows. ``state_dict()`` is a small JSON-able record; loading it on any
    world size continues the same stream, so every sample of an epoch is visited exactly once.

    ``shuffle``: a spec ``Shuffle`` or its dict (mode ``auto`` picks ``partitioned`` for a remote
    dataset larger than the node cache; ``partitions`` defaults to ``world_size``).
    ``cache_dir`` / ``cache_limit``: the node's shard cache (default ``~/.cache/...`` and half of
    its disk's free space; ``{node_id}`` in the directory is replaced by the Ray node id).
    ``cache_policy``: ``belady`` (evict what is needed furthest ahead) or ``lru`` (for comparison).
    ``warm_spares``: after the first step, ask the loader actor's node to keep that many idle,
    preloaded processes (:mod:`actors.warm`), so the loader actor of a restarted trainer starts in
    one instead of a new process.
    ``actor_node``: the Ray node id the loader actor (and so the node cache it reads through) runs
    on; default this process's node. On another node the rows come through the actor's row
    stream (``transport`` ``auto``) or the Ray object store.

    Raises ValueError naming the argument when the batch geometry, the cache or the state is
    invalid, and ShardError (naming the shard or the cache) when a shard is missing or corrupt or
    the cache's disk is full.
    """

    def __init__(self, url: str, *, global_batch_size: int, micro_batch_size: int, rank: int,
                 world_size: int, shuffle=None, storage_options: dict | None = None,
                 prefetch_batches: int = 4, max_prefetch_mb: int = 256, cache_dir: str | None = None,
                 cache_limit: int | None = None, cache_policy: str = "belady",
                 name: str | None = None, state: dict | None = None, transport: str = "auto",
                 gather_threads: int = 2, warm_spares: int = 0, warm_spare_keep_alive_s: float = 600.0,
                 actor_node: str | None = None):
        cfg = _shuffle_config(shuffle)
        if transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
        if not isinstance(prefetch_batches, int) or prefetch_batches < 1:
            raise ValueError(f"prefetch_batches must be an integer >= 1, got {prefetch_batches!r}")
        if not isinstance(max_prefetch_mb, (int, float)) or max_prefetch_mb <= 0:
            raise ValueError(f"max_prefetch_mb must be > 0, got {max_prefetch_mb!r}")
        if not isinstance(gather_threads, int) or gather_threads < 1:
            raise ValueError(f"gather_threads must be an integer >= 1, got {gather_threads!r}")
        if cache_limit is not None and (not isinstance(cache_limit, int) or cache_limit < 1):
            raise ValueError(f"cache_limit must be a positive number of bytes, got {cache_limit!r}")
        if cache_policy not in POLICIES:
            raise ValueError(f"cache_policy must be one of {POLICIES}, got {cache_policy!r}")
        self.url, self.storage_options = url, storage_options
        self.manifest = read_manifest(url, storage_options)
        self.num_samples = self.manifest.num_samples
        self.global_batch_size, self.micro_batch_size = global_batch_size, micro_batch_size
        self.rank, self.world_size = rank, world_size
        self.tail = cfg.tail
        self.accumulation = plan.check_batch(global_batch_size, micro_batch_size, world_size, rank,
                                             self.num_samples, self.tail)
        from orchestrator.storage import is_local
        self.remote = not is_local(url)
        self.cache_dir = expand_cache_dir(cache_dir or default_cache_dir())
        self.cache_limit = cache_limit or default_limit(self.cache_dir)
        self.cache_policy = cache_policy
        self.order = order_for(cfg, self.manifest, global_batch_size=global_batch_size,
                               partitions=cfg.partitions or world_size, remote=self.remote,
                               cache_limit=self.cache_limit)
        self.bytes_per_request = (global_batch_size // world_size) * self.manifest.row_bytes
        self.max_inflight = max(1, min(prefetch_batches, int(max_prefetch_mb * 2**20) // self.bytes_per_request))
        # steps asked for in one request: the per-request work (a Python call in a gather thread
        # or an actor call, the shard bookkeeping) is paid once per chunk, not once per step
        self.chunk = max(1, self.max_inflight // 2)
        self._cursor = plan.Cursor()
        self._inflight: collections.deque = collections.deque()
        self._next_request = self._cursor
        self._stats = {"requests": 0, "steps": 0, "peak_inflight": 0, "peak_inflight_bytes": 0,
                       "measured_request_bytes": 0}
        if state is not None:
            self.load_state_dict(state)
        else:
            self._set_order(self.order)
        self.actor_name = f"reo-data:{name}:rank{rank}:{uuid.uuid4().hex[:8]}" if name else None
        self._actor = self._make_actor(cache_dir, cache_limit, cache_policy, actor_node)
        # the actor's process starts in the background; the first request settles the transport,
        # so a trainer builds its engine meanwhile (a restart does not wait for it twice)
        self._want_transport = transport
        self._transport: ObjectStoreTransport | StreamTransport | MmapTransport | None = None
        self._gather_threads = gather_threads
        # after the first step: idle, preloaded processes for the next loader actor on its node
        self._spares = warm.WarmSpares(warm_spares, warm_spare_keep_alive_s, "loader actors")
        self._standby = warm.StandbySpares(warm_spares, warm_spare_keep_alive_s, "loader actors")
        self._pending: list = []
        self._notify_lock = threading.Lock()
        self._progress_sent = 0.0

    # geometry --------------------------------------------------------------------------------
    @property
    def slots(self) -> tuple[int, int]:
        """This rank's slots ``[lo, hi)`` of every global step."""
        per = self.global_batch_size // self.world_size
        return self.rank * per, (self.rank + 1) * per

    @property
    def steps_held(self) -> int:
        """Steps whose shards a rank holds at once: those in flight, the one it trains on, the next."""
        return self.max_inflight + 2

    def _set_order(self, order: EpochOrder) -> None:
        if self.remote:
            check_cache(order, self.manifest, *self.slots, self.cache_limit, f"rank {self.rank}", self.steps_held)
        self.order = order
        self.schedule = plan.ShardSchedule(order, self.num_samples, self.global_batch_size, self.tail, *self.slots)
        self._configured = False

    def _step_index(self, c: plan.Cursor) -> int:
        return plan.step_index(c, self.num_samples, self.global_batch_size, self.tail)

    def _configure_actor(self) -> None:
        if not self._configured:
            lead = working_set_bytes(self.order, self.manifest, *self.slots, self.steps_held) // \
                max(s.bytes for s in self.manifest.shards)
            self._notify(self._actor.configure.remote(
                self.order, self.num_samples, self.global_batch_size, self.tail, *self.slots,
                self.max_inflight + 1, self._step_index(self._cursor), max(4, int(lead))))
            self._configured = True

    @property
    def transport(self) -> str:
        """``mmap`` or ``object_store`` (``auto`` resolved: waits for the loader actor once)."""
        if self._transport is None:
            want, info = self._want_transport, ray.get(self._actor.info.remote())
            if want == "auto":
                want = "mmap" if info["node_id"] == ray.get_runtime_context().get_node_id() else \
                    "object_store" if _ray_uses_tls() else "stream"
            if want == "mmap":
                self._transport = MmapTransport(self, self._gather_threads, info)
            elif want == "stream":
                self._transport = self._stream_or_object_store()
            else:
                self._transport = ObjectStoreTransport(self)
        return self._transport.name

    def _stream_or_object_store(self):
        try:
            return StreamTransport(self)
        except OSError as e:  # e.g. a firewall between the nodes: Ray's own transfers still work
            warnings.warn(f"data loader rank {self.rank}: cannot reach the loader actor's row stream ({e}); "
                          f"rows come through the Ray object store instead", RuntimeWarning, stacklevel=3)
            return ObjectStoreTransport(self)

    def _make_actor(self, cache_dir, cache_limit, cache_policy, node: str | None):
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
        if node is not None and node not in {n["NodeID"] for n in ray.nodes() if n["Alive"]}:
            # hard affinity to a node that is not there would wait for it forever
            raise ValueError(f"actor_node {node!r} is not an alive Ray node")
        # on this node, firmly: with soft affinity Ray 2.60 placed the 0-CPU actor on another node
        # whenever this node's CPUs were all taken (by the trainers), and its cache went with it
        opts: dict[str, Any] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(
            node_id=node or ray.get_runtime_context().get_node_id(), soft=False)}
        if self.actor_name:
            opts["name"] = self.actor_name  # unique: two live loaders never share an actor
        return ShardServer.options(**opts).remote(self.url, self.storage_options, cache_dir, cache_limit,
                                                   cache_policy)

    # properties ------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Global steps per epoch (with tail='carry', steps starting in an epoch: this or one more)."""
        return self.num_samples // self.global_batch_size

    @property
    def epoch(self) -> int:
        return plan.normalise(self._cursor, self.num_samples, self.global_batch_size, self.tail).epoch

    # iteration -------------------------------------------------------------------------------
    def _fill(self) -> None:
        n, g = self.num_samples, self.global_batch_size
        self.transport  # noqa: B018 - resolves it
        self._configure_actor()
        # whole chunks only, so every request is ``chunk`` steps (one buffer shape, one call each)
        while True:
            room = self.max_inflight - len(self._inflight)
            if room <= 0 or (self._inflight and room < self.chunk):
                break
            k = min(self.chunk, room)
            cursors = []
            for _ in range(k):
                cursors.append(self._next_request)
                self._next_request = plan.advance(self._next_request, n, g, self.tail)
            handle = self._transport.submit(self.order, cursors, [self._step_index(c) for c in cursors])
            self._inflight.extend((c, handle, j) for j, c in enumerate(cursors))
            self._stats["requests"] += 1
        k = len(self._inflight)
        self._stats["peak_inflight"] = max(self._stats["peak_inflight"], k)
        self._stats["peak_inflight_bytes"] = max(self._stats["peak_inflight_bytes"], k * self.bytes_per_request)

    @property
    def inflight(self) -> int:
        """Batch requests in flight ahead of the trainer (the prefetch depth)."""
        return len(self._inflight)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This rank's ``accumulation`` micro-batches of the next global step; advances the cursor."""
        import torch
        self._fill()
        c, ref, j = self._inflight.popleft()
        rows = self._transport.result(ref)
        per = self.global_batch_size // self.world_size  # step j of its chunk (views, no copy)
        rows = {k: v[j * per:(j + 1) * per] for k, v in rows.items()}
        self._cursor = plan.advance(c, self.num_samples, self.global_batch_size, self.tail)
        step = self._step_index(self._cursor)
        self._transport.after_step(step)
        if self.remote and time.monotonic() - self._progress_sent >= PROGRESS_EVERY_S:
            self._progress_sent = time.monotonic()  # the actor fetches ahead from here
            self._notify(self._actor.progress.remote(step))
        self._fill()  # keep the pipe full while the caller trains on this step
        self._stats["steps"] += 1
        if self._stats["steps"] == 1 and self._spares.count:
            info = self.actor_info()
            self._runtime_env = info["runtime_env"]
            self._spares.request(info["runtime_env"], info["node_id"])
        self._spares.renew_if_due()
        self._standby.renew_if_due()
        self._stats["measured_request_bytes"] = sum(a.nbytes for a in rows.values())
        m = self.micro_batch_size
        with warnings.catch_warnings():  # object-store arrays are flagged read-only; they are ours alone
            warnings.simplefilter("ignore", UserWarning)
            tensors = {k: torch.from_numpy(v) for k, v in rows.items()}
        return [{k: t[i * m:(i + 1) * m] for k, t in tensors.items()} for i in range(self.accumulation)]

    def __iter__(self):
        while True:
            yield self.next_step()

    def _notify(self, ref) -> None:
        """Keep a fire-and-forget call's ref until it is done, so closing waits for it (a call
        still queued when the actor is killed would be retried and logged as failed)."""
        with self._notify_lock:
            self._pending.append(ref)
            if len(self._pending) >= 64:
                _, self._pending = ray.wait(self._pending, num_returns=len(self._pending), timeout=0)

    def keep_standby_spares(self, node_ids: list[str]) -> None:
        """Keep ``warm_spares`` idle loader processes on each of ``node_ids`` too (nodes a lost
        node's trainers would restart on); call after the first step."""
        env = getattr(self, "_runtime_env", None)
        if env is not None and self._spares.count:
            self._standby.request(env, node_ids)

    def actor_info(self) -> dict[str, Any]:
        """The loader actor's pid, node id, runtime env, open shards and cache figures."""
        return ray.get(self._actor.info.remote())

    def prefetch_stats(self) -> dict[str, int]:
        """Requests issued, steps consumed, and the peak in-flight count and bytes (exact sizes)."""
        return dict(self._stats, max_inflight=self.max_inflight, bytes_per_request=self.bytes_per_request,
                    transport=self.transport)

    # state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The cursor at the step boundary after the last ``next_step()``, with what fixes the order
        and the dataset's fingerprint: O(1), JSON-able."""
        c = plan.normalise(self._cursor, self.num_samples, self.global_batch_size, self.tail)
        o = self.order
        return {"version": STATE_VERSION, "seed": o.seed, "epoch": c.epoch, "consumed": c.consumed,
                "mode": o.mode, "window": o.window, "tail": self.tail, "num_samples": o.num_samples,
                "rows_per_shard": o.rows_per_shard, "global_batch_size": self.global_batch_size,
                "partitions": o.partitions, "reassign": o.reassign, "fingerprint": fingerprint(self.manifest)}

    def load_state_dict(self, d: dict) -> None:
        """Continue from a saved cursor with this loader's rank and world size.

        The saved order (seed, mode, window, partitions, tail) wins over this loader's shuffle
        config, so the stream continues unchanged. Raises ValueError naming the field that is bad or
        differs (another dataset, another global batch size).
        """
        if not isinstance(d, dict):
            raise ValueError(f"state must be a dict from DataLoader.state_dict(), got {type(d).__name__}")
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise ValueError(f"state is missing field(s) {missing}")
        m = self.manifest
        if d["num_samples"] != self.num_samples or d["rows_per_shard"] != m.rows_per_shard:
            raise ValueError(
                f"state.num_samples/rows_per_shard ({d['num_samples']}/{d['rows_per_shard']}) do not match "
                f"the dataset at {self.url} ({self.num_samples}/{m.rows_per_shard})")
        if "fingerprint" in d and d["fingerprint"] != fingerprint(m):
            raise ValueError(f"state.fingerprint ({d['fingerprint']}) is not the dataset at {self.url} "
                             f"({fingerprint(m)}): the state was saved over other data")
        if d["global_batch_size"] != self.global_batch_size:
            raise ValueError(f"state.global_batch_size ({d['global_batch_size']}) differs from this loader's "
                             f"global_batch_size ({self.global_batch_size}): the stream is cut in steps of it")
        for k in ("epoch", "consumed"):
            if not isinstance(d[k], int) or d[k] < 0:
                raise ValueError(f"state.{k} must be a non-negative integer, got {d[k]!r}")
        if d["tail"] not in plan.TAILS:
            raise ValueError(f"state.tail must be one of {plan.TAILS}, got {d['tail']!r}")
        self.tail = d["tail"]
        plan.check_batch(self.global_batch_size, self.micro_batch_size, self.world_size, self.rank,
                         self.num_samples, self.tail)
        self._set_order(order_from_state(d))
        self._cursor = plan.normalise(plan.Cursor(d["epoch"], d["consumed"]), self.num_samples,
                                      self.global_batch_size, self.tail)
        for ref in {id(r): r for _, r, _ in self._inflight}.values():  # for the old position: dropped
            self._transport.cancel(ref)
        self._inflight.clear()
        self._next_request = self._cursor

    def actor(self):
        """The loader actor handle (for tests and diagnostics)."""
        return self._actor

    def close(self) -> None:
        for ref in {id(r): r for _, r, _ in self._inflight}.values():
            self._transport.cancel(ref)
        self._inflight.clear()
        if self._transport is not None:
            self._transport.close()
        if self._actor is not None:
            if self._pending:
                ray.wait(self._pending, num_returns=len(self._pending), timeout=5)
            ray.kill(self._actor, no_restart=True)
            self._actor = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ray_uses_tls() -> bool:
    """Ray's own traffic is encrypted (``RAY_USE_TLS``): then rows are not sent in the clear either."""
    return os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true")


def order_from_state(d: dict) -> EpochOrder:
    """The epoch order a ``DataLoader.state_dict()`` was saved under."""
    mode = d["mode"]
    if mode == "partitioned":
        return EpochOrder(int(d["num_samples"]), int(d["seed"]), mode, int(d["window"]), int(d["rows_per_shard"]),
                          partitions=int(d["partitions"]), global_batch_size=int(d["global_batch_size"]),
                          carry=d["tail"] == "carry", reassign=float(d.get("reassign", 0.0)))
    return EpochOrder(int(d["num_samples"]), int(d["seed"]), mode, int(d["window"]), int(d["rows_per_shard"]))


def global_step_sample_ids(num_samples: int, seed: int | None, epoch_or_state: int | dict = 0, *,
                           global_batch_size: int | None = None, consumed: int = 0, step: int = 0,
                           mode: str = "global", tail: str = "drop", window: int = 4096,
                           rows_per_shard: int = 1, partitions: int = 1, reassign: float = 0.0) -> np.ndarray:
    """The ``global_batch_size`` sample ids of one global step, in stream order (world-size free).

    ``epoch_or_state`` is an epoch (the step is ``step`` steps after ``consumed`` in it) or a
    ``DataLoader.state_dict()`` (the step is ``step`` steps after that cursor; its order fields and
    global batch size are used, and ``seed`` may be None). ``rows_per_shard`` matters for modes
    'local' and 'partitioned', ``window`` is the local buffer or the partitioned block.
    """
    if isinstance(epoch_or_state, dict):
        st = epoch_or_state
        if seed is not None and seed != st["seed"]:
            raise ValueError(f"seed ({seed}) differs from state.seed ({st['seed']})")
        if st["num_samples"] != num_samples:
            raise ValueError(f"num_samples ({num_samples}) differs from state.num_samples ({st['num_samples']})")
        if global_batch_size and global_batch_size != st["global_batch_size"]:
            raise ValueError(f"global_batch_size ({global_batch_size}) differs from state.global_batch_size "
                             f"({st['global_batch_size']})")
        global_batch_size, tail = st["global_batch_size"], st["tail"]
        order = order_from_state(st)
        cursor = plan.Cursor(st["epoch"], st["consumed"])
    else:
        if not global_batch_size:
            raise ValueError("global_batch_size is required (or pass a state dict that has it)")
        if tail not in plan.TAILS:
            raise ValueError(f"tail must be one of {plan.TAILS}, got {tail!r}")
        order = order_from_state({"num_samples": num_samples, "seed": seed or 0, "mode": mode, "window": window,
                                  "rows_per_shard": rows_per_shard, "partitions": partitions,
                                  "global_batch_size": global_batch_size, "tail": tail, "reassign": reassign})
        cursor = plan.Cursor(int(epoch_or_state), consumed)
    c = plan.advance(cursor, num_samples, global_batch_size, tail, step) if step else cursor
    return plan.segment_ids(order, plan.step_segments(c, num_samples, global_batch_size, tail))
