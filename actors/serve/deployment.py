"""The model deployment: one Ray Serve HTTP ingress that validates, batches and predicts.

Everything that changes between rollouts (checkpoint URLs, canary share, batching, input schema,
API key digest) travels in the deployment's ``user_config`` and reaches a replica through
:meth:`ModelServer.reconfigure`. Redeploying with ``serve.run`` rolls the replicas; with
``max_surge_percent=100`` Serve starts each replacement before it drains the replica it replaces,
so requests in flight finish on the old weights and no request is dropped.

Canary: a replica holds two arms, ``stable`` and ``canary``, and sends each request to the canary
with probability ``canary_share``. Each arm has its own batch queue and its own forward thread, so
a slow canary delays only the requests routed to it: stable's batches never wait for a canary
forward, and each arm's latency is measured on its own queue. A failed canary forward is answered
by the stable model, so clients never see the canary's errors; the failure is still counted
against the canary. A ``canary_mirror_share`` of stable's answered requests is also run by the
canary, on the canary's thread and only when its queue is idle, after the client has its reply;
the two predictions are compared (:func:`actors.serve.quality.compare`). Each replica reports
per-arm latencies and errors, the mirror comparison, and a canary that fails to build, to a
:class:`CanaryStatsCollector` actor that ``jobs.serve.rollout`` reads to apply
:func:`actors.serve.canary.stage_decision`; a replica that holds a canary also polls it every
``STAGE_POLL_S`` for the stage to run (share and epoch), so stages move without a redeploy.

Metrics (``orchestrator.metrics.SERVE``, :mod:`actors.serve.telemetry`): every answer is counted by
status code and arm (the arm it was routed to; ``none`` when refused before routing) with its
latency from arrival in the replica to the reply; every forward adds its batch size and time per
example; queue depth and canary share are set at each flush (every 0.5 s).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import random
import sys
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import ray
import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from actors.served_model import load_served_model
from actors.serve.graph import as_graph
from actors.serve.quality import compare, resolve_task
from actors.serve.request import InputSchema, RequestError, check_api_key, parse_inputs, read_body
from actors.serve.telemetry import FLUSH_S, ServeMetrics

logger = logging.getLogger("ray.serve")

STATS_NAMESPACE = "orchestrator-serve"
_STATS_FLUSH_S = 0.2
STAGE_POLL_S = 0.2  # how often a replica in a rollout asks the stats collector for the stage
# How long the event loop's thread may hold the GIL while the forward thread waits for it.
# Python's default is 5 ms. The forward thread needs the GIL back after its kernels run, and the
# event loop (parsing the next batch's requests) seldom lets go sooner, so every hand-back could
# cost up to 5 ms: an eager forward hands back after each op, a TorchScript graph once per batch
# (actors/serve/graph.py). 0.1 ms serves the most requests/s (docs/BENCHMARKS.md, Serve).
_GIL_SWITCH_INTERVAL_S = 0.0001
# Ray Serve settings for the replica process (read when Serve's replica code is imported):
# run the handler on the replica's own event loop instead of a second loop in another thread,
# which saves two thread hops per request. Safe here: nothing in the handler blocks the loop
# (forwards and checkpoint loads run in executor threads).
REPLICA_ENV = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0"}


def json_response(obj: Any, status: int = 200) -> Response:
    """A JSON reply encoded by orjson (numpy arrays included), 10x faster than json.dumps."""
    return Response(orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status,
                    media_type="application/json")


@ray.remote(num_cpus=0)
class CanaryStatsCollector:
    """One rollout's figures, gathered from every replica: per-arm request samples per stage
    (``epoch``), the mirror comparison summed over the rollout, and canary build errors."""

    def __init__(self):
        self._data: dict[tuple[str, str], tuple[list[float], int]] = {}
        self._quality: dict[str, list[float]] = {}  # task -> [examples, agreements, relative_error_sum]
        self._build_errors: dict[str, str] = {}   # replica -> error
        self._stage: tuple[str | None, float] = (None, 0.0)  # (epoch, canary share) the replicas follow
        self._seen: dict[str, tuple[str | None, float]] = {}  # replica -> (epoch it runs, when it asked)

    def set_stage(self, epoch: str, share: float) -> None:
        """The stage every replica moves to at its next poll (within ``STAGE_POLL_S``)."""
        self._stage = (epoch, share)

    def stage(self, replica: str, running: str | None) -> tuple[str | None, float]:
        """A replica's poll: it runs stage ``running``; the stage it should run."""
        self._seen[replica] = (running, time.monotonic())
        return self._stage

    def switched(self, epoch: str, recent_s: float = 2.0) -> bool:
        """Whether every replica that polled in the last ``recent_s`` runs ``epoch`` (true when none
        did: only replicas that hold a canary arm poll)."""
        now = time.monotonic()
        return all(e == epoch for e, t in self._seen.values() if now - t <= recent_s)

    def record(self, epoch: str, role: str, latencies_s: list[float], errors: int) -> None:
        lat, err = self._data.get((epoch, role), ([], 0))
        lat.extend(latencies_s)
        self._data[(epoch, role)] = (lat, err + errors)

    def record_mirror(self, task: str, examples: int, agreements: float, relative_error_sum: float) -> None:
        q = self._quality.setdefault(task, [0, 0.0, 0.0])
        q[0] += examples
        q[1] += agreements
        q[2] += relative_error_sum

    def build_error(self, replica: str, error: str) -> None:
        self._build_errors[replica] = error

    def snapshot(self, epoch: str) -> dict[str, Any]:
        """``{"stable"|"canary": (latencies, errors), "quality": {task: [examples, agreements,
        relative_error_sum]}, "build_errors": {replica: error}}``; arms without samples are absent."""
        out: dict[str, Any] = {role: (list(lat), err) for (ep, role), (lat, err) in self._data.items()
                               if ep == epoch}
        out["quality"] = {task: list(q) for task, q in self._quality.items()}
        out["build_errors"] = dict(self._build_errors)
        return out


