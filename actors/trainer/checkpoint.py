"""The one checkpoint format (DESIGN invariant 5: a checkpoint is committed or absent).

Layout under the spec's checkpoint URL::

    step-00000040/
        params-r00000.safetensors   this rank's share of the fp32 weights + optimizer moments
                                    (``<param>/<kind>`` tensors, safetensors layout: ``tensorfile``):
                                    the slices its ZeRO partition holds, flat, each with its offset
                                    in the parameter (header metadata ``fragments``)
        params-r00000.json          "done" record of that shard: bytes and xxh3-128 checksum
        rng-r00000.pt               this rank's RNG states (restored only on the same world size)
        state.json                  step, world size, data-loader state, optimizer step, metrics, spec
        MANIFEST.json               written last, by rank 0, once every shard is done: sizes, checksums

Shards are keyed by parameter name; a reader assembles every parameter's full tensors from the
ranks' slices, so any world size and any ZeRO stage can load them (see ``zero_state``). Saving
needs no collective: each rank copies the slices it already holds. A reader trusts a step directory only if its manifest verifies; a
corrupt or partial one is skipped with a warning and the previous good checkpoint is used.

Durability: shards are streamed (no in-memory copy) into the page cache and the manifest is
published as soon as every shard's bytes and checksum are recorded, so a killed process never
loses a committed checkpoint. On local disk the step directory is then fsynced, and only after
that are older checkpoints deleted by retention: if the machine itself goes down before the fsync
finishes, the new checkpoint fails its checksums on the next start and the previous one, still on
disk, is used. With ``background_durability`` that fsync-then-retention runs in a thread, off the
training path. (Format 2 shards, whole tensors without ``fragments``, still load.)
"""

from __future__ import annotations

import io
import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from actors import warm
from actors.trainer import tensorfile
from orchestrator.control import MANIFEST, STEP_RE, step_dir  # the layout the scheduler reads
from orchestrator.storage import Storage, StorageError

log = logging.getLogger(__name__)

