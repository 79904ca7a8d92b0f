"""The local autoscaling cluster: Ray's fake_multinode provider driven by the real Ray autoscaler.

    eval "$(python -m cluster.local up)"   # start the head, export RAY_ADDRESS & co. for clients
    eval "$(python -m cluster.local env)"  # the same exports, in another shell
    python -m cluster.local status         # `ray status`: nodes by type, demands, usage
    python -m cluster.local down           # stop every process `up` started, and nothing else

The head is ``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` (the way Ray's own
``AutoscalingCluster`` starts it), with three differences that make it safe on a shared machine:
its ports are its own (the provider is told the GCS address instead of assuming 6379), it runs in a
new process session so that ``down`` signals exactly the processes of that session instead of
``ray stop`` (which stops every Ray on the machine), and it writes logs under its own state directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import yaml

from cluster.configs import CLUSTER_DIR, validate

DEFAULT_CONFIG = CLUSTER_DIR / "local.yaml"
PROJECT_ROOT = CLUSTER_DIR.parent
# Short on purpose: Ray's unix sockets live under it and socket paths are capped at 107 bytes.
DEFAULT_STATE_DIR = Path(os.environ.get("REO_LOCAL_CLUSTER_DIR", "/tmp/reo-local-cluster"))
STATE_FILE = "cluster.json"
# Every process of a cluster inherits this (= its state dir), so stop() never touches another's.
MARKER_ENV = "REO_LOCAL_CLUSTER"


class LocalClusterError(RuntimeError):
    """The local cluster could not be started, found or stopped."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        # As servers bind: connections of a cluster just stopped (TIME_WAIT) do not hold the port.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _ray_cli() -> str:
    # The `ray` next to this interpreter, so a venv's Ray starts the head even if PATH lacks it.
    beside = Path(sys.executable).with_name("ray")
    return str(beside) if beside.exists() else (shutil.which("ray") or "ray")