@dataclass
class _Arm:
    role: str
    url: str
    model_ref: dict
    model: torch.nn.Module
    graph: str  # how the model runs: "torchscript" or "eager" (actors/serve/graph.py)
    graph_key: tuple  # (graph_mode, input shape, input dtype) it was built for


@dataclass
class _Item:
    x: np.ndarray
    role: str  # "stable", "canary", or "mirror" (a stable request the canary runs too)
    t0: float
    reference: np.ndarray | None = None  # mirror: stable's outputs to compare with


@dataclass
class _Reply:
    outputs: np.ndarray | None
    version: str | None
    error: RequestError | None = None
    arm: str = "stable"      # the arm the request was routed to
    fell_back: bool = False  # the canary failed on it and the stable arm answered


def _examples(items: list[_Item]) -> int:
    return sum(len(i.x) for i in items)


def _examples_of(xs: list[np.ndarray]) -> int:
    return sum(len(x) for x in xs)


class _Batcher:
    """Dynamic batching that forms a batch only when the forward thread is free.

    ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request even while the
    previous batch is still running, so under load every batch held only what arrived in that
    window (4.4 examples on average against 32 allowed, with a 200 M-parameter model). Here one
    loop takes whatever queued up, up to ``max_batch_size`` examples; if that is less, it waits up
    to ``batch_wait_timeout_s`` for more; then it runs the batch and only then forms the next one,
    so everything that arrives during a forward rides in the next batch and batches grow with load.

    Background items (:meth:`offer`: mirrored requests) are run only when no request waits, in
    batches of their own, and nobody waits for them; at most ``background_limit`` examples queue,
    the rest are dropped.
    """

    def __init__(self, run, record):
        self._run, self._record = run, record
        self.max_batch_size, self.wait_s = 32, 0.005
        self.background_limit = 256
        self._pending: deque[tuple[_Item, asyncio.Future]] = deque()
        self._background: deque[_Item] = deque()
        self._arrived: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._arrived = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, item: _Item) -> _Reply:
        self._start()
        fut = asyncio.get_running_loop().create_future()
        self._pending.append((item, fut))
        self._arrived.set()
        return await fut

    def offer(self, item: _Item) -> bool:
        """Queue a background item; False (dropped) when ``background_limit`` examples already wait."""
        if sum(len(i.x) for i in self._background) + len(item.x) > self.background_limit:
            return False
        self._start()
        self._background.append(item)
        self._arrived.set()
        return True

    def _take(self) -> list[tuple[_Item, asyncio.Future]]:
        batch, n = [], 0
        while self._pending and (not batch or n + len(self._pending[0][0].x) <= self.max_batch_size):
            entry = self._pending.popleft()
            if entry[1].cancelled():  # the client went away while it waited
                continue
            batch.append(entry)
            n += len(entry[0].x)
        return batch

    def queued_examples(self) -> int:
        return sum(len(it.x) for it, _ in self._pending)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending and not self._background:
                self._arrived.clear()
                await self._arrived.wait()
            if not self._pending:  # idle: a background batch
                await self._run_background()
                continue
            deadline = loop.time() + self.wait_s
            while self.queued_examples() < self.max_batch_size and loop.time() < deadline:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            items = [it for it, _ in batch]
            self._record(_examples(items))
            try:
                replies = await self._run(items)
            except Exception as e:  # noqa: BLE001 - answer every waiter, keep the loop alive
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            for (_, fut), reply in zip(batch, replies):
                if not fut.done():
                    fut.set_result(reply)

    async def _run_background(self) -> None:
        items, n = [], 0
        while self._background and (not items or n + len(self._background[0].x) <= self.max_batch_size):
            items.append(self._background.popleft())
            n += len(items[-1].x)
        try:
            await self._run(items)
        except Exception as e:  # noqa: BLE001 - nobody waits for a background batch
            logger.warning("background batch failed: %s: %s", type(e).__name__, e)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30,
                  graceful_shutdown_timeout_s=20)
