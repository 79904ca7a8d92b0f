"""A node's shard cache: content-addressed files on local disk under a hard byte limit.

Every process on a node that names the same directory shares one cache and one limit (loader
actors of several ranks, of several jobs). They coordinate through the directory itself, so no
process owns the cache and a killed one leaves nothing stuck:

    <dir>/<sha256>.arrow          a complete, verified shard
    <dir>/.partial/<client>.<sha> a download in progress (counted by its reservation)
    <dir>/.clients/<client>.json  each live user: its reservations
    <dir>/.clients/<client>.uses  and when it next needs which shard (its plan)
    <dir>/.lock                   flock held for every admission or eviction decision

A reader pins a shard it maps by holding a shared flock on the shard's file; eviction takes an
exclusive one first and skips the file when it cannot. The kernel drops a dead reader's locks,
so a crashed process pins nothing.

The bytes on disk (complete files plus reserved downloads) never exceed the limit: a download
reserves its full size before it starts. To make room the cache evicts an unpinned shard whose
next use is furthest in the future, over what every live user has declared (Belady's policy,
optimal when the future is known, as it is here: the data order is a pure function). Shards no
user will need soon go first, least recently used first. A prefetch never evicts a shard needed
sooner than the one it brings.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from typing import Callable

import psutil

from actors.data.shards import ShardError

log = logging.getLogger(__name__)

POLICIES = ("belady", "lru")
_SUFFIX = ".arrow"
_STALE_REMOTE_S = 600.0  # a client record from another host counts as live this long after its last write
DEFAULT_FREE_SHARE = 0.5


class CacheFullError(ShardError):
    """The cache cannot make room: everything in it is pinned by readers (the limit is below the
    working set of the loaders on this node). The message names the directory and the figures."""


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/ray-elastic-orchestrator/shards`` (``~/.cache/...``), not the system temp."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ray-elastic-orchestrator", "shards")


def expand_cache_dir(directory: str) -> str:
    """``directory`` with ``~`` expanded and ``{node_id}`` replaced by this Ray node's id (several
    simulated nodes on one machine then keep separate caches)."""
    directory = os.path.expanduser(directory)
    if "{node_id}" in directory:
        import ray
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        directory = directory.replace("{node_id}", node)
    return directory


def cached_bytes(directory: str) -> int:
    """Bytes of complete shards under ``directory`` (0 when it does not exist)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(directory) if e.name.endswith(_SUFFIX))
    except FileNotFoundError:
        return 0


def free_bytes(directory: str) -> int:
    """Free bytes on the filesystem that holds (or will hold) ``directory``."""
    path = directory
    while not os.path.exists(path):
        path = os.path.dirname(path) or "."
    return shutil.disk_usage(path).free


def default_limit(directory: str) -> int:
    """Half of what the cache could grow to: free disk plus what it already holds."""
    return int(DEFAULT_FREE_SHARE * (free_bytes(directory) + cached_bytes(directory)))


_LIVE: dict[tuple, float] = {}  # (pid, start time) -> when it was last seen alive


def _alive(rec: dict) -> bool:
    """Whether the process that wrote a client record still runs (checked at most once a second)."""
    if rec.get("host") != socket.gethostname():
        return time.time() - rec.get("t", 0) < _STALE_REMOTE_S
    key = (rec.get("pid"), rec.get("started"))
    if time.monotonic() - _LIVE.get(key, -10.0) < 1.0:
        return True
    try:
        alive = psutil.Process(rec["pid"]).create_time() == rec["started"]
    except (psutil.Error, KeyError, TypeError):
        alive = False
    if alive:
        _LIVE[key] = time.monotonic()
    else:
        _LIVE.pop(key, None)
    return alive