STATE = "state.json"
FORMAT_VERSION = 3


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the step directory and the file."""


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def assign_params(sizes: dict[str, int], world_size: int) -> dict[str, int]:
    """Deterministic balanced assignment of parameter names to writer ranks (largest first)."""
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name, n in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owner[name] = r
        load[r] += n
    return owner


@dataclass
class SaveRequest:
    step: int
    rank: int
    world_size: int
    tensors: dict[str, dict[str, torch.Tensor]]   # this rank's share (flat slices if ``fragments``)
    rng: dict[str, Any]
    state: dict[str, Any] | None = None           # rank 0 only: state.json payload
    metrics: dict[str, float] = field(default_factory=dict)
    attempt: str = ""   # the worker group's id: records of another attempt at this step are stale
    fragments: dict[str, list] | None = None  # name -> [offset in the flat parameter, full shape]


class CheckpointStore:
    """Reads and writes checkpoints under one URL. Safe to use from every rank at once."""

    def __init__(self, url: str, storage_options: dict | None = None, keep_last: int = 3,
                 keep_best: int = 0, best_metric: str = "loss", best_mode: str = "min",
                 background_durability: bool = False):
        self.storage = Storage(url, storage_options)
        self.url = self.storage.root
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.background_durability = background_durability
        self._durability = AsyncSaver()  # one fsync in flight at a time, errors kept
        self._retention = AsyncSaver()   # deletes older checkpoints once the new one is on disk

    # ------------------------------------------------------------------ writing
    def write_shard(self, req: SaveRequest) -> None:
        """Write this rank's files, then its done records (shards before any manifest)."""
        d = step_dir(req.step)
        name = f"params-r{req.rank:05d}.safetensors"
        meta = {"step": str(req.step), "rank": str(req.rank)}
        if req.fragments is not None:
            meta["fragments"] = json.dumps(req.fragments, separators=(",", ":"))
        with self.storage.open_atomic(f"{d}/{name}") as f:
            nbytes, digest = tensorfile.write_tensors(f, req.tensors, meta)
        self._done(d, "params", req.rank, name, nbytes, digest, req.attempt)
        rng = _torch_bytes(req.rng)
        name = f"rng-r{req.rank:05d}.pt"
        self.storage.write_bytes(f"{d}/{name}", rng, fsync=False)
        self._done(d, "rng", req.rank, name, len(rng), tensorfile.checksum(rng), req.attempt)
        if req.rank == 0 and req.state is not None:
            self.storage.write_text(f"{d}/{STATE}", json.dumps(req.state, sort_keys=True), fsync=False)

    def _done(self, d: str, kind: str, rank: int, name: str, nbytes: int, digest: str, attempt: str) -> None:
        self.storage.write_text(f"{d}/{kind}-r{rank:05d}.json", json.dumps(
            {"file": name, "bytes": nbytes, tensorfile.CHECKSUM: digest, "attempt": attempt}), fsync=False)

    def commit(self, step: int, world_size: int, metrics: dict[str, float] | None = None,
               timeout_s: float = 600.0, poll_s: float = 0.05, attempt: str = "") -> str:
        """Rank 0: wait until every rank's shard of this ``attempt`` is done, then publish the
        manifest (atomically) and remove what an earlier attempt at this step left behind.

        A step directory can hold another attempt's records: one that crashed before committing,
        on another world size. They are never trusted: the manifest lists only this attempt's.
        Returns the committed checkpoint URL. Raises CheckpointError if shards do not appear in time.
        """
        d = step_dir(step)
        expected = [f"{k}-r{r:05d}.json" for r in range(world_size) for k in ("params", "rng")]
        deadline = time.monotonic() + timeout_s
        records: dict[str, dict] = {}
        while True:
            present = set(self.storage.list(d))
            for e in expected:
                if e in present and e not in records:
                    rec = self._record(f"{d}/{e}")
                    if rec is not None and rec.get("attempt", "") == attempt:
                        records[e] = rec
            if len(records) == len(expected) and STATE in present:
                break
            if time.monotonic() > deadline:
                missing = sorted(set(expected) - set(records)) + ([] if STATE in present else [STATE])
                raise CheckpointError(f"{self.storage.url(d)}: shards never completed: {missing}")
            time.sleep(poll_s)
        files = {}
        for e in expected:
            rec = records[e]
            files[rec["file"]] = {k: v for k, v in rec.items() if k not in ("file", "attempt")}
        state_bytes = self.storage.read_bytes(f"{d}/{STATE}")
        files[STATE] = {"bytes": len(state_bytes), tensorfile.CHECKSUM: tensorfile.checksum(state_bytes)}
        manifest = {"format": FORMAT_VERSION, "step": step, "world_size": world_size,
                    "files": files, "metrics": metrics or {}, "committed_at": time.time()}
        self.wait_durable()  # the previous step's fsync + retention finish first, in order
        self.storage.write_text(f"{d}/{MANIFEST}", json.dumps(manifest, indent=1, sort_keys=True),
                                fsync=False)
        keep = set(files) | set(expected) | {MANIFEST}
        for name in present - keep:  # an earlier attempt's shards and records (another world size)
            self.storage.delete(f"{d}/{name}")
        self._durability.submit(lambda: self._make_durable(d), background=self.background_durability)
        if not self.background_durability:
            self.wait_durable()
        return self.storage.url(d)

    def _record(self, rel: str) -> dict | None:
        try:
            return json.loads(self.storage.read_text(rel))
        except (StorageError, ValueError):
            return None  # replaced while read (object stores) : read again next round

    def _make_durable(self, d: str) -> None:
        """fsync the committed step, then (only then) let retention delete older ones."""
        self.storage.sync(d)
        self._retention.submit(self.apply_retention)

    def wait_synced(self) -> None:
        """Block until the last commit is on disk (retention may still be running)."""
        self._durability.wait()

    def wait_durable(self) -> None:
        """Block until the last commit is on disk and retention has run; re-raise its failure."""
        self._durability.wait()
        self._retention.wait()

    # ------------------------------------------------------------------ reading
    def steps(self) -> list[int]:
        """Step numbers of every directory that has a manifest (not yet verified), ascending."""
        out = []
        for name in self.storage.list():
            m = STEP_RE.match(name)
            if m and self.storage.exists(f"{name}/{MANIFEST}"):
                out.append(int(m.group(1)))
        return sorted(out)

    def read_manifest(self, step: int) -> dict:
        try:
            return json.loads(self.storage.read_text(f"{step_dir(step)}/{MANIFEST}"))
        except (StorageError, ValueError) as e:
            raise CheckpointError(f"{self.storage.url(step_dir(step))}: unreadable manifest: {e}") from None

    def verify(self, step: int, deep: bool = True) -> dict:
        """Check every file's size (and checksum if ``deep``). Returns the manifest or raises."""
        man = self.read_manifest(step)
        d = step_dir(step)
        for name, rec in man["files"].items():
            try:
                if deep:
                    data = self.storage.read_bytes(f"{d}/{name}")
                    size, intact = len(data), tensorfile.checksum(data) == rec.get(tensorfile.CHECKSUM)
                else:
                    size, intact = self.storage.size(f"{d}/{name}"), True
            except StorageError:
                raise CheckpointError(f"{self.storage.url(d)}: shard {name} is missing") from None
            if size != rec["bytes"] or not intact:
                raise CheckpointError(f"{self.storage.url(d)}: shard {name} is corrupt "
                                      f"(size {size} vs {rec['bytes']}, checksum mismatch)")
        return man

    def latest_valid(self, deep: bool = True) -> int | None:
        """The newest step whose manifest verifies; corrupt ones are skipped with a warning."""
        for step in reversed(self.steps()):
            try:
                self.verify(step, deep=deep)
                return step
            except CheckpointError as e:
                log.warning("skipping checkpoint: %s; falling back to the previous one", e)
        return None

    def load_state(self, step: int) -> dict:
        return json.loads(self.storage.read_text(f"{step_dir(step)}/{STATE}"))

    def load_tensors(self, step: int) -> dict[str, dict[str, torch.Tensor]]:
        """All parameters' full tensors, assembled from every writer rank's shard.

        Raises CheckpointError naming the parameter if the slices do not cover it exactly once.
        """
        man = self.read_manifest(step)
        d = step_dir(step)
        out: dict[str, dict[str, torch.Tensor]] = {}
        asm = _Assembler(self.storage.url(d))
        for name, where in self._param_shards(man, d):
            tensors, meta = tensorfile.read_shard(self.storage.read_bytes(f"{d}/{name}"), where)
            if "fragments" in meta:
                asm.add(tensors, json.loads(meta["fragments"]), where)
            else:  # format 2: whole tensors
                out.update(tensors)
        out.update(asm.finish())
        return out

    def _param_shards(self, man: dict, d: str) -> list[tuple[str, str]]:
        """(file name, URL) of each rank's parameter shard of a committed step."""
        out = []
        for r in range(man["world_size"]):
            name = f"params-r{r:05d}.safetensors"
            if name not in man["files"]:
                raise CheckpointError(f"{self.storage.url(d)}: {name} is not in the manifest "
                                      f"(format {man.get('format')}; format 1 checkpoints are no longer read)")
            out.append((name, self.storage.url(f"{d}/{name}")))
        return out

    def load_slices(self, step: int, want: dict[str, tuple[int, int, tuple[int, ...]]]
                    ) -> dict[str, dict[str, torch.Tensor]]:
        """Elements ``[start, start + n)`` of each named parameter's flattened tensors (every kind),
        ``want[name] = (start, n, full_shape)``, reading from each shard only its header and the
        byte ranges that overlap (a rank restores its own partition without assembling the rest).

        Raises KeyError naming parameters the checkpoint lacks, ValueError naming one whose saved
        shape differs, CheckpointError when the shards do not cover a wanted range exactly once.
        """
        man = self.read_manifest(step)
        d = step_dir(step)
        out: dict[str, dict[str, torch.Tensor]] = {}
        got: dict[str, list[tuple[int, int]]] = {name: [] for name in want}
        seen: set[str] = set()
        for name, where in self._param_shards(man, d):
            with self.storage.open_read(f"{d}/{name}", size=man["files"][name]["bytes"]) as f:
                header, base = tensorfile.read_header(f, where)
                frags = json.loads(header.get("__metadata__", {}).get("fragments", "null") or "null")
                for pname, kinds in tensorfile.group(header).items():
                    seen.add(pname)
                    if pname not in want:
                        continue
                    start, n, shape = want[pname]
                    fstart, fshape = frags[pname] if frags else (0, next(iter(kinds.values()))["shape"])
                    if tuple(fshape) != tuple(shape):
                        raise ValueError(f"parameter {pname}: checkpoint shape {tuple(fshape)} != model {tuple(shape)}")
                    recs = list(kinds.values())
                    fn = math.prod(recs[0]["shape"])
                    lo, hi = max(start, fstart), min(start + n, fstart + fn)
                    if lo >= hi:
                        continue
                    dst = out.setdefault(pname, {})
                    for kind, rec in kinds.items():
                        dtype = tensorfile.dtype_of(rec)
                        size = torch.empty((), dtype=dtype).element_size()
                        f.seek(base + rec["data_offsets"][0] + (lo - fstart) * size)
                        buf = bytearray(f.read((hi - lo) * size))
                        if len(buf) != (hi - lo) * size:
                            raise CheckpointError(f"{where}: {pname}/{kind} runs past the end of the file")
                        if kind not in dst:
                            dst[kind] = torch.empty(n, dtype=dtype)
                        dst[kind][lo - start:hi - start] = torch.frombuffer(buf, dtype=dtype)
                    got[pname].append((lo, hi))
        missing = sorted(set(want) - seen)
        if missing:
            raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for pname, spans in got.items():
            start, n, _ = want[pname]
            _check_cover(self.storage.url(d), pname, spans, start, start + n)
        return out

    def load_rng(self, step: int, rank: int) -> dict | None:
        name = f"{step_dir(step)}/rng-r{rank:05d}.pt"
        if not self.storage.exists(name):
            return None
        return torch.load(io.BytesIO(self.storage.read_bytes(name)), weights_only=False)

    # ------------------------------------------------------------------ copying
    def discard_from(self, step: int) -> list[int]:
        """Delete every step directory >= ``step`` (manifest first, so none is ever half-trusted)."""
        gone = []
        for name in self.storage.list():
            m = STEP_RE.match(name)
            if m and int(m.group(1)) >= step:
                self.storage.delete(f"{name}/{MANIFEST}")
                self.storage.delete(name, recursive=True)
                gone.append(int(m.group(1)))
        return sorted(gone)

    def import_step(self, src: "CheckpointStore", step: int) -> str:
        """Copy ``src``'s committed checkpoint ``step`` here and make it this store's newest.

        Steps >= ``step`` of this store are discarded first; files are copied, the manifest last,
        and the copy is verified. Used by Tune's PBT exploit (another trial's checkpoint, ZeRO
        optimizer moments, data cursor and RNG included). Returns the copy's URL. Raises
        CheckpointError (or StorageError) when the source does not verify or vanishes mid-copy.
        """
        man = src.verify(step, deep=False)
        self.discard_from(step)
        d = step_dir(step)
        for name in sorted(man["files"]):
            self.storage.write_bytes(f"{d}/{name}", src.storage.read_bytes(f"{d}/{name}"))
        self.storage.write_bytes(f"{d}/{MANIFEST}", src.storage.read_bytes(f"{d}/{MANIFEST}"))
        self.verify(step, deep=True)
        return self.storage.url(d)

    # ------------------------------------------------------------------ retention
    def apply_retention(self) -> list[int]:
        """Keep the newest ``keep_last`` and the ``keep_best`` by metric; delete the rest.

        Only committed checkpoints count; uncommitted directories newer than the newest commit
        (a save in flight) are never touched. Returns the deleted steps.
        """
        steps = self.steps()
        keep = set(steps[-self.keep_last:])
        if self.keep_best:
            scored = []
            for s in steps:
                v = self.read_manifest(s).get("metrics", {}).get(self.best_metric)
                if v is not None:
                    scored.append((v if self.best_mode == "min" else -v, s))
            keep |= {s for _, s in sorted(scored)[: self.keep_best]}
        newest = steps[-1] if steps else -1
        deleted = []
        for name in self.storage.list():
            m = STEP_RE.match(name)
            if not m:
                continue
            s = int(m.group(1))
            if s in keep or s > newest:
                continue
            self.storage.delete(name, recursive=True)
            deleted.append(s)
        return deleted

    def best(self) -> int | None:
        scored = []
        for s in self.steps():
            v = self.read_manifest(s).get("metrics", {}).get(self.best_metric)
            if v is not None:
                scored.append((v if self.best_mode == "min" else -v, s))
        return min(scored)[1] if scored else None