class ModelServer:
    """``POST {"inputs": [...]}`` -> ``{"outputs": [...], "model_version": checkpoint URL}``."""

    def __init__(self, storage_options: dict[str, Any] | None = None, torch_threads: int = 1):
        torch.set_num_threads(max(1, int(torch_threads)))
        sys.setswitchinterval(_GIL_SWITCH_INTERVAL_S)
        self._storage_options = dict(storage_options or {})
        self._arms: dict[str, _Arm] = {}
        self._schema: InputSchema | None = None
        self._key_digest: str | None = None
        self._share = 0.0
        self._epoch: str | None = None
        self._stats_actor_name: str | None = None
        self._stats_actor = None
        self._samples: dict[str, tuple[list[float], int]] = {}
        self._mirror_share = 0.0
        self._task = "auto"                          # quality.task for the mirror comparison
        self._quality: dict[str, list[float]] = {}   # task -> [examples, agreements, rel. error sum]
        self._last_flush = time.monotonic()
        self._canary_error: str | None = None
        self._batch_sizes: Counter[int] = Counter()
        self._forward_s = 0.0  # wall seconds the forward threads (both arms) spent on batches
        self._max_batch_size = 1
        # One forward thread and one batch queue per arm: each arm's batches stay serial, the event
        # loop keeps parsing, and a slow canary never holds up a stable batch. (A thread starts on
        # its first forward: no canary, no second thread.)
        self._executors = {role: ThreadPoolExecutor(1, thread_name_prefix=f"forward-{role}")
                           for role in ("stable", "canary")}
        self._batchers = {role: _Batcher(functools.partial(self._run, role), self._count_batch)
                          for role in ("stable", "canary")}
        self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            app = serve.get_replica_context().app_name
        except Exception:  # noqa: BLE001 - constructed outside Serve (a unit test)
            app = "unknown"
        self._metrics = ServeMetrics(app)
        self._flusher: asyncio.Task | None = None
        self._stage_poller: asyncio.Task | None = None
        self._stage_error: str | None = None  # the stats actor a stage poll last failed on
        self._replica_id = f"{os.uname().nodename}:{os.getpid()}"

    # configuration -------------------------------------------------------------------------
    async def reconfigure(self, cfg: dict[str, Any]) -> None:
        """Apply a new user_config: load changed arms beside the old ones, then swap them in."""
        loop = asyncio.get_running_loop()
        arms: dict[str, _Arm] = {}
        for role in ("stable", "canary"):
            want = cfg.get(role)
            if not want:
                continue
            key = (cfg.get("graph_mode", "auto"), tuple(cfg["input_shape"]), cfg["input_dtype"])
            have = next((a for a in self._arms.values() if a.url == want["url"]
                         and a.model_ref == want["model"] and a.graph_key == key), None)
            if have is not None:
                arms[role] = _Arm(role, have.url, have.model_ref, have.model, have.graph, key)
                continue
            try:
                model, graph = await loop.run_in_executor(None, self._load, want["url"], want["model"], key)
            except Exception as e:  # noqa: BLE001 - a bad canary must not take stable down
                if role == "stable":
                    raise
                self._canary_error = f"{type(e).__name__}: {e}"
                logger.error("canary checkpoint %s failed to load: %s", want["url"], self._canary_error)
                self._report_build_error(cfg.get("canary_stats_actor"), self._canary_error)
                continue
            arms[role] = _Arm(role, want["url"], want["model"], model, graph, key)
        self._schema = InputSchema(tuple(cfg["input_shape"]), cfg["input_dtype"],
                                   int(cfg["max_request_examples"]))
        self._key_digest = cfg.get("api_key_sha256")
        self._max_batch_size = int(cfg["max_batch_size"])
        for batcher in self._batchers.values():
            batcher.max_batch_size = self._max_batch_size
            batcher.wait_s = float(cfg["batch_wait_timeout_s"])
        epoch = cfg.get("canary_epoch") if "canary" in arms else None
        if epoch != self._epoch:
            self._samples, self._quality = {}, {}
        self._epoch = epoch
        self._share = float(cfg.get("canary_share", 0.0)) if "canary" in arms else 0.0
        self._mirror_share = float(cfg.get("canary_mirror_share") or 0.0) if "canary" in arms else 0.0
        self._task = cfg.get("canary_task") or "auto"
        if cfg.get("canary_stats_actor") != self._stats_actor_name:
            self._stats_actor_name, self._stats_actor = cfg.get("canary_stats_actor"), None
        self._arms = arms  # one assignment: a request sees the old arms or the new, never a mix
        if self._flusher is None or self._flusher.done():  # on the loop that serves requests
            self._flusher = loop.create_task(self._flush_loop())
        if self._stage_poller is None or self._stage_poller.done():
            self._stage_poller = loop.create_task(self._stage_loop())

    def _load(self, url: str, model_ref: dict, graph_key: tuple) -> tuple[torch.nn.Module, str]:
        model = load_served_model(url, model_ref, self._storage_options).to(self._device)
        for p in model.parameters():
            p.requires_grad_(False)
        mode, input_shape, input_dtype = graph_key
        return as_graph(model, input_shape, input_dtype, mode, what=url)

    def _report_build_error(self, stats_actor: str | None, error: str) -> None:
        """Tell the rollout at once that the canary does not build here (it rolls back on it)."""
        if not stats_actor:
            return
        try:
            ray.get_actor(stats_actor, namespace=STATS_NAMESPACE).build_error.remote(self._replica_id, error)
        except Exception as e:  # noqa: BLE001 - the rollout still sees no canary traffic and times out
            logger.warning("canary build error not reported: %s", e)

    # HTTP ----------------------------------------------------------------------------------
    async def __call__(self, request: Request):
        t0 = time.perf_counter()
        arm = "none"  # refused before routing
        try:
            if request.method != "POST":
                raise RequestError(405, f"use POST with a JSON body, not {request.method}")
            check_api_key(request.headers, self._key_digest)
            x = parse_inputs(await read_body(request, self._schema), self._schema)
            arms = self._arms
            arm = "canary" if "canary" in arms and random.random() < self._share else "stable"
            item = _Item(x, arm, t0)
            if len(x) > self._max_batch_size:  # already a full batch: skip the queue
                reply = (await self._run(arm, [item]))[0]
            else:
                reply = await self._batchers[arm].submit(item)
            arm = reply.arm
            if reply.error is not None:
                raise reply.error
            response = json_response({"outputs": np.ascontiguousarray(reply.outputs),
                                      "model_version": reply.version})
            code = 500 if reply.fell_back else 200  # the canary's failure, answered by stable
            if arm == "stable" and self._mirror_share and "canary" in arms and random.random() < self._mirror_share:
                # the canary runs it too, when its queue is idle; this reply does not wait for it
                self._batchers["canary"].offer(_Item(x, "mirror", t0, reference=reply.outputs))
        except RequestError as e:
            response, code = json_response({"error": e.message}, e.status), e.status
        except Exception as e:  # noqa: BLE001 - never let one request take the replica down
            logger.exception("prediction failed")
            response = json_response({"error": f"internal error: {type(e).__name__}: {e}"}, 500)
            code = 500
        self._metrics.request(arm, code, time.perf_counter() - t0)
        return response

    def _count_batch(self, examples: int) -> None:
        self._batch_sizes[examples] += 1

    # forward -------------------------------------------------------------------------------
    async def _run(self, role: str, items: list[_Item]) -> list[_Reply | None]:
        """One arm's forward over its items (on that arm's thread); canary failures fall back to
        the stable model. Mirror items (the canary's background batches) only feed the comparison."""
        arms = self._arms
        if role == "canary" and items[0].role == "mirror":
            await self._mirror(arms.get("canary"), items)
            return [None] * len(items)
        if role not in arms:  # the canary went away while these waited
            role = "stable"
        arm = arms[role]
        t_batch = time.perf_counter()
        replies: list[_Reply | None] = [None] * len(items)
        xs = [it.x for it in items]
        outs, took = await self._forward(arm, xs)
        self._metrics.forward(role, _examples_of(xs), took)
        failed = 0
        fallback: list[int] = []
        for i, out in enumerate(outs):
            if isinstance(out, RequestError):
                failed += 1
                if role == "canary":
                    fallback.append(i)
                    continue
                replies[i] = _Reply(None, None, out, role)
            else:
                replies[i] = _Reply(out, arm.url, None, role)
        self._record(role, [t_batch - it.t0 + took for it in items], failed)
        if fallback:
            stable = arms["stable"]
            xs = [items[i].x for i in fallback]
            outs, took = await self._forward(stable, xs)
            self._metrics.forward("stable", _examples_of(xs), took)
            for i, out in zip(fallback, outs):
                replies[i] = _Reply(None, None, out, "canary") if isinstance(out, RequestError) \
                    else _Reply(out, stable.url, None, "canary", fell_back=True)
        self._maybe_flush()
        return replies

    async def _mirror(self, arm: _Arm | None, items: list[_Item]) -> None:
        """Run mirrored stable requests on the canary and add the comparison to the quality figures."""
        if arm is None or self._epoch is None:
            return
        outs, took = await self._forward(arm, [it.x for it in items])
        self._metrics.forward("canary", _examples_of([it.x for it in items]), took)
        for it, out in zip(items, outs):
            if isinstance(out, RequestError):
                continue  # a failing canary is the error-rate gate's business
            task = resolve_task(self._task, it.reference)
            n, agree, rel = compare(it.reference, out, task)
            q = self._quality.setdefault(task, [0, 0.0, 0.0])
            q[0] += n
            q[1] += agree
            q[2] += rel
        self._maybe_flush()

    async def _forward(self, arm: _Arm, xs: list[np.ndarray]) -> tuple[list, float]:
        """Outputs per input (or a RequestError for inputs the model failed on) and the seconds taken."""
        loop = asyncio.get_running_loop()
        t = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._executors[arm.role], self._timed_forward, arm.model, xs)
        except Exception:  # noqa: BLE001 - isolate the input(s) that fail, serve the rest
            out = []
            for x in xs:
                try:
                    out.extend(await loop.run_in_executor(self._executors[arm.role], self._forward_sync,
                                                          arm.model, [x]))
                except Exception as e:  # noqa: BLE001
                    out.append(RequestError(500, f"model failed on this input: {type(e).__name__}: {e}"))
        return out, time.perf_counter() - t

    def _timed_forward(self, model: torch.nn.Module, xs: list[np.ndarray]) -> list[np.ndarray]:
        t = time.perf_counter()
        try:
            return self._forward_sync(model, xs)
        finally:
            self._forward_s += time.perf_counter() - t

    def _forward_sync(self, model: torch.nn.Module, xs: list[np.ndarray]) -> list[np.ndarray]:
        x = torch.from_numpy(np.concatenate(xs) if len(xs) > 1 else xs[0]).to(self._device)
        with torch.inference_mode():
            y = model(x).float().cpu().numpy()
        bounds = np.cumsum([len(a) for a in xs])[:-1]
        return np.split(y, bounds) if len(xs) > 1 else [y]

    # canary statistics -----------------------------------------------------------------------
    def _record(self, role: str, latencies: list[float], errors: int) -> None:
        if self._epoch is None:
            return
        lat, err = self._samples.get(role, ([], 0))
        lat.extend(latencies)
        self._samples[role] = (lat, err + errors)

    def _stats(self):
        if self._stats_actor is None:
            self._stats_actor = ray.get_actor(self._stats_actor_name, namespace=STATS_NAMESPACE)
        return self._stats_actor

    def _maybe_flush(self, now: bool = False) -> None:
        if self._epoch is None or not (self._samples or self._quality) or self._stats_actor_name is None:
            return
        if not now and time.monotonic() - self._last_flush < _STATS_FLUSH_S:
            return
        self._last_flush = time.monotonic()
        try:
            self._stats_actor = self._stats()
            for role, (lat, err) in self._samples.items():
                self._stats_actor.record.remote(self._epoch, role, lat, err)
            for task, (n, agree, rel) in self._quality.items():
                self._stats_actor.record_mirror.remote(task, n, agree, rel)
        except Exception as e:  # noqa: BLE001 - statistics must never fail a request
            logger.warning("canary stats not reported: %s", e)
        self._samples, self._quality = {}, {}

    async def _stage_loop(self) -> None:
        """In a rollout, follow the stage the stats collector names: a new stage (share, epoch)
        moves this replica without a redeploy, so a rollback's share 0 takes one poll."""
        while True:
            await asyncio.sleep(STAGE_POLL_S)
            if self._stats_actor_name is None or "canary" not in self._arms:
                continue
            try:
                epoch, share = await self._stats().stage.remote(self._replica_id, self._epoch)
            except Exception as e:  # noqa: BLE001 - keep the stage it has (the rollout ended, or times out)
                if self._stage_error != self._stats_actor_name:  # once per rollout: this replica may be draining
                    self._stage_error = self._stats_actor_name
                    logger.warning("canary stage not read: %s: %s", type(e).__name__, e)
                continue
            if epoch is not None and epoch != self._epoch:
                self._maybe_flush(now=True)  # the last stage's samples go out under its epoch
                self._samples, self._quality = {}, {}
                self._epoch, self._share = epoch, float(share)

    # metrics -------------------------------------------------------------------------------
    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            try:
                queued = {role: self._batchers[role].queued_examples() for role in self._arms}
                self._metrics.flush(queued, self._share)
            except Exception as e:  # noqa: BLE001 - keep flushing; ServeMetrics logs its own
                logger.warning("serve metrics flush failed: %s: %s", type(e).__name__, e)

    # health and introspection ----------------------------------------------------------------
    async def check_health(self) -> None:
        """Unhealthy when no stable model is loaded or it cannot run one example of zeros."""
        arm = self._arms.get("stable")
        if arm is None or self._schema is None:
            raise RuntimeError("no stable model loaded")
        dtype = np.float32 if self._schema.input_dtype == "float32" else np.int64
        probe = np.zeros((1, *self._schema.input_shape), dtype=dtype)
        await asyncio.get_running_loop().run_in_executor(self._executors["stable"], self._forward_sync,
                                                         arm.model, [probe])

    def info(self) -> dict[str, Any]:
        """What this replica serves, the sizes (in examples) of the batches it has run, and the
        seconds its forward threads (both arms together) have spent running them."""
        arms = self._arms
        return {"pid": os.getpid(), "stable": arms["stable"].url if "stable" in arms else None,
                "stable_model": arms["stable"].model_ref if "stable" in arms else None,
                "canary": arms["canary"].url if "canary" in arms else None,
                "graph": {role: arm.graph for role, arm in arms.items()},
                "canary_share": self._share, "canary_mirror_share": self._mirror_share,
                "canary_error": self._canary_error,
                "batch_sizes": dict(self._batch_sizes), "forward_s": round(self._forward_s, 4)}


