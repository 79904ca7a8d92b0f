"""The scheduler's only door to Ray: Jobs API, placement groups, Serve applications, autoscaler
requests, metrics.

:class:`RayAdapter` is a thin wrapper with no decisions in it; :mod:`orchestrator.service` decides
and calls it. Tests of the service's logic pass a fake with the same methods.

Addresses and auth follow Ray's own CLI. ``address`` (or ``RAY_ADDRESS``) is what ``ray.init``
takes (``host:port`` of the GCS, ``auto``) or the dashboard's ``http(s)://host:port``, as
``ray job`` takes. The scheduler is a Ray driver (placement groups, ``request_resources`` and
metrics need one), so with a dashboard URL it joins the cluster of the machine it runs on
(``auto``). Token auth: ``RAY_AUTH_MODE=token`` with the token in ``~/.ray/auth_token``,
``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``, exactly as for ``ray job submit``.

A driver does not outlive its cluster, so the long-running ``orchestrator scheduler`` is not one:
it talks to a :class:`RayAdapter` in a child process through :class:`RayLink`, which starts a
fresh child (a new ``ray.init``) after the old one died or lost Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

from orchestrator.compat import ray_internals
from orchestrator.policy import Node

log = logging.getLogger("orchestrator.ray")

NAMESPACE = "orchestrator"   # named placement groups live here
SUBMISSION_PREFIX = "orch-"  # JobRecord.submission_id: orch-<job id>-a<attempt>
LIVE = frozenset({"PENDING", "RUNNING"})

# How Ray 2.60 stops a job (ray/dashboard/modules/job/job_supervisor.py): JobSubmissionClient.
# stop_job (and `ray job stop`) has the job's supervisor actor send SIGTERM (RAY_JOB_STOP_SIGNAL) to
# the entrypoint and all its descendants, wait RAY_JOB_STOP_WAIT_TIME_S seconds (an integer, default
# 3, read from the supervisor's own environment) and SIGKILL what is left. stop_job takes no grace
# argument; the supervisor's environment holds the job's runtime_env env_vars, so the grace is set
# per job at submission. The driver gets a copy of that environment, so a job can read its grace.
STOP_WAIT_ENV = "RAY_JOB_STOP_WAIT_TIME_S"
DEFAULT_STOP_WAIT_S = 3


class RayUnavailable(RuntimeError):
    """Ray (or its Jobs API) cannot be reached; the message names the address."""


@dataclass(frozen=True)
class RayJob:
    """One Ray job as the Jobs API reports it."""
    submission_id: str
    status: str          # PENDING | RUNNING | STOPPED | SUCCEEDED | FAILED
    message: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    exit_code: int | None = None  # the entrypoint's, once it ended (see orchestrator.outcome)

    @property
    def live(self) -> bool:
        return self.status in LIVE


@contextlib.contextmanager
def _env(**values: str | None) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the duration of the block."""
    def apply(env: dict[str, str | None]) -> None:
        for k, v in env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    saved = {k: os.environ.get(k) for k in values}
    try:
        apply(values)
        yield
    finally:
        apply(saved)


def _is_http(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))