def _check_cover(where: str, name: str, spans: list[tuple[int, int]], lo: int, hi: int) -> None:
    """The element ranges ``spans`` cover ``[lo, hi)`` exactly once, or CheckpointError naming it."""
    pos = lo
    for a, b in sorted(spans):
        if a != pos:
            what = "overlap" if a < pos else "a gap"
            raise CheckpointError(f"{where}: {name}: the shards' slices {what} at element {pos}")
        pos = b
    if pos != hi:
        raise CheckpointError(f"{where}: {name}: the shards hold {pos - lo} of its {hi - lo} elements")


class _Assembler:
    """Full tensors from flat slices ``[start, start + n)`` of each flattened parameter."""

    def __init__(self, where: str):
        self.where = where
        self.full: dict[str, dict[str, torch.Tensor]] = {}
        self.shape: dict[str, list[int]] = {}
        self.spans: dict[str, list[tuple[int, int]]] = {}

    def add(self, tensors: dict[str, dict[str, torch.Tensor]], fragments: dict[str, list], where: str) -> None:
        for name, kinds in tensors.items():
            if name not in fragments:
                raise CheckpointError(f"{where}: {name} has no fragment record")
            start, shape = fragments[name]
            if self.shape.setdefault(name, list(shape)) != list(shape):
                raise CheckpointError(f"{where}: {name} has shape {shape} here, {self.shape[name]} elsewhere")
            numel = math.prod(shape)
            dst = self.full.setdefault(name, {})
            if dst and set(dst) != set(kinds):
                raise CheckpointError(f"{where}: {name} holds {sorted(kinds)}, other shards {sorted(dst)}")
            n = None
            for kind, t in kinds.items():
                n = t.numel() if n is None else n
                if t.numel() != n or start < 0 or start + n > numel:
                    raise CheckpointError(f"{where}: {name}/{kind}: slice [{start}, {start + t.numel()}) "
                                          f"does not fit its {numel} elements")
                if kind not in dst:
                    dst[kind] = torch.empty(numel, dtype=t.dtype)
                dst[kind][start:start + n] = t.reshape(-1)
            self.spans.setdefault(name, []).append((start, n or 0))

    def finish(self) -> dict[str, dict[str, torch.Tensor]]:
        for name, spans in self.spans.items():
            _check_cover(self.where, name, [(s, s + n) for s, n in spans], 0, math.prod(self.shape[name]))
        return {name: {k: t.reshape(self.shape[name]) for k, t in kinds.items()}
                for name, kinds in self.full.items()}