def user_config(spec, stable: tuple[str, dict], canary: tuple[str, dict] | None = None,
                share: float = 0.0, epoch: str | None = None, stats_actor: str | None = None,
                api_key_sha256: str | None = None, mirror_share: float = 0.0,
                task: str = "auto") -> dict[str, Any]:
    """The JSON-able config a :class:`ModelServer` is reconfigured with. Arms are (url, model ref);
    ``share``: of requests routed to the canary; ``mirror_share``: of stable's answered requests the
    canary also runs for the quality comparison (``task``: quality.task)."""
    return {
        "stable": {"url": stable[0], "model": stable[1]},
        "canary": {"url": canary[0], "model": canary[1]} if canary else None,
        "canary_share": share if canary else 0.0,
        "canary_mirror_share": mirror_share if canary else 0.0,
        "canary_task": task,
        "canary_epoch": epoch if canary else None,
        "canary_stats_actor": stats_actor if canary else None,
        "input_shape": list(spec.input_shape),
        "input_dtype": spec.input_dtype,
        "max_request_examples": spec.max_request_examples,
        "max_batch_size": spec.batching.max_batch_size,
        "batch_wait_timeout_s": spec.batching.batch_wait_timeout_s,
        "api_key_sha256": api_key_sha256,
        "graph_mode": spec.graph_mode,
    }


def build_app(spec, config: dict[str, Any]):
    """The Serve application for a ServeSpec with a given user_config (see :func:`user_config`)."""
    r = spec.replicas
    max_ongoing = max(2 * spec.batching.max_batch_size, math.ceil(2 * r.target_ongoing_requests))
    actor_options: dict[str, Any] = {"num_cpus": r.cpus_per_replica,
                                     "runtime_env": {"env_vars": dict(REPLICA_ENV)}}
    if r.gpus_per_replica:
        actor_options["num_gpus"] = r.gpus_per_replica
    return ModelServer.options(
        name="model",
        user_config=config,
        max_ongoing_requests=max_ongoing,
        autoscaling_config={"min_replicas": r.min_replicas, "max_replicas": r.max_replicas,
                            "initial_replicas": max(1, r.min_replicas),
                            "target_ongoing_requests": r.target_ongoing_requests},
        ray_actor_options=actor_options,
        logging_config={"enable_access_log": spec.access_log},
        max_surge_percent=100,  # start the replacement before draining the old replica
    ).bind(spec.storage.as_options(), max(1, int(r.cpus_per_replica)))