class NodeCache:
    """One process's handle on a node cache directory (thread-safe).

    ``get`` returns the path of a verified shard, downloading it with ``fetch`` when absent;
    ``pin=True`` keeps it from eviction until ``release``. ``plan`` declares when this process
    will next need which shards (in its own step clock), which steers eviction and prefetch.
    Raises ShardError (download failures, a full disk, naming the cache) and CacheFullError.
    """

    def __init__(self, directory: str, limit: int, policy: str = "belady", wait_s: float = 120.0):
        if policy not in POLICIES:
            raise ValueError(f"cache policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(limit, int) or limit < 1:
            raise ValueError(f"cache limit must be a positive number of bytes, got {limit!r}")
        self.dir, self.limit, self.policy, self.wait_s = directory, limit, policy, wait_s
        for sub in (".clients", ".partial"):
            os.makedirs(os.path.join(directory, sub), exist_ok=True)
        self.client = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        me = psutil.Process()
        self._record = {"pid": me.pid, "started": me.create_time(), "host": socket.gethostname()}
        self._pins: dict[str, list[int]] = {}  # sha -> [fd holding a shared flock, pin count]
        self._pin_lock = threading.Lock()
        self._reserved: dict[str, int] = {}
        self._uses: dict[str, int] = {}
        self._clock = 0
        self._mutex = threading.Lock()
        self._lock_fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        self._parsed: dict[str, tuple] = {}
        self._changed = threading.Condition(threading.Lock())
        self._changes = 0
        self._pinned_seen = 0
        self.stats = {"fetched_bytes": 0, "fetched_shards": 0, "hits": 0, "evicted_shards": 0,
                      "evicted_bytes": 0, "peak_bytes": 0, "waits": 0}
        with self._locked():
            self._save()

    # paths and bookkeeping ---------------------------------------------------------------------
    def path(self, sha: str) -> str:
        return os.path.join(self.dir, sha + _SUFFIX)

    def _client_file(self, client: str) -> str:
        return os.path.join(self.dir, ".clients", client + ".json")

    @contextlib.contextmanager
    def _locked(self):
        with self._mutex:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _save(self) -> None:
        """This process's reservations (written when a download starts or ends)."""
        rec = dict(self._record, t=time.time(), reserved=self._reserved)
        _write_json(self._client_file(self.client), rec)

    def _pin(self, sha: str) -> None:
        """Hold a shared lock on the shard's file (call with the cache lock held: nothing evicts it
        between the caller finding it and the lock)."""
        with self._pin_lock:
            held = self._pins.get(sha)
            if held is not None:
                held[1] += 1
                return
            fd = os.open(self.path(sha), os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._pins[sha] = [fd, 1]

    def _save_plan(self) -> None:
        _write_json(self._client_file(self.client)[:-5] + ".uses", {"clock": self._clock, "uses": self._uses})

    def _read(self, path: str):
        """A client's plan, parsed again only when it changed (cached by inode, mtime and size: a
        stale plan only makes an eviction less wise, never breaks the limit)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        hit = self._parsed.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        try:
            with open(path) as f:
                rec = json.load(f)
        except (OSError, ValueError):
            return hit[1] if hit else None  # being replaced right now: use what it said before
        self._parsed[path] = (key, rec)
        return rec

    def _others(self) -> dict[str, dict]:
        """Live clients' records, plans merged in (dead ones and their partial downloads removed)."""
        out = {}
        cdir = os.path.join(self.dir, ".clients")
        names = os.listdir(cdir)
        for name in names:
            if not name.endswith(".json") or name[:-5] == self.client:
                continue
            path = os.path.join(cdir, name)
            try:  # reservations: read every time (they are what keeps the limit)
                with open(path) as f:
                    rec = json.load(f)
            except (OSError, ValueError):
                continue  # gone (closed) or being replaced: a rename is atomic, so gone
            if _alive(rec):
                plan = self._read(path[:-5] + ".uses") or {}
                out[name[:-5]] = dict(rec, uses=plan.get("uses", {}), clock=plan.get("clock", 0))
            else:
                _remove(path)
                _remove(path[:-5] + ".uses")
                self._parsed.pop(path, None)
        live = set(out) | {self.client}
        for name in os.listdir(os.path.join(self.dir, ".partial")):
            if name.split(".", 1)[0] not in live:
                _remove(os.path.join(self.dir, ".partial", name))
        return out

    def used_bytes(self) -> int:
        """Bytes of the shard files the cache holds now (what its limit bounds, reservations aside)."""
        return sum(b for b, _ in self._files().values())

    def _files(self) -> dict[str, tuple[int, float]]:
        """sha -> (bytes, last use time) of complete shards."""
        out = {}
        for e in os.scandir(self.dir):
            if e.name.endswith(_SUFFIX) and e.is_file():
                st = e.stat()
                out[e.name[:-len(_SUFFIX)]] = (st.st_size, st.st_mtime)
        return out

    # the one decision: what to evict so that ``size`` more bytes fit ----------------------------
    def _make_room(self, sha: str, size: int, others: dict[str, dict], prefetch: bool, evict: bool = True) -> bool:
        files = self._files()
        reserved = sum(self._reserved.values()) + sum(sum(r.get("reserved", {}).values()) for r in others.values())
        used = sum(b for b, _ in files.values()) + reserved
        if used + size <= self.limit:
            self.stats["peak_bytes"] = max(self.stats["peak_bytes"], used + size)
            return True
        if not evict:
            return False
        inf = float("inf")

        def distance(x: str) -> float:
            d = inf
            for uses, clock in [(self._uses, self._clock)] + [(r.get("uses", {}), r.get("clock", 0)) for r in others.values()]:
                if x in uses:
                    d = min(d, uses[x] - clock)
            return d

        own = distance(sha)
        candidates = [x for x in files if not any(x in r.get("reserved", {}) for r in others.values())]
        if self.policy == "belady":
            candidates.sort(key=lambda x: (-distance(x), files[x][1]))
        else:
            if prefetch:
                return False  # LRU knows no future: prefetch only into free space
            candidates.sort(key=lambda x: files[x][1])
        victims, freed, self._pinned_seen = [], 0, 0
        try:
            for x in candidates:
                if used - freed + size <= self.limit:
                    break
                if prefetch and distance(x) <= own:
                    return False  # everything left is needed sooner than what we would bring
                fd = _lock_unpinned(self.path(x))
                if fd is None:
                    self._pinned_seen += 1  # a reader maps it
                    continue
                victims.append((x, fd))
                freed += files[x][0]
            if used - freed + size > self.limit:
                return False
            for x, _ in victims:
                _remove(self.path(x))
                self.stats["evicted_shards"] += 1
                self.stats["evicted_bytes"] += files[x][0]
        finally:
            for _, fd in victims:
                os.close(fd)
        self.stats["peak_bytes"] = max(self.stats["peak_bytes"], used - freed + size)
        return True

    # public ----------------------------------------------------------------------------------
    def get(self, sha: str, size: int, fetch: Callable[[str], None], *, pin: bool = True,
            prefetch: bool = False, evict: bool = True) -> str | None:
        """The cached file of shard ``sha`` (``size`` bytes), fetched with ``fetch(tmp_path)``
        (which must write and verify it) if absent. ``prefetch``: give up (return None) instead
        of waiting when no room can be made without evicting something needed sooner, or
        (``evict=False``) without evicting anything."""
        if size > self.limit:
            raise CacheFullError(f"shard cache {self.dir}: a shard of {_mb(size)} does not fit the "
                                 f"cache limit of {_mb(self.limit)}")
        deadline = None
        while True:
            with self._locked():
                path = self.path(sha)
                if os.path.exists(path):
                    if pin:
                        self._pin(sha)
                    with contextlib.suppress(OSError):
                        os.utime(path)  # last use, for LRU order among shards nobody plans to read
                    self.stats["hits"] += not prefetch
                    return path
                others = self._others()
                mine = sha in self._reserved
                busy = mine or any(sha in r.get("reserved", {}) for r in others.values())
                if not busy and self._make_room(sha, size, others, prefetch, evict):
                    self._reserved[sha] = size
                    self._save()
                    break
                if prefetch:
                    return path if busy else None  # busy: another reader is bringing it already
                pinned = self._pinned_seen
                waited = self._changes
            # someone is downloading it, or everything is pinned: wait for either to change (told at
            # once by this process's own downloads and releases; another process's are polled)
            self.stats["waits"] += 1
            deadline = deadline or time.monotonic() + self.wait_s
            if time.monotonic() > deadline:
                raise CacheFullError(
                    f"shard cache {self.dir}: no room for a {_mb(size)} shard within the cache limit of "
                    f"{_mb(self.limit)} after {self.wait_s:.0f}s: {pinned} shards are pinned by the "
                    f"loaders on this node (raise dataset.cache_limit, or use fewer partitions or a "
                    f"smaller block per node)")
            with self._changed:
                if self._changes == waited:
                    self._changed.wait(0.5 if mine else 0.01)
        return self._download(sha, size, fetch, pin)

    def _tell(self) -> None:
        """A download ended or shards were released: wake this process's waiters."""
        with self._changed:
            self._changes += 1
            self._changed.notify_all()

    def _download(self, sha: str, size: int, fetch: Callable[[str], None], pin: bool) -> str:
        tmp = os.path.join(self.dir, ".partial", f"{self.client}.{sha}")
        ok = False
        try:
            fetch(tmp)
            got = os.path.getsize(tmp)
            if got != size:
                raise ShardError(f"shard {sha[:12]}...: downloaded {got} bytes, manifest says {size}")
            with self._locked():  # published and pinned in one step: no eviction in between
                os.replace(tmp, self.path(sha))
                ok = True
                self._settle(sha, size, pin)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ShardError(
                    f"shard cache {self.dir}: no space left on device while downloading a {_mb(size)} "
                    f"shard ({_mb(free_bytes(self.dir))} free, cache limit {_mb(self.limit)}); the partial "
                    f"file was removed: lower dataset.cache_limit or free disk space") from None
            raise
        finally:
            if not ok:
                _remove(tmp)
                with self._locked():
                    self._reserved.pop(sha, None)
                    self._save()
            self._tell()
        return self.path(sha)

    def _settle(self, sha: str, size: int, pin: bool) -> None:
        self._reserved.pop(sha, None)
        self.stats["fetched_bytes"] += size
        self.stats["fetched_shards"] += 1
        if pin:
            self._pin(sha)
        self._save()

    def release(self, shas) -> None:
        """Unpin shards this process no longer maps (once per matching pinned ``get``)."""
        with self._pin_lock:
            for sha in shas:
                held = self._pins.get(sha)
                if held is None:
                    continue
                held[1] -= 1
                if not held[1]:
                    os.close(held[0])  # drops the shared lock
                    del self._pins[sha]
        self._tell()

    def plan(self, uses: dict[str, int], clock: int) -> None:
        """Declare when this process next reads each shard, in its step clock (now: ``clock``)."""
        with self._locked():
            self._uses, self._clock = dict(uses), int(clock)
            self._save_plan()

    def held(self) -> list[str]:
        """Checksums of the complete shards in the cache now."""
        return [e.name[:-len(_SUFFIX)] for e in os.scandir(self.dir) if e.name.endswith(_SUFFIX)]

    def usage(self) -> int:
        """Bytes held now: complete shards plus reserved downloads (of every live client)."""
        with self._locked():
            others = self._others()
            return cached_bytes(self.dir) + sum(self._reserved.values()) + \
                sum(sum(r.get("reserved", {}).values()) for r in others.values())

    def close(self) -> None:
        """Forget this process's pins and plans (the files stay for the next reader)."""
        if self._lock_fd is None:
            return
        with self._locked():
            _remove(self._client_file(self.client))
            _remove(self._client_file(self.client)[:-5] + ".uses")
        self.release([sha for sha, (_, n) in list(self._pins.items()) for _ in range(n)])
        os.close(self._lock_fd)
        self._lock_fd = None


def _lock_unpinned(path: str) -> int | None:
    """An fd holding an exclusive lock on ``path``, or None when a reader pins it (or it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _mb(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