class RayAdapter:
    """Jobs, gangs, autoscaler and metrics on the Ray cluster at ``address``.

    Connects on construction; raises :class:`RayUnavailable` naming the address if it cannot.
    """

    def __init__(self, address: str | None = None, *, namespace: str = NAMESPACE):
        import ray
        from ray.job_submission import JobSubmissionClient
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        gcs = "auto" if (self.address is None or _is_http(self.address)) else self.address
        try:
            _reachable(gcs)
            if ray.is_initialized() and gcs != "auto" and \
                    ray.get_runtime_context().gcs_address != gcs:
                log.warning("this process was connected to the Ray cluster at %s; reconnecting to %s",
                            ray.get_runtime_context().gcs_address, gcs)
                ray.shutdown()
            if not ray.is_initialized():  # a driver already connected (tests) keeps its connection
                # RAY_ADDRESS may hold a dashboard URL (as for `ray job`); ray.init must not see it.
                with _env(RAY_ADDRESS=None):
                    ray.init(address=gcs, namespace=namespace, log_to_driver=False,
                             logging_level=logging.WARNING, configure_logging=False)
                from orchestrator.dashboards import install_for_ray
                install_for_ray()  # the scheduler runs on the head: Grafana finds ours beside Ray's
            dashboard = self.address if _is_http(self.address) else None
            if dashboard is None:
                url = _dashboard_url()
                if not url:
                    raise RayUnavailable(f"the Ray cluster at {gcs} runs no dashboard; the Jobs API "
                                         "needs one (ray start --head --include-dashboard=true)")
                dashboard = url
            # JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument.
            with _env(RAY_API_SERVER_ADDRESS=None, RAY_ADDRESS=dashboard):
                self.jobs = JobSubmissionClient(dashboard)
        except RayUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - ConnectionError, auth errors, ...
            raise RayUnavailable(f"cannot reach Ray at {self.address or 'auto'}: {e}") from None
        self.dashboard_url = dashboard
        self.namespace = namespace

    # cluster --------------------------------------------------------------------------------
    def nodes(self) -> list[Node]:
        """Alive nodes with their total CPUs and GPUs and, as ``free_*``, what Ray reports
        available on each now: everything running counted, this scheduler's own jobs and
        placement groups included (``orchestrator.service.free_capacity`` reconciles the two).
        A node Ray has not reported availability for yet shows nothing free."""
        import ray
        available = ray_internals.available_resources_per_node()
        out = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            r = n.get("Resources", {})
            cpus, gpus = float(r.get("CPU", 0.0)), float(r.get("GPU", 0.0))
            a = available.get(n["NodeID"], {})
            out.append(Node(n["NodeID"], cpus, gpus, min(cpus, a.get("CPU", 0.0)),
                            min(gpus, a.get("GPU", 0.0))))
        return out

    # jobs -----------------------------------------------------------------------------------
    def list_jobs(self, prefix: str = SUBMISSION_PREFIX) -> dict[str, RayJob]:
        """Every Ray job whose submission id starts with ``prefix``, by submission id.
        Raises RayUnavailable when the Jobs API does not answer (never a partial list)."""
        try:
            details = self.jobs.list_jobs()
        except Exception as e:  # noqa: BLE001
            raise RayUnavailable(f"Jobs API at {self.dashboard_url} did not list jobs: {e}") from None
        return {d.submission_id: RayJob(d.submission_id, str(getattr(d.status, "value", d.status)),
                                        d.message or "", dict(d.metadata or {}),
                                        getattr(d, "driver_exit_code", None))
                for d in details if d.submission_id and d.submission_id.startswith(prefix)}

    def submit(self, submission_id: str, entrypoint: str, *, runtime_env: dict | None = None,
               metadata: dict[str, str] | None = None, stop_grace_s: float | None = None,
               attempts: int = 5) -> bool:
        """Submit a job under ``submission_id``. Returns False if Ray already has that id
        (a restarted scheduler re-submitting: nothing is duplicated). ``stop_grace_s``: seconds
        between the SIGTERM and the SIGKILL when the job is stopped (Ray's default: 3)."""
        if stop_grace_s is not None:
            runtime_env = dict(runtime_env or {})
            runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}),
                                       STOP_WAIT_ENV: str(max(1, math.ceil(stop_grace_s)))}
        delay = 0.5
        for i in range(attempts):
            try:
                self.jobs.submit_job(entrypoint=entrypoint, submission_id=submission_id,
                                     runtime_env=runtime_env, metadata=metadata,
                                     entrypoint_num_cpus=0)
                return True
            except RuntimeError as e:
                msg = str(e)
                if "already exists" in msg:
                    return False
                # A head node just started may not have its job agent yet.
                if "No available agent" not in msg or i == attempts - 1:
                    raise
                time.sleep(delay)
                delay *= 2
        return False

    def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL). False if it was not running."""
        try:
            return bool(self.jobs.stop_job(submission_id))
        except RuntimeError as e:
            if "does not exist" in str(e) or "404" in str(e):
                return False
            raise

    def logs(self, submission_id: str) -> str:
        return self.jobs.get_job_logs(submission_id)

    # serve ----------------------------------------------------------------------------------
    def serve_apps(self) -> set[str]:
        """Names of the Serve applications on the cluster (empty where Serve does not run)."""
        from ray import serve
        return set(serve.status().applications)

    def delete_serve_app(self, name: str) -> None:
        """Delete the Serve application ``name`` (no other); returns once Serve has stopped its
        replicas (each drains for up to its ``graceful_shutdown_timeout_s``)."""
        from ray import serve
        serve.delete(name)

    # gangs ----------------------------------------------------------------------------------
    def reserve(self, name: str, bundles: list[dict[str, float]]) -> None:
        """Create the detached placement group ``name`` for a gang (no-op if it exists)."""
        from ray.util.placement_group import placement_group
        if self._placement_group(name) is not None:
            return
        placement_group(bundles, strategy="PACK", name=name, lifetime="detached")

    def reservation_ready(self, name: str) -> bool | None:
        """True once the gang's placement group is placed; None if there is no such group."""
        pg = self._placement_group(name)
        if pg is None:
            return None
        return bool(pg.wait(timeout_seconds=0.01))

    def reservation_placement(self, name: str) -> dict[str, int] | None:
        """Where Ray put the placed group ``name``'s bundles: node id (hex, as :meth:`nodes`
        names it) -> bundles there. None if there is no such group or it is not placed yet."""
        from ray.util import placement_group_table
        pg = self._placement_group(name)
        if pg is None:
            return None
        info = placement_group_table(pg)
        if info.get("state") != "CREATED":
            return None
        out: dict[str, int] = {}
        for node in info.get("bundles_to_node_id", {}).values():
            out[node] = out.get(node, 0) + 1
        return out or None

    def release(self, name: str) -> None:
        """Remove the placement group ``name`` (its resources go to the job's own workers)."""
        from ray.util.placement_group import remove_placement_group
        pg = self._placement_group(name)
        if pg is not None:
            remove_placement_group(pg)

    def reservations(self, prefix: str = SUBMISSION_PREFIX) -> list[str]:
        """Names of live placement groups starting with ``prefix``."""
        from ray.util import placement_group_table
        return sorted({v.get("name") for v in placement_group_table().values()
                       if (v.get("name") or "").startswith(prefix) and v.get("state") != "REMOVED"})

    def _placement_group(self, name: str):
        from ray.util.placement_group import get_placement_group
        try:
            return get_placement_group(name)
        except ValueError:
            return None

    # autoscaler -----------------------------------------------------------------------------
    def request_resources(self, bundles: list[dict[str, float]]) -> None:
        """Tell the autoscaler what the queued gangs and running jobs need (empty: nothing)."""
        from ray.autoscaler.sdk import request_resources
        request_resources(bundles=bundles)


