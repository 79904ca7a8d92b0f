"""Shared fixtures: one session-scoped local Ray, a removable-node multi-node cluster, a real
S3 endpoint (moto_server) and a real PostgreSQL server, both on 127.0.0.1.

Ray workers inherit the driver's environment at ``ray.init`` time, so the S3 endpoint variables
are set before Ray starts; tests that need S3 ask for ``s3`` and get a fresh bucket.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Ray workers import the project from the checkout (as `ray job submit --working-dir .` would).
os.environ["PYTHONPATH"] = ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

RAY_CPUS = int(os.environ.get("TEST_RAY_CPUS", "2"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (calling :func:`free_port` n times can repeat one)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:  # all bound at once: the kernel hands out n different ports
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``predicate`` until it returns truthy; return that value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - keep polling through transient errors
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


# ---------------------------------------------------------------------------------------------
# S3
# ---------------------------------------------------------------------------------------------
@dataclass
class S3Endpoint:
    url: str

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(self, prefix: str = "bucket") -> str:
        """Create a fresh bucket (boto3: s3fs mkdir of a bucket fails on moto) and return its name."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_endpoint():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        import urllib.request
        wait_until(lambda: urllib.request.urlopen(url, timeout=1).status < 500, 60, 0.2, "moto_server")
        yield S3Endpoint(url)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3(s3_endpoint):
    """A fresh bucket on the loopback endpoint; yields ``s3://<bucket>``."""
    return f"s3://{s3_endpoint.make_bucket()}"


# ---------------------------------------------------------------------------------------------
# job store backends: a SQLite file, a real PostgreSQL server
# ---------------------------------------------------------------------------------------------
STORE_BACKENDS = ("sqlite", "postgres")


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (``tests/postgres_server.py``), started on first use.
    Without the server package the tests that need it fail, naming it: ``.[test]`` installs it."""
    from postgres_server import PostgresServer, ServerUnavailable
    server, error = None, None
    try:
        server = PostgresServer()
        server.start()
    except ServerUnavailable as e:
        error = str(e)
    try:
        if error:
            pytest.fail(error, pytrace=False)
        yield server
    finally:
        if server is not None:
            server.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server: its plain ``postgresql://`` URL."""
    name = postgres_server.new_database()
    yield postgres_server.url(name)
    postgres_server.drop_database(name)


def store_url_for(backend: str, request, tmp_path) -> str:
    """A job store URL on ``backend``: a SQLite file path, or a fresh PostgreSQL database."""
    if backend == "sqlite":
        return str(tmp_path / "jobs.db")
    assert backend == "postgres", backend
    return request.getfixturevalue("postgres_url")


@pytest.fixture(params=STORE_BACKENDS)
def store_url(request, tmp_path):
    """A job store URL, once per backend (the test runs on each)."""
    return store_url_for(request.param, request, tmp_path)


# ---------------------------------------------------------------------------------------------
# Ray
# ---------------------------------------------------------------------------------------------
# Processes push their metrics to the node's Prometheus endpoint every this many ms (Ray's default
# is 10 s): tests that read metrics wait about this long.
METRICS_REPORT_MS = 2000


def _start_local_ray():
    import ray
    if not ray.is_initialized():
        # address="local": always a Ray of its own, never one `ray start` left running here
        ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}}, _metrics_export_port=free_port(),
                 _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS})
    return ray


@pytest.fixture(scope="session")
def _s3_env(s3_endpoint):
    return s3_endpoint


@pytest.fixture
def ray_local(_s3_env):
    """The session's local Ray (2 CPUs). Restarted lazily if a multi-node test shut it down."""
    return _start_local_ray()


@pytest.fixture
def metrics_url(ray_local):
    """The Prometheus endpoint (``http://IP:PORT/metrics``) of the session's local Ray node."""
    from orchestrator.metrics import ray_endpoints
    return wait_until(ray_endpoints, 30, what="the node's metrics export port")[0]


@pytest.fixture
def ray_cluster(_s3_env):
    """A real multi-node cluster on this machine (``ray.cluster_utils.Cluster``).

    Yields the Cluster; ``cluster.add_node(num_cpus=...)`` and ``cluster.remove_node(node)`` work.
    The session Ray is shut down first and restarted lazily by the next ``ray_local`` test.
    """
    import ray
    from ray.cluster_utils import Cluster
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if anything tries to connect to or start Ray (specs refused before Ray)."""
    import ray

    import jobs.train

    def refuse(*a, **k):
        raise AssertionError("Ray was touched for a spec that should have been refused")
    monkeypatch.setattr(jobs.train, "connect_ray", refuse)
    monkeypatch.setattr(ray, "init", refuse)


def pytest_collection_modifyitems(config, items):
    # Multi-node tests tear down the shared Ray: run them after everything that shares it.
    items.sort(key=lambda it: 1 if it.get_closest_marker("multinode") else 0)