class AsyncSaver:
    """Runs checkpoint writes (or a commit's fsync + retention) in one background thread, so
    training continues meanwhile.

    The tensors handed over are already CPU copies, so the engine may keep stepping. At most one save
    is in flight; a new one waits for the previous (bounded memory).
    """

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_committed: tuple[int, str] | None = None

    def submit(self, fn: Callable[[], tuple[int, str] | None], background: bool = True) -> None:
        """Run ``fn`` in the writer thread once the previous one is done. ``background``: the
        step goes on meanwhile, so the writer takes only CPU time nothing else wants (a caller
        that waits for it at once passes False: it runs at the caller's priority). Whoever waits
        for a background writer lifts it back to normal priority first: an idle-priority writer
        on fully busy cores would otherwise hold up its waiter indefinitely."""
        self.wait()
        started = threading.Event()

        def run():
            self._tid = threading.get_native_id()
            if background:
                warm.idle_thread_priority()
            started.set()
            try:
                res = fn()
                if res:
                    self.last_committed = res
            except BaseException as e:  # noqa: BLE001 - surfaced on the next wait()
                self._error = e

        self._thread = threading.Thread(target=run, name="checkpoint-writer", daemon=True)
        self._thread.start()
        started.wait()

    def wait(self) -> None:
        if self._thread is not None:
            if self._thread.is_alive():
                warm.normal_thread_priority(self._tid)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise err