def _reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast on a GCS ``host:port`` nobody listens on (``ray.init`` retries for minutes)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// ... : leave it to ray.init
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise RayUnavailable(f"no Ray cluster at {address}: {e}") from None


def _dashboard_url(wait_s: float = 5.0) -> str | None:
    """The dashboard URL the cluster publishes in its GCS (where JobSubmissionClient looks too).

    Read live, and for up to ``wait_s`` while it is unset: the copy a driver takes when it
    connects (``address_info``) was once found empty in CI right after a fresh ``ray start``
    whose dashboard already answered HTTP.
    """
    deadline = time.monotonic() + wait_s
    while True:
        url = ray_internals.dashboard_url_from_gcs()
        if url or time.monotonic() >= deadline:
            return f"http://{url}" if url else None
        time.sleep(0.25)


class RayMetrics:
    """Scheduler metrics in the Ray dashboard / Prometheus (``orchestrator.metrics.SCHEDULER``)."""

    def __init__(self):
        from orchestrator.metrics import SCHEDULER, Recorder
        self.rec = Recorder(SCHEDULER)

    def on_tick(self, queued: dict[str, int], running: dict[str, int]) -> None:
        for prio, n in queued.items():
            self.rec.set("orchestrator_queue_depth", n, priority=prio)
        for prio, n in running.items():
            self.rec.set("orchestrator_running_jobs", n, priority=prio)

    def on_admit(self, priority: str, wait_s: float) -> None:
        self.rec.inc("orchestrator_admissions", 1, priority=priority)
        self.rec.observe("orchestrator_wait_seconds", max(0.0, wait_s), priority=priority)

    def on_preempt(self, priority: str) -> None:
        self.rec.inc("orchestrator_preemptions", 1, priority=priority)

    def on_waiting(self, by_reason: dict[str, int]) -> None:
        for reason, n in by_reason.items():
            self.rec.set("orchestrator_jobs_waiting", n, reason=reason)

    def on_leader(self, holder: str, active: bool) -> None:
        self.rec.set("orchestrator_scheduler_active", 1.0 if active else 0.0, scheduler=holder)


