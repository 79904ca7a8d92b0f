"""Warm spare worker processes: idle Ray workers started ahead of need, with their imports done.

Ray gives every new actor a worker process. An idle one fits an actor when it belongs to the same
job, was started for the same runtime env and has never run a task; otherwise the raylet starts a
new process, which then imports everything the actor needs. A restart that replaces a group of
actors (Ray Train's answer to a lost worker) pays that again for every actor. Here a running
actor asks its node's raylet to start ``count`` idle processes for its own job and runtime env
(Ray's ``PrestartWorkers`` call, the one Ray's own worker prestart uses), and the runtime env
carries a Ray worker setup hook that imports what the actor needs before the process waits. The
replacement actors then start in those processes.

A spare holds no CPU or GPU reservation, only its memory. The raylet keeps an unused spare for
``keep_alive_s``; :class:`WarmSpares` asks again before that runs out, and spares end with the
job. Asking can fail (another Ray version, no permission): the caller logs once and its actors
start cold, as without spares.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time

from orchestrator.compat import ray_internals

log = logging.getLogger("actors.warm")


def hook_env_var() -> str:
    return ray_internals.worker_setup_hook_env_var()


def setup_hook_env(hook: str) -> dict:
    """A runtime env whose worker processes run ``hook`` ("module.function") before taking work;
    ``""`` runs none (a child actor otherwise inherits its parent's hook)."""
    return {"env_vars": {hook_env_var(): hook}}


class WarmSpares:
    """Keeps ``count`` warm idle processes for this job and a runtime env on one node.

    Defaults: the calling worker's runtime env and node. ``request()`` is one RPC (the processes
    start in the background); ``renew_if_due()`` asks again before the keep-alive runs out.
    """

    def __init__(self, count: int, keep_alive_s: float, what: str = "workers"):
        self.count = int(count)
        self.keep_alive_s = float(keep_alive_s)
        self.what = what
        self.next_request = 0.0
        self.failed = False
        self._args: tuple = (None, None)  # what the last successful request asked for

    def request(self, runtime_env: str | None = None, node_id: str | None = None) -> bool:
        if self.count <= 0 or self.failed:
            return False
        try:
            prestart(self.count, self.keep_alive_s, runtime_env, node_id)
        except Exception as e:  # noqa: BLE001 - never break the caller over an optimisation
            self.failed = True
            log.warning("warm spare %s unavailable (%s: %s); restarts start cold", self.what,
                        type(e).__name__, e)
            return False
        self._args = (runtime_env, node_id)
        self.next_request = time.monotonic() + 0.8 * self.keep_alive_s
        return True

    def renew_if_due(self) -> None:
        if self.next_request and time.monotonic() >= self.next_request:
            self.request(*self._args)


class StandbySpares:
    """:class:`WarmSpares` on nodes that run none of a group: a node loss takes that node's spares
    with it, and its replacements start on other nodes, which then have warm processes too."""

    def __init__(self, count: int, keep_alive_s: float, what: str = "workers"):
        self.count, self.keep_alive_s, self.what = int(count), float(keep_alive_s), what
        self.nodes: dict[str, WarmSpares] = {}

    def request(self, runtime_env: str | None, node_ids: list[str]) -> None:
        for node_id in node_ids:
            if node_id not in self.nodes:
                spares = WarmSpares(self.count, self.keep_alive_s, f"{self.what} (standby node {node_id[:8]})")
                if spares.request(runtime_env, node_id):
                    self.nodes[node_id] = spares

    def renew_if_due(self) -> None:
        for spares in self.nodes.values():
            spares.renew_if_due()


def standby_nodes(busy: list[str], need: dict[str, float]) -> list[str]:
    """Where a lost node's replacements would start: alive nodes that run none of ``busy`` (node
    ids of a group, one entry per member) and have the resources of one member (``need``), as
    many as the most members any one node runs (the most a node loss can take), in a fixed order."""
    import ray
    per_node: dict[str, int] = {}
    for n in busy:
        per_node[n] = per_node.get(n, 0) + 1
    free = [n["NodeID"] for n in ray.nodes()
            if n.get("Alive") and n["NodeID"] not in per_node
            and all(n.get("Resources", {}).get(k, 0.0) >= v for k, v in need.items() if v > 0)]
    return sorted(free)[:max(per_node.values(), default=0)]


def prestart(count: int, keep_alive_s: float, runtime_env: str | None = None,
             node_id: str | None = None) -> None:
    """Ask ``node_id``'s raylet for ``count`` idle workers of this job with ``runtime_env`` (a
    serialized runtime env; default: the caller's own)."""
    import ray
    ctx = ray.get_runtime_context()
    node_id = node_id or ctx.get_node_id()
    node = next(n for n in ray.nodes() if n["NodeID"] == node_id)
    ray_internals.prestart_workers(node["NodeManagerAddress"], node["NodeManagerPort"], ctx.get_job_id(),
                                   runtime_env or ctx.get_runtime_env_string(), count, keep_alive_s)


def idle_spare_pids(hook: str) -> list[int]:
    """Processes on this machine waiting as spares: idle Ray workers whose setup hook is ``hook``."""
    import psutil
    var = hook_env_var()
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if (p.info["cmdline"] or [""])[0].startswith("ray::IDLE") and p.environ().get(var) == hook:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def lower_thread_priority(by: int = 10) -> None:
    """Raise the calling thread's nice value by ``by`` (Linux: nice is per thread; threads it
    starts inherit it). Best effort: no-op where unsupported."""
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + by))
    except (OSError, AttributeError):
        pass


