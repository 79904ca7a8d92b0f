"""Autoscaling end to end on the local fake-multinode cluster (cluster/local.yaml).

The cluster is started and stopped with the documented commands (``python -m cluster.local up`` /
``down``, docs/CLUSTER.md). Its head has no CPUs, so no gang fits until the Ray autoscaler adds
worker nodes. Two views of the same promise:

* the scheduler's effects, called one by one through ``orchestrator.ray_adapter.RayAdapter``
  (announce the gang, reserve it, run on it, release it, withdraw the request), with exact
  assertions on where the gang ran;
* the product: ``orchestrator submit`` queues a job whose gang does not fit, ``orchestrator
  scheduler`` asks the autoscaler, admits and launches it as a Ray job once nodes exist, the job
  succeeds, and the idle nodes are removed afterwards.

The idle timeout is lowered to 0.1 min here so scale-down takes seconds.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import yaml

from conftest import ROOT, free_port, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.multinode]

IDLE_TIMEOUT_MINUTES = 0.1


def _cli(module: str, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, text=True,
                          capture_output=True, timeout=timeout)


@contextlib.contextmanager
def _client_env(env: dict[str, str]):
    """Point this process (and its children) at the cluster, restoring everything afterwards.
    Ray caches RAY_AUTH_MODE per process, so it is re-read the way ``ray.init`` does on change."""
    from ray._raylet import Config

    from orchestrator.ray_adapter import _env
    try:
        with _env(**env):
            Config.initialize("")
            yield
    finally:
        Config.initialize("")


@pytest.fixture(scope="module")
def local_autoscaling_cluster():
    """`python -m cluster.local up` on free ports; yields the client env it printed; `down` after."""
    import ray
    from cluster.local import LocalCluster
    if ray.is_initialized():
        ray.shutdown()
    # Short path under /tmp: Ray's unix socket paths below it must stay under 107 bytes.
    state_dir = tempfile.mkdtemp(prefix="reo-", dir="/tmp")
    up = _cli("cluster.local", "up", "--state-dir", state_dir, "--port", str(free_port()),
              "--dashboard-port", str(free_port()), "--idle-timeout-minutes", str(IDLE_TIMEOUT_MINUTES))
    cluster = LocalCluster.from_state(state_dir) if up.returncode == 0 else None
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = dict(line.removeprefix("export ").split("=", 1)
                   for line in up.stdout.splitlines() if line.startswith("export "))
        with _client_env(env):
            yield env
            ray.shutdown()
    finally:
        ray.shutdown()
        down = _cli("cluster.local", "down", "--state-dir", state_dir, timeout=90)
        still_running = cluster is not None and cluster.is_running()
        if still_running:  # never leave processes behind for later tests, even on failure
            cluster.stop()
        shutil.rmtree(state_dir, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not still_running, "`python -m cluster.local down` left processes of the cluster running"


@pytest.fixture
def ray_(local_autoscaling_cluster):
    """The scheduler's adapter, connected to the local cluster, which starts with the head alone."""
    from orchestrator.ray_adapter import RayAdapter
    adapter = RayAdapter(local_autoscaling_cluster["RAY_ADDRESS"])

    def head_alone():
        nodes = adapter.nodes()
        return nodes if len(nodes) == 1 else None

    nodes = wait_until(head_alone, timeout=90, interval=0.5, what="a cluster of the head alone")
    assert nodes[0].cpus == 0, "the head has no room for any gang"
    return adapter


def _head_only(adapter, head_id: str) -> bool:
    return [n.id for n in adapter.nodes()] == [head_id]