@dataclass
class LocalCluster:
    """One fake-multinode autoscaling cluster on this machine.

    ``start()`` returns once the head is up; worker nodes come and go with demand
    (``ray.autoscaler.sdk.request_resources``, pending tasks, actors, placement groups) and leave
    after ``idle_timeout_minutes`` of the config. ``client_env()`` is what a driver, ``ray status``
    or ``ray job submit`` needs in its environment to reach it.
    """

    config: str = str(DEFAULT_CONFIG)
    state_dir: str = str(DEFAULT_STATE_DIR)
    port: int = 6379
    dashboard_port: int = 8265
    include_dashboard: bool = True
    # How often the autoscaler reconciles (Ray's default is 5 s); 1 s makes local scaling snappy.
    update_interval_s: int = 1
    idle_timeout_minutes: Optional[float] = None  # None: the config's idle_timeout_minutes
    # Filled in by start():
    address: str = ""
    sid: int = 0  # the process session of the head and everything it and the autoscaler started

    # -------------------------------------------------------------------------------------------
    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}" if self.include_dashboard else ""

    def client_env(self) -> dict[str, str]:
        """Environment for a driver or the ``ray`` CLI to reach this cluster.

        Ray 2.60 turns on token authentication for clusters it starts and does not auto-enable it
        for an explicit address, so clients are told the mode along with the address.
        """
        env = {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}
        if self.include_dashboard:
            env["RAY_API_SERVER_ADDRESS"] = self.dashboard_url
        return env

    def head_resources(self) -> dict:
        cfg = self._load_config()
        return dict(cfg["available_node_types"][cfg["head_node_type"]]["resources"])


    # -------------------------------------------------------------------------------------------
    def start(self) -> "LocalCluster":
        """Start the head; raise LocalClusterError (with the head's log) if it fails."""
        state = Path(self.state_dir)
        try:
            previous = LocalCluster.from_state(state)
        except LocalClusterError:
            previous = None
        if previous is not None and previous.is_running():
            raise LocalClusterError(f"a local cluster is already running from {state} (address "
                                    f"{previous.address}); stop it with `python -m cluster.local down`")
        for flag, port in (("--port", self.port), ("--dashboard-port", self.dashboard_port)):
            if not _port_free(port):
                raise LocalClusterError(f"port {port} is in use (another Ray?); pick another with "
                                        f"`python -m cluster.local up {flag} N`")
        state.mkdir(parents=True, exist_ok=True)
        import ray

        ip = ray.util.get_node_ip_address()
        self.address = f"{ip}:{self.port}"
        cfg = self._load_config()
        cfg["provider"]["gcs_address"] = self.address
        if self.idle_timeout_minutes is not None:
            cfg["idle_timeout_minutes"] = self.idle_timeout_minutes
        resolved = state / "autoscaling-config.yaml"
        resolved.write_text(yaml.safe_dump(cfg, sort_keys=False))

        head = self.head_resources()
        cmd = [_ray_cli(), "start", "--head", f"--port={self.port}",
               f"--autoscaling-config={resolved}", f"--temp-dir={state / 'ray'}",
               f"--num-cpus={head.pop('CPU', 0)}", f"--num-gpus={head.pop('GPU', 0)}",
               # Ports nobody needs fixed are free ones, so this head never collides with another Ray.
               f"--ray-client-server-port={free_port()}",
               f"--dashboard-agent-listen-port={free_port()}", "--disable-usage-stats"]
        if "object_store_memory" in head:
            cmd.append(f"--object-store-memory={head.pop('object_store_memory')}")
        if head:
            cmd.append(f"--resources={json.dumps(head)}")
        if self.include_dashboard:
            cmd += ["--include-dashboard=true", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += ["--include-dashboard=false"]

        env = self.head_env()
        if not (env.get("RAY_AUTH_TOKEN") or env.get("RAY_AUTH_TOKEN_PATH")
                or (Path.home() / ".ray" / "auth_token").exists()):
            # What `ray.init()` does for a new local cluster: create ~/.ray/auth_token.
            subprocess.run([_ray_cli(), "get-auth-token", "--generate"], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        log = state / "head.log"
        with open(log, "wb") as out:
            # A new session: the head, every node the autoscaler launches and their workers stay
            # in it, so stop() can signal exactly them.
            # Started in the checkout: job entrypoints run there, so relative spec paths resolve.
            proc = subprocess.Popen(cmd, env=env, cwd=PROJECT_ROOT, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            rc = proc.wait()
        self.sid = proc.pid
        self._write_state()
        if rc != 0:
            self.stop()
            raise LocalClusterError(f"`ray start --head` exited with {rc}; its output:\n"
                                    + log.read_text()[-4000:])
        return self

    def head_env(self) -> dict[str, str]:
        """The environment of ``ray start --head``: the head's processes, the autoscaler and the
        fake nodes it starts (in-process, so they inherit it) all run with it."""
        from actors.serve.ingress import start_env

        env = dict(os.environ)
        # Job entrypoints (`ray job submit -- python ...`) run on the head with its PATH: make
        # `python` this interpreter, as in an activated venv.
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        # Every process imports the project from this checkout, so jobs need no `--working-dir`
        # (which fake nodes handle badly: they share one runtime-env cache, and the first node
        # whose workers finish deletes the unpacked directory under everyone else's feet).
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH")) if p)
        env.update({
            "RAY_FAKE_CLUSTER": "1",  # FakeMultiNodeProvider refuses to run without it
            "AUTOSCALER_UPDATE_INTERVAL_S": str(self.update_interval_s),
            # The monitor (autoscaler) terminates the fake worker nodes when it is stopped.
            "RAY_AUTOSCALER_FATESHARE_WORKERS": "1",
            "RAY_AUTH_MODE": "token",
            # Ray code that finds "the" cluster by itself (Ray Train's placement-group cleaner, the
            # state API) must find this one even when other Ray instances run on the machine.
            "RAY_ADDRESS": self.address,
        })
        # Serve's ingress, read from this environment: HAProxy where its binary runs here (the
        # flags the cloud YAMLs put on every `ray start`), else direct ingress, as `jobs.serve`
        # does when it starts Ray itself.
        env.update(start_env("auto")[1])
        env[MARKER_ENV] = str(Path(self.state_dir).resolve())
        return env

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the head, the autoscaler and every node it launched; idempotent.

        Raylets and agents first, the GCS last (the order ``ray stop`` uses), then SIGKILL for
        anything still alive at the deadline.
        """
        members = self._members()
        gcs = [p for p in members if _name(p) == "gcs_server"]
        _signal_all([p for p in members if p not in gcs], signal.SIGTERM)
        _wait_gone([p for p in members if p not in gcs], timeout / 2)
        _signal_all(gcs + self._members(), signal.SIGTERM)
        left = _wait_gone(self._members(), timeout / 2)
        _signal_all(left, signal.SIGKILL)
        _wait_gone(left, 5)
        state_file = Path(self.state_dir) / STATE_FILE
        if state_file.exists():
            state_file.unlink()

    def is_running(self) -> bool:
        return bool(self._members())

    # -------------------------------------------------------------------------------------------
    @classmethod
    def from_state(cls, state_dir: str | os.PathLike = DEFAULT_STATE_DIR) -> "LocalCluster":
        """The cluster `up` started from ``state_dir``; LocalClusterError if there is none."""
        path = Path(state_dir) / STATE_FILE
        if not path.exists():
            raise LocalClusterError(f"no local cluster state in {path}; start one with "
                                    "`python -m cluster.local up`")
        return cls(**json.loads(path.read_text()))

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------------------------
    def _load_config(self) -> dict:
        return validate(self.config)

    def _write_state(self) -> None:
        (Path(self.state_dir) / STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    def _members(self) -> list:
        """Live processes of this cluster's session: the head, the nodes the autoscaler launched
        and their workers (raylets give workers their own process group, not their own session)."""
        if not self.sid:
            return []
        import psutil

        found = []
        for p in psutil.process_iter():
            try:
                if (os.getsid(p.pid) == self.sid and p.status() != psutil.STATUS_ZOMBIE
                        and self._is_ours(p)):
                    found.append(p)
            except (ProcessLookupError, psutil.Error):
                continue
        return found

    def _is_ours(self, p) -> bool:
        return p.environ().get(MARKER_ENV) == str(Path(self.state_dir).resolve())


def _name(p) -> str:
    try:
        return p.name()
    except Exception:  # noqa: BLE001 - gone already
        return ""


def _signal_all(procs, sig) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except Exception:  # noqa: BLE001 - already gone
            pass


def _wait_gone(procs, timeout: float) -> list:
    import psutil

    _, alive = psutil.wait_procs(procs, timeout=max(timeout, 0.1))
    return alive


# -----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.local", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "env", "status", "down"])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="fake_multinode cluster YAML")
    parser.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR),
                        help="where the head's logs and the cluster's state live (default %(default)s)")
    parser.add_argument("--port", type=int, default=6379, help="GCS port (default %(default)s)")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="default %(default)s")
    parser.add_argument("--idle-timeout-minutes", type=float, default=None,
                        help="override the config's idle_timeout_minutes (how long a worker node "
                             "may sit idle before the autoscaler removes it)")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except LocalClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "up":
        cluster = LocalCluster(config=args.config, state_dir=args.state_dir, port=args.port,
                               dashboard_port=args.dashboard_port,
                               idle_timeout_minutes=args.idle_timeout_minutes).start()
        print(f"# local autoscaling cluster up ({args.config}); logs: "
              f"{Path(args.state_dir) / 'ray' / 'session_latest' / 'logs'}", file=sys.stderr)
        for key, value in cluster.client_env().items():
            print(f"export {key}={value}")
        return 0

    try:
        cluster = LocalCluster.from_state(args.state_dir)
    except LocalClusterError as e:
        if args.command == "down":  # nothing to stop is not an error
            print(f"# {e}", file=sys.stderr)
            return 0
        raise
    if args.command == "down":
        cluster.stop()
        print(f"# local cluster at {cluster.address} stopped", file=sys.stderr)
        return 0
    if not cluster.is_running():
        print(f"# local cluster at {cluster.address} is not running", file=sys.stderr)
        return 1
    if args.command == "env":
        for key, value in cluster.client_env().items():
            print(f"export {key}={value}")
        return 0
    return subprocess.call([_ray_cli(), "status"], env={**os.environ, **cluster.client_env()})


if __name__ == "__main__":
    sys.exit(main())