def connection_help(address: str | None) -> str:
    """One line on how to point the CLI at a cluster, for error messages."""
    mode = os.environ.get("RAY_AUTH_MODE", "unset")
    return (f"address {address or os.environ.get('RAY_ADDRESS') or 'auto'}; pass --address or set "
            f"RAY_ADDRESS; token auth: RAY_AUTH_MODE={mode} (set it to 'token' with the token in "
            "~/.ray/auth_token or RAY_AUTH_TOKEN)")


# ---------------------------------------------------------------------------------------------
# the scheduler's driver, in a child process it can replace
# ---------------------------------------------------------------------------------------------
# Why a child. Ray 2.60's core worker ends a driver that has not reached the GCS for
# `gcs_rpc_server_reconnect_timeout_s` (60 s): rpc_client.h logs "Failed to connect to GCS within
# 60 seconds ... The program will terminate." and the process exits 1 with no Python cleanup (no
# `finally`, no atexit); a Ray call in flight (`ray.nodes()`) blocks until then. A `ray.shutdown()`
# made before the 60 s does keep the process alive, but a call already blocked in another place
# cannot be unblocked, and a driver must also run on a node with a live raylet. So the scheduler
# keeps its loop, store and state in its own process and puts every Ray call in a child that it
# ends and starts again: a lost child costs a `ray.init`, never the scheduler.
class RayLink:
    """:class:`RayAdapter`'s methods, answered by a Ray driver in a child process.

    The child (``multiprocessing`` spawn: a fresh interpreter with no Ray state) holds a
    :class:`RayAdapter` and a :class:`RayMetrics` and answers one call at a time over a pipe. A
    call made while no child runs starts one first (``connect``). When the child dies (Ray ended
    it), does not answer within ``call_timeout_s``, or reports :class:`RayUnavailable` (the Jobs
    API or the GCS did not answer), the child is ended and the call raises
    :class:`RayUnavailable`; the next call starts a new child once the GCS port answers again
    (checked from this process first, so an outage costs no process starts). Other errors raise
    here as they did in the child. ``metrics`` are best effort: dropped while Ray is away.
    """

    METHODS = ("nodes", "list_jobs", "submit", "stop", "logs", "serve_apps", "delete_serve_app",
               "reserve", "reservation_ready", "reservation_placement", "release", "reservations",
               "request_resources")

    def __init__(self, address: str | None = None, *, namespace: str = NAMESPACE,
                 connect_timeout_s: float = 120.0, call_timeout_s: float = 120.0):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.namespace = namespace
        self.connect_timeout_s = connect_timeout_s
        self.call_timeout_s = call_timeout_s
        self.dashboard_url: str | None = None
        self.metrics = _LinkMetrics(self)
        self.connects = 0             # children started and connected, over this link's life
        self._proc = None
        self._conn = None
        self._lock = threading.RLock()

    @property
    def connected(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def driver_pid(self) -> int | None:
        return self._proc.pid if self.connected else None

    def connect(self) -> None:
        """Start a driver child and wait until it has joined Ray (no-op while one runs).
        Raises :class:`RayUnavailable` naming the address."""
        with self._lock:
            if self.connected:
                return
            self._end()
            if not _is_http(self.address) and self.address is not None:
                _reachable(self.address)
            ctx = multiprocessing.get_context("spawn")
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_driver_main, args=(theirs, self.address, self.namespace),
                               name="orchestrator-ray-driver", daemon=True)
            proc.start()
            theirs.close()
            self._proc, self._conn = proc, ours
            info = self._receive("connect", self.connect_timeout_s)
            self.dashboard_url = info["dashboard_url"]
            self.connects += 1
            log.info("joined Ray at %s (driver process %d); Jobs API at %s",
                     self.address or "auto", proc.pid, self.dashboard_url)

    def close(self) -> None:
        """Let the child leave Ray (``ray.shutdown``) and exit; end it if it does not."""
        with self._lock:
            self._end()

    def call(self, target: str, name: str, *args, **kwargs):
        """``target`` (``"ray"``: the adapter, ``"metrics"``) ``.name(*args, **kwargs)`` in the child."""
        with self._lock:
            self.connect()
            try:
                self._conn.send((target, name, args, kwargs))
            except OSError as e:
                self._end()
                raise RayUnavailable(f"lost the Ray driver process ({e}); Ray at "
                                     f"{self.address or 'auto'} unreachable?") from None
            return self._receive(name, self.call_timeout_s)

    def _receive(self, what: str, timeout_s: float):
        proc = self._proc
        try:
            if not self._conn.poll(timeout_s):
                self._end(grace_s=0)  # busy in the call: it would not read a goodbye
                raise RayUnavailable(f"Ray at {self.address or 'auto'} did not answer {what} "
                                     f"within {timeout_s:g}s; its driver process was ended")
            status, value = self._conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            self._end()
            raise RayUnavailable(f"the Ray driver process ended (exit code {proc.exitcode}) during "
                                 f"{what}: Ray at {self.address or 'auto'} unreachable?") from None
        if status == "ok":
            return value
        if isinstance(value, RayUnavailable):
            self._end()  # a fresh driver next time: this one may be holding a dead connection
        raise value

    def _end(self, grace_s: float = 5.0) -> None:
        """End the child (if any) and forget it: ``ray.shutdown`` within ``grace_s`` (it takes
        about 5 s when the GCS is gone), else SIGKILL (Ray's SIGTERM handler dumps a stack)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                if proc is not None and proc.is_alive():
                    conn.send(None)
            except OSError:
                pass
            conn.close()
        if proc is None:
            return
        proc.join(grace_s)
        if proc.is_alive():
            proc.kill()
            proc.join(5)


def _forward(name: str):
    def method(self, *args, **kwargs):
        return self.call("ray", name, *args, **kwargs)
    method.__name__ = name
    method.__doc__ = f"``RayAdapter.{name}`` in the driver process (see :class:`RayLink`)."
    return method


for _name in RayLink.METHODS:
    setattr(RayLink, _name, _forward(_name))


class _LinkMetrics:
    """:class:`RayMetrics` in the link's driver; dropped while no driver is connected."""

    def __init__(self, link: RayLink):
        self._link = link

    def _send(self, name: str, *args, **kwargs) -> None:
        if not self._link.connected:
            return
        try:
            self._link.call("metrics", name, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - metrics never stop scheduling
            log.debug("metric %s dropped: %s", name, e)

    def on_tick(self, queued, running) -> None:
        self._send("on_tick", queued, running)

    def on_admit(self, priority, wait_s) -> None:
        self._send("on_admit", priority, wait_s)

    def on_preempt(self, priority) -> None:
        self._send("on_preempt", priority)

    def on_waiting(self, by_reason) -> None:
        self._send("on_waiting", by_reason)

    def on_leader(self, holder, active) -> None:
        self._send("on_leader", holder, active)


def _portable(e: BaseException) -> BaseException:
    """``e`` if it survives a pickle round trip, else a RuntimeError carrying its type and text."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(e).__name__}: {e}")


def _driver_main(conn, address: str | None, namespace: str) -> None:
    """The child of :class:`RayLink`: join Ray, then answer calls until told to stop (``None``)
    or the parent is gone (EOF)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the scheduler's to handle
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        targets = {"ray": RayAdapter(address, namespace=namespace)}
        targets["metrics"] = RayMetrics()
    except Exception as e:  # noqa: BLE001 - reported to the parent
        conn.send(("err", _portable(e if isinstance(e, RayUnavailable) else
                                    RayUnavailable(f"cannot join Ray at {address or 'auto'}: {e}"))))
        return
    conn.send(("ok", {"dashboard_url": targets["ray"].dashboard_url}))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg is None:
            break
        target, name, args, kwargs = msg
        try:
            reply = ("ok", getattr(targets[target], name)(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - raised again in the parent
            reply = ("err", _portable(e))
        try:
            conn.send(reply)
        except OSError:
            break
        except Exception as e:  # noqa: BLE001 - a reply that does not pickle
            conn.send(("err", RuntimeError(f"{name}: reply not sendable: {e}")))
    import ray
    ray.shutdown()