def test_gang_that_does_not_fit_scales_up_runs_on_new_nodes_then_idle_nodes_are_removed(ray_):
    import ray
    from ray.util.placement_group import get_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    head = ray_.nodes()[0]
    gang = [{"CPU": 1.0}, {"CPU": 1.0}]
    name = "orch-autoscale-e2e-a1"

    # The scheduler's side of a gang that does not fit: announce it to the autoscaler.
    ray_.request_resources(gang)

    def added_workers():
        workers = [n for n in ray_.nodes() if n.cpus >= 1]
        return workers if len(workers) >= len(gang) else None

    workers = wait_until(added_workers, timeout=120, interval=0.5,
                         what="the autoscaler to add 2 one-CPU nodes")

    # Reserve the gang on the new nodes, and run one task per member inside it.
    ray_.reserve(name, gang)
    wait_until(lambda: ray_.reservation_ready(name), timeout=60, interval=0.5,
               what="the gang's placement group to be placed")
    pg = get_placement_group(name)

    @ray.remote(num_cpus=1)
    def member(i: int) -> tuple[int, str]:
        return i, ray.get_runtime_context().get_node_id()

    ran = ray.get([member.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote(i)
                   for i in range(len(gang))], timeout=60)
    assert sorted(i for i, _ in ran) == [0, 1]
    assert {node for _, node in ran} <= {n.id for n in workers}, "the gang ran on the added nodes"

    # Done: release the gang and withdraw the request; the idle nodes leave.
    ray_.release(name)
    ray_.request_resources([])
    wait_until(lambda: _head_only(ray_, head.id), timeout=120, interval=0.5,
               what="the autoscaler to remove the idle worker nodes")


# The job the scheduler launches: a gang of two one-CPU tasks that report where they ran.
GANG_JOB = ("{python} -c \"import ray, sys; ray.init(); "
            "where = ray.remote(num_cpus=1)(lambda: ray.get_runtime_context().get_node_id()); "
            "print('GANG_NODES', ' '.join(sorted(ray.get([where.remote() for _ in range(2)])))); "
            "print('SPEC', sys.argv[1])\" {spec}")


def test_queued_job_that_does_not_fit_is_scaled_for_by_the_scheduler_runs_and_nodes_go_idle_away(
        ray_, tmp_path):
    from ray.job_submission import JobSubmissionClient

    from orchestrator.store import JobStore

    head = ray_.nodes()[0]
    spec = yaml.safe_load(open(os.path.join(ROOT, "jobs", "examples", "mlp_train.yaml")))
    spec["name"] = "autoscale-gang"
    spec["resources"].update(min_workers=2, max_workers=2, cpus_per_worker=1)
    spec["checkpoint"]["url"] = str(tmp_path / "ckpt")
    spec["dataset"]["url"] = str(tmp_path / "data")  # submit reads the dataset's manifest first
    from actors.data import write_shards
    from jobs.examples.datasets import classification
    write_shards(classification(256, in_dim=32), spec["dataset"]["url"], rows_per_shard=128, progress=False)
    (tmp_path / "gang.yaml").write_text(yaml.safe_dump(spec))
    store = str(tmp_path / "jobs.db")

    submitted = _cli("orchestrator", "submit", str(tmp_path / "gang.yaml"), "--store", store)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.split()[0]

    scheduler = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "scheduler", "--store", store, "--tick", "1",
         "--autoscale-node", "1", "--spec-dir", str(tmp_path / "specs"), "--entrypoint", GANG_JOB],
        cwd=ROOT, stdout=open(tmp_path / "scheduler.log", "w"), stderr=subprocess.STDOUT)
    try:
        def job():
            return JobStore(store).get(job_id)

        def finished():
            j = job()
            return j if j.terminal else None

        done = wait_until(finished, timeout=180, interval=1.0, what=f"job {job_id} to finish")
        log = (tmp_path / "scheduler.log").read_text()
        assert done.state == "succeeded", f"{done.state}: {done.reason}\n{log}"
        assert "asked the autoscaler for 2 bundle(s)" in log, log

        logs = JobSubmissionClient(os.environ["RAY_API_SERVER_ADDRESS"]).get_job_logs(done.submission_id)
        ran_on = next(line.split()[1:] for line in logs.splitlines() if line.startswith("GANG_NODES"))
        assert len(ran_on) == 2 and head.id not in ran_on, logs

        # Nothing queued any more: the scheduler withdraws its request and the idle nodes leave.
        wait_until(lambda: _head_only(ray_, head.id), timeout=120, interval=0.5,
                   what="the autoscaler to remove the idle worker nodes")
    finally:
        scheduler.send_signal(signal.SIGTERM)
        try:
            scheduler.wait(30)
        except subprocess.TimeoutExpired:
            scheduler.kill()
            scheduler.wait(10)