def idle_thread_priority() -> None:
    """Run the calling thread only on CPU time nothing else on the machine wants (Linux
    ``SCHED_IDLE``; threads it starts inherit it); where unsupported, 19 nice levels down."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread (Linux)
    except (OSError, AttributeError):
        lower_thread_priority(19)


def normal_thread_priority(tid: int) -> None:
    """Put thread ``tid`` (a native id) of this process back to normal scheduling (best effort:
    an unprivileged process may lack the right where RLIMIT_NICE forbids it)."""
    try:
        os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
    except (OSError, AttributeError):
        pass


# Whether a group trains on this machine: trainers set this file's mtime to when their next step
# should have ended (at most once a second); a preload stage that starts before then runs at idle
# priority. A step that ran longer than TRAINING_HOLD_S holds the mark for three of its durations.
TRAINING_MARK = os.path.join(tempfile.gettempdir(), f"reo-training-{os.getuid()}")
TRAINING_HOLD_S = 2.0
_marked_at = 0.0


def mark_training(step_s: float = 0.0) -> None:
    """Say that a group trains on this machine now; ``step_s``: its last step's duration (cheap:
    one ``utime`` a second at most)."""
    global _marked_at
    now = time.monotonic()
    if now - _marked_at < 1.0:
        return
    _marked_at = now
    until = time.time() + max(TRAINING_HOLD_S, 3.0 * step_s)
    try:
        with open(TRAINING_MARK, "a"):
            pass
        os.utime(TRAINING_MARK, (until, max(until, os.stat(TRAINING_MARK).st_mtime)))
    except OSError:
        pass


def training_here() -> bool:
    """Whether a group on this machine stepped recently enough that it is still training."""
    try:
        return os.stat(TRAINING_MARK).st_mtime > time.time()
    except OSError:
        return False


def in_thread(fn, setup=None):
    """``fn()`` in a thread of its own (``setup()`` first in it), waited for; its error re-raised."""
    box: dict = {}

    def run():
        if setup is not None:
            setup()
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller
            box["error"] = e
    t = threading.Thread(target=run, name="reo-preload", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("result")


def preload_in_stages(stages, busy=training_here) -> list[bool]:
    """Run ``stages`` (callables) in order, each to its end before the next (imports must not race
    each other). A stage that starts while ``busy()`` (a group trains on this machine: a spare
    warming) runs in a thread of its own at idle CPU priority (``SCHED_IDLE``), taking only what
    the trainers leave; one that starts while nothing trains (a process a restart waits for now)
    runs in the calling thread at the process's own priority. A thread's priority cannot be raised
    back without privileges, hence a thread per stage. Returns, per stage, whether it ran idle."""
    idle = []
    for fn in stages:
        idle.append(bool(busy()))
        if idle[-1]:
            in_thread(fn, idle_thread_priority)
        else:
            fn()
    return idle
