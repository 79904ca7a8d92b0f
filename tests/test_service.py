"""The scheduler service against a real Ray head with its dashboard (Jobs API), started for this
module by ``ray start --head`` on free ports with token auth, as a user's cluster would be.

Most jobs are ``tests/fake_job.py`` (starts in a blink; behaviour set in the spec), so these tests
time the scheduler, not training. The last test runs real elastic DeepSpeed train jobs end to end:
a high-priority job preempts a low one, which checkpoints, requeues, resumes and finishes with
every sample seen exactly once.

The store is a SQLite file; the tests marked ``both_stores`` run on PostgreSQL too.
"""

from __future__ import annotations

import json
import os
import signal
import time
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, STORE_BACKENDS, free_ports, store_url_for, wait_until
from orchestrator.cli import main as cli
from orchestrator.policy import PolicyConfig, Quota
from orchestrator.service import Scheduler, SchedulerConfig
from orchestrator.spec import parse_spec
from orchestrator.store import JobStore

FAKE = f"{{python}} {os.path.join(ROOT, 'tests', 'fake_job.py')} {{spec}}"


# ---------------------------------------------------------------------------------------------
# a Ray head with a dashboard, owned by this module
# ---------------------------------------------------------------------------------------------
class RayHead:
    def __init__(self, root: str):
        self.root = root
        names = ("port", "dashboard-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                 "ray-client-server-port", "metrics-export-port", "runtime-env-agent-port",
                 "node-manager-port", "object-manager-port")
        self.ports = dict(zip(names, free_ports(len(names))))  # distinct: Ray refuses a repeat
        self.gcs = f"127.0.0.1:{self.ports['port']}"
        self.dashboard = f"http://127.0.0.1:{self.ports['dashboard-port']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = [os.path.join(os.path.dirname(sys.executable), "ray"), "start", "--head", "--block",
                "--num-cpus=2", "--num-gpus=0", f"--temp-dir={self.root}/ray",
                "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                "--dashboard-host=127.0.0.1", "--disable-usage-stats"]
        args += [f"--{k}={v}" for k, v in self.ports.items()]
        # Its own process group: teardown signals exactly the processes this fixture started.
        self.proc = subprocess.Popen(args, cwd=self.root, start_new_session=True,
                                     stdout=open(f"{self.root}/head.log", "w"), stderr=subprocess.STDOUT)
        wait_until(self._dashboard_up, 120, 0.5, "the Ray head's dashboard")

    def _dashboard_up(self) -> bool:
        assert self.proc.poll() is None, open(f"{self.root}/head.log").read()[-3000:]
        try:
            return urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2).status == 200
        except urllib.error.HTTPError as e:
            return e.code == 401  # up, and asking for the token

    def stop(self) -> None:
        if self.proc is None:
            return
        pgid = self.proc.pid
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        # Job drivers run in sessions of their own: end those whose command names our files.
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or int(pid) == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().decode(errors="replace")
            except OSError:
                continue
            if self.root in cmd:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass


def _ensure_token_auth() -> None:
    """Token auth on, as ``ray start``/``ray.init`` enable it: a token in ~/.ray/auth_token."""
    from ray._private.authentication.authentication_token_setup import (
        _enable_token_auth, generate_and_save_token)
    from ray._raylet import AuthenticationTokenLoader
    if not AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        generate_and_save_token()
        AuthenticationTokenLoader.instance().reset_cache()
    _enable_token_auth()  # RAY_AUTH_MODE=token here and in every child process


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    import ray
    if ray.is_initialized():
        ray.shutdown()  # the session Ray (conftest); `ray_local` restarts it lazily
    _ensure_token_auth()
    h = RayHead(str(tmp_path_factory.mktemp("head")))
    try:
        h.start()
        yield h
    finally:
        if ray.is_initialized():
            ray.shutdown()
        h.stop()


@pytest.fixture(scope="module")
def adapter(head):
    from orchestrator.ray_adapter import RayAdapter, RayMetrics
    a = RayAdapter(head.gcs)
    a.metrics = RayMetrics()
    return a


@pytest.fixture
def backend():
    """The store backend of ``env``; ``both_stores`` parametrizes it."""
    return "sqlite"


both_stores = pytest.mark.parametrize("backend", STORE_BACKENDS)


@pytest.fixture
def env(adapter, tmp_path, backend, request):
    """A fresh store, spec dir and scheduler for one test."""
    store = JobStore(store_url_for(backend, request, tmp_path))
    config = SchedulerConfig(policy=PolicyConfig(min_run_before_preempt_s=0), entrypoint=FAKE,
                             workdir=ROOT, spec_dir=str(tmp_path / "specs"), retry_backoff_s=1.0,
                             checkpoint_timeout_s=30, tick_s=0.2)
    return Env(store, adapter, config, tmp_path)


class Env:
    def __init__(self, store, adapter, config, tmp):
        self.store, self.adapter, self.config, self.tmp = store, adapter, config, tmp
        self.sched = Scheduler(store, adapter, config, metrics=adapter.metrics)
        self.log = tmp / "events.log"

    def spec(self, name, *, workers=1, priority="normal", team="t", retries=0, kind="train",
             time_limit=None, **kw):
        kw.setdefault("log", str(self.log))
        return parse_spec({
            "kind": "train", "name": name, "max_steps": 1,
            "scheduling": {"team": team, "priority": priority, "max_retries": retries,
                           "time_limit": time_limit},
            "resources": {"min_workers": workers, "max_workers": workers, "cpus_per_worker": 1},
            "model": {"factory": "jobs.examples.models:mlp", "kwargs": kw},
            "dataset": {"url": str(self.tmp / "data")},
            "deepspeed": {"micro_batch_size": 1, "global_batch_size": workers},
            "checkpoint": {"url": str(self.tmp / "ckpt" / name)}})

    def submit(self, *args, **kw) -> str:
        return self.store.submit(self.spec(*args, **kw))

    def until(self, pred, timeout=60, what="condition"):
        def step():
            self.sched.tick()
            return pred()
        return wait_until(step, timeout, 0.2, what)

    def state(self, jid) -> str:
        return self.store.get(jid).state

    def lines(self, name=None) -> list[list[str]]:
        if not self.log.exists():
            return []
        out = [ln.split(" ", 2) for ln in self.log.read_text().splitlines()]
        return [ln for ln in out if name is None or ln[0] == name]


# ---------------------------------------------------------------------------------------------
# jobs, retries, rejection, cancel
# ---------------------------------------------------------------------------------------------
def test_admitted_jobs_run_as_ray_jobs_that_show_in_ray_job_list(env, tmp_path):
    done = tmp_path / "go"
    a = env.submit("job-a", wait_for=str(done))
    b = env.submit("job-b", wait_for=str(done))
    env.until(lambda: env.state(a) == env.state(b) == "running", what="both running")
    ray_jobs = env.adapter.list_jobs()
    assert {f"orch-{a}-a0", f"orch-{b}-a0"} <= set(ray_jobs)
    assert ray_jobs[f"orch-{a}-a0"].metadata["orchestrator_job"] == a
    assert not env.adapter.reservations()  # gangs were handed to the jobs once they ran
    done.write_text("")
    env.until(lambda: env.state(a) == env.state(b) == "succeeded", what="both succeeded")
    assert [t.to_state for t in env.store.history(a)] == ["queued", "admitted", "running", "succeeded"]
    # the Ray CLI sees the same jobs (token auth from the environment, as for `ray job list`)
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list",
                          "--address", env.adapter.dashboard_url], capture_output=True, text=True,
                         timeout=60)
    assert f"orch-{a}-a0" in out.stdout, out.stderr[-2000:]


def test_failed_job_is_retried_with_exponential_backoff_then_succeeds(env):
    jid = env.submit("flaky", retries=3, fail_attempts=2)
    env.until(lambda: env.state(jid) == "succeeded", 90, "the third attempt to succeed")
    hist = env.store.history(jid)
    retries = [t for t in hist if t.reason.startswith("retry ")]
    assert [r.reason.split(":")[0] for r in retries] == ["retry 1/3 after 1s backoff",
                                                         "retry 2/3 after 2s backoff"]
    admitted = [t.at for t in hist if t.to_state == "admitted"]
    assert admitted[1] - retries[0].at >= 1.0 and admitted[2] - retries[1].at >= 2.0
    assert [ln[2] for ln in env.lines("flaky")] == ["start", "fail", "start", "fail", "start", "end"]
    assert env.store.get(jid).attempts == 2


def test_a_job_that_keeps_failing_fails_after_max_retries_with_the_reason(env):
    jid = env.submit("broken", retries=1, fail_attempts=99)
    env.until(lambda: env.state(jid) == "failed", 60, "the job to give up")
    job = env.store.get(jid)
    assert job.reason.startswith("gave up after 1 retry (max_retries=1)")
    assert "exit code 1" in job.reason or "failed" in job.reason
    assert job.attempts == 1 and len(env.lines("broken")) == 4


@pytest.mark.parametrize("code", [2, 3])
def test_a_job_whose_entrypoint_says_a_retry_would_fail_the_same_way_is_not_retried(env, code):
    """Exit 2 (bad spec) and 3 (a deterministic error before the first step) end the job at once,
    whatever max_retries allows; exit 1 is retried (the test above)."""
    jid = env.submit("doomed", retries=3, fail_attempts=99, fail_code=code)
    env.until(lambda: env.state(jid) == "failed", 60, "the job to fail")
    job = env.store.get(jid)
    assert job.reason.startswith(f"not retried (exit code {code}: it would fail the same way)"), job.reason
    assert job.attempts == 0 and [ln[2] for ln in env.lines("doomed")] == ["start", "fail"]
    assert not [t for t in env.store.history(jid) if t.reason.startswith("retry ")]


@both_stores
def test_a_spec_that_can_never_fit_the_cluster_is_rejected_with_the_reason(env):
    jid = env.submit("too-big", workers=3)
    env.sched.tick()
    job = env.store.get(jid)
    assert job.state == "failed" and job.reason.startswith("rejected: min_workers=3")
    assert "room for 2 such worker(s)" in job.reason
    assert not any(sid.startswith(f"orch-{jid}") for sid in env.adapter.list_jobs())


@both_stores
def test_cancel_stops_the_ray_job_and_cancelling_again_is_an_error(env, capsys):
    jid = env.submit("long", wait_for="/nonexistent/never")
    env.until(lambda: env.state(jid) == "running", what="running")
    sid = f"orch-{jid}-a0"
    store = env.store.url
    assert cli(["cancel", jid, "--store", store]) == 0
    env.until(lambda: env.adapter.list_jobs()[sid].status == "STOPPED", 60, "the Ray job to stop")
    assert cli(["cancel", jid, "--store", store]) == 1
    assert "already cancelled" in capsys.readouterr().err
    assert cli(["logs", jid, "--store", store, "--address", env.adapter.dashboard_url]) == 0
    assert "Running entrypoint" in capsys.readouterr().out


def test_a_preempted_job_checkpoints_before_it_is_stopped_then_resumes(env, tmp_path):
    """A low job fills the cluster; a high one arrives; the low one is asked to checkpoint, is
    stopped only once it has, requeues, and runs again when the high one is done."""
    go_low, go_high = tmp_path / "low-go", tmp_path / "high-go"
    low = env.submit("low", workers=2, priority="low", wait_for=str(go_low), honor_control=True)
    env.until(lambda: env.state(low) == "running", what="low running")
    high = env.submit("high", workers=2, priority="high", wait_for=str(go_high))
    env.until(lambda: env.state(high) == "running", 60, "high running")
    events = [ln[2] for ln in env.lines("low")]
    assert events[:2] == ["start", f"checkpointed orch-{low}-a0:preempt"]
    assert env.adapter.list_jobs()[f"orch-{low}-a0"].status == "STOPPED"
    assert env.store.get(low).state == "queued" and env.store.get(low).checkpoint_step == 7
    go_high.write_text("")
    go_low.write_text("")
    env.until(lambda: env.state(low) == env.state(high) == "succeeded", 60, "both to finish")
    hist = [(t.from_state, t.to_state) for t in env.store.history(low)]
    assert ("running", "preempted") in hist and ("preempted", "queued") in hist
    assert [ln[1] for ln in env.lines("low") if ln[2] == "start"] == [f"orch-{low}-a0", f"orch-{low}-a1"]


def test_a_job_past_its_time_limit_checkpoints_is_stopped_and_not_retried(env, tmp_path):
    """A run past ``scheduling.time_limit`` is asked for a checkpoint, stopped once it has one,
    and fails with the reason (retries left or not: another run would end the same way); a job
    that ends within its limit is left alone."""
    go = tmp_path / "go"
    capped = env.submit("capped", retries=2, time_limit=2, wait_for="/nonexistent/never",
                        honor_control=True)
    roomy = env.submit("roomy", time_limit=3600, wait_for=str(go))
    env.until(lambda: env.state(capped) == "failed", 60, "the capped job to stop at its limit")
    job = env.store.get(capped)
    assert job.reason.startswith("time limit reached: ran "), job.reason
    assert "limit 2s (scheduling.time_limit); checkpointed at step 7" in job.reason, job.reason
    assert job.checkpoint_step == 7 and job.attempts == 0
    sid = f"orch-{capped}-a0"
    assert [ln[2] for ln in env.lines("capped")][:2] == ["start", f"checkpointed {sid}:time-limit"]
    env.until(lambda: env.adapter.list_jobs()[sid].status == "STOPPED", 30, "the Ray job to stop")
    assert env.state(roomy) == "running"
    go.write_text("")
    env.until(lambda: env.state(roomy) == "succeeded", 60, "the roomy job to finish")
    assert not [t for t in env.store.history(capped) if t.reason.startswith("retry ")]


# ---------------------------------------------------------------------------------------------
# Ray is the truth for capacity and placement
# ---------------------------------------------------------------------------------------------
def test_an_actor_started_outside_the_scheduler_keeps_a_gang_waiting_until_it_is_killed(env, tmp_path):
    """Work the scheduler did not start counts: an actor holding one of the head's 2 CPUs keeps a
    2-worker gang (which fits the idle head) waiting, saying what is free; killing it admits it."""
    import ray

    @ray.remote(num_cpus=1)
    class Hog:
        def ready(self) -> bool:
            return True

    done = tmp_path / "go"
    hog = Hog.remote()
    try:
        ray.get(hog.ready.remote(), timeout=60)
        wait_until(lambda: [n.free_cpus for n in env.adapter.nodes()] == [1.0], 30, 0.2,
                   "Ray's view to show the actor's CPU in use")
        jid = env.submit("crowded", workers=2, wait_for=str(done))
        env.sched.tick()
        job = env.store.get(jid)
        assert job.state == "queued" and job.wait_reason == "gang_does_not_fit", (job.state, job.wait_reason)
        assert job.wait_detail.startswith("needs 2 x (1 CPU); largest free node 1 CPU (fits 1), "
                                          "free in all 1 CPU (fits 1)"), job.wait_detail
    finally:
        ray.kill(hog)
    env.until(lambda: env.state(jid) == "running", 60, "the gang to run once the actor is gone")
    done.write_text("")
    env.until(lambda: env.state(jid) == "succeeded", 60, "the job to finish")


def test_the_recorded_placement_is_the_one_ray_gave_the_placement_group(env, tmp_path):
    import ray
    from ray.util import placement_group_table
    from ray.util.placement_group import get_placement_group

    done = tmp_path / "go"
    jid = env.submit("placed", workers=2, wait_for=str(done))
    env.sched.tick()
    sid = f"orch-{jid}-a0"
    assert env.state(jid) == "admitted"
    # the group lives until a tick sees the Ray job running; none runs until this is read
    wait_until(lambda: env.adapter.reservation_ready(sid), 60, 0.2, "the gang's placement group")
    table = placement_group_table(get_placement_group(sid))
    ray_placement: dict[str, int] = {}
    for node in table["bundles_to_node_id"].values():
        ray_placement[node] = ray_placement.get(node, 0) + 1
    env.until(lambda: env.state(jid) == "running", 60, "the job to run")
    assert env.store.get(jid).placement == ray_placement
    assert set(ray_placement) <= {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert sum(ray_placement.values()) == 2
    done.write_text("")
    env.until(lambda: env.state(jid) == "succeeded", 60, "the job to finish")


# ---------------------------------------------------------------------------------------------
# serve jobs: stopping one deletes its Serve application and frees its replicas
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def serve_port(adapter):
    """A free port for Serve's HTTP proxy on the head; Serve is shut down after the test."""
    from ray import serve
    yield free_ports(1)[0]
    serve.shutdown()


def _serve_spec(tmp_path, name: str, port: int, cpus: float = 0.5):
    """One replica of a tiny mlp, routed at ``/<name>``."""
    from actors.served_model import save_served_model
    from jobs.examples.models import mlp
    kwargs = {"in_dim": 8, "hidden": 8, "num_classes": 2}
    ckpt = str(tmp_path / f"served-{name}")
    save_served_model(mlp(**kwargs), ckpt, "jobs.examples.models:mlp", kwargs)
    return parse_spec({"kind": "serve", "name": name, "checkpoint_url": ckpt,
                       "model": {"factory": "jobs.examples.models:mlp", "kwargs": kwargs},
                       "input_shape": [8], "http_port": port, "route_prefix": f"/{name}",
                       "replicas": {"min_replicas": 1, "max_replicas": 1, "cpus_per_replica": cpus}})


def _answers(spec) -> bool:
    import requests
    r = requests.post(f"http://127.0.0.1:{spec.http_port}/{spec.name}", json={"inputs": [[0.0] * 8]},
                      timeout=10)
    return r.status_code == 200


def _cpus() -> float:
    import ray
    return ray.available_resources().get("CPU", 0.0)


def test_stopping_a_serve_job_with_the_jobs_api_deletes_its_application_and_frees_its_cpu(
        adapter, serve_port, tmp_path):
    """``python -m jobs.serve`` submitted as the scheduler submits it; the Jobs API's stop_job
    (SIGTERM) makes it delete its application, and only it, and wait for its replica: the
    replica's CPU is free again, and another application on the same Serve keeps serving."""
    import shlex
    import time
    import uuid

    from ray import serve
    from jobs.serve import deploy
    spec = _serve_spec(tmp_path, "sigterm-app", serve_port)
    (tmp_path / "serve.json").write_text(json.dumps(spec.model_dump(mode="json")))
    sid = f"serve-stop-{uuid.uuid4().hex[:8]}"
    entry = (f"cd {shlex.quote(ROOT)} && exec {shlex.quote(sys.executable)} -m jobs.serve "
             f"{shlex.quote(str(tmp_path / 'serve.json'))}")
    assert adapter.submit(sid, entry, stop_grace_s=30)
    wait_until(lambda: _answers(spec), 180, 0.5, "the serve job to answer HTTP")
    bystander = _serve_spec(tmp_path, "bystander", serve_port, cpus=0.25)
    deploy(bystander, bystander.checkpoint_url)       # joins the job's Serve
    assert _answers(bystander) and adapter.serve_apps() >= {"sigterm-app", "bystander"}
    busy = _cpus()

    t0 = time.monotonic()
    assert adapter.jobs.stop_job(sid)                 # SIGTERM, SIGKILL 30 s later
    wait_until(lambda: adapter.list_jobs(sid)[sid].status == "STOPPED", 60, 0.2, "the job to stop")
    stopped_s = time.monotonic() - t0
    wait_until(lambda: _cpus() >= busy + 0.5 - 1e-6, 30, 0.2, "the replica's CPU to be free")
    assert "sigterm-app" not in serve.status().applications
    logs = adapter.logs(sid)
    # the job cleaned up itself, within the grace the submission gave it (29 s: 1 s short of it)
    assert "SIGTERM: deleted Serve application 'sigterm-app'; its replicas are gone" in logs, logs[-3000:]
    assert "of a 29s budget" in logs and stopped_s < 29, (stopped_s, logs[-2000:])
    assert _answers(bystander)                        # only its own application went
    adapter.delete_serve_app("bystander")
    assert "bystander" not in adapter.serve_apps()
    wait_until(lambda: _cpus() >= busy + 0.75 - 1e-6, 30, 0.2, "the bystander's CPU to be free")


def test_cancelling_a_serve_job_in_the_scheduler_frees_its_replicas(adapter, serve_port, tmp_path):
    """The scheduler runs a serve spec as a Ray job; ``orchestrator cancel`` stops it and its
    Serve application and replica are gone, the CPU they held free again."""
    store = JobStore(str(tmp_path / "jobs.db"))
    config = SchedulerConfig(policy=PolicyConfig(min_run_before_preempt_s=0), workdir=ROOT,
                             spec_dir=str(tmp_path / "specs"), tick_s=0.2)
    env = Env(store, adapter, config, tmp_path)
    spec = _serve_spec(tmp_path, "cancel-app", serve_port)
    free = _cpus()
    jid = store.submit(spec)
    env.until(lambda: env.state(jid) == "running" and _answers(spec), 180, "the serve job to answer")
    assert _cpus() <= free - 0.5 + 1e-6               # its replica holds half a CPU
    assert cli(["cancel", jid, "--store", store.url]) == 0
    sid = f"orch-{jid}-a0"
    env.until(lambda: adapter.list_jobs()[sid].status == "STOPPED", 60, "the Ray job to stop")
    env.until(lambda: "cancel-app" not in adapter.serve_apps() and _cpus() >= free - 1e-6, 30,
              "its application gone and its CPU free")
    assert "SIGTERM: deleted Serve application 'cancel-app'; its replicas are gone" in adapter.logs(sid)


# ---------------------------------------------------------------------------------------------
# durability: kill the scheduler mid-flight
# ---------------------------------------------------------------------------------------------
def _scheduler_proc(env, head, *extra: str):
    return subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "scheduler", "--store", env.store.url,
         "--address", head.gcs, "--tick", "0.3", "--entrypoint", FAKE, "--workdir", ROOT,
         "--spec-dir", env.config.spec_dir, "--retry-backoff", "1", *extra],
        cwd=ROOT, stdout=open(env.tmp / "sched.log", "a"), stderr=subprocess.STDOUT)


@both_stores
def test_killing_the_scheduler_mid_flight_loses_and_duplicates_no_job(env, head, tmp_path):
    go = tmp_path / "go"
    ids = [env.submit(f"job-{i}", wait_for=str(go)) for i in range(4)]  # 2 fit at a time
    sched = _scheduler_proc(env, head)
    try:
        wait_until(lambda: sum(env.state(j) == "running" for j in ids) == 2, 90, 0.2,
                   "two jobs running under the first scheduler")
        sched.send_signal(signal.SIGKILL)
        sched.wait(10)
        go.write_text("")   # the running jobs finish while no scheduler is watching
        wait_until(lambda: sum(ln[2] == "end" for ln in env.lines()) == 2, 60, 0.2, "two ends")
        sched = _scheduler_proc(env, head)
        wait_until(lambda: all(env.state(j) == "succeeded" for j in ids), 120, 0.3,
                   "every job to succeed under the second scheduler")
    finally:
        sched.terminate()
        sched.wait(20)
    starts = [ln[0] for ln in env.lines() if ln[2] == "start"]
    assert sorted(starts) == [f"job-{i}" for i in range(4)]  # each ran exactly once
    ray_ids = [sid for sid in env.adapter.list_jobs() if any(sid.startswith(f"orch-{j}-") for j in ids)]
    assert sorted(ray_ids) == sorted(f"orch-{j}-a0" for j in ids)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["postgres"])
def test_a_standby_scheduler_takes_over_from_a_killed_active_one_within_two_lease_periods(env, head, tmp_path):
    """Two schedulers on one PostgreSQL store: one active by the store's lease, one standing by.
    SIGKILL the active one while jobs run and queue: the standby takes over within two lease
    periods, and no job is lost, run twice or restarted."""
    ttl = 2.0
    go = tmp_path / "go"
    ids = [env.submit(f"ha-{i}", wait_for=str(go)) for i in range(4)]  # 2 fit at a time
    procs = {n: _scheduler_proc(env, head, "--id", n, "--lease-ttl", str(ttl)) for n in ("A", "B")}
    try:
        wait_until(lambda: sum(env.state(j) == "running" for j in ids) == 2, 90, 0.2,
                   "two jobs running under the active scheduler")
        first = env.store.lease("scheduler")
        assert first.holder in procs and all(p.poll() is None for p in procs.values())  # the other stands by
        procs[first.holder].send_signal(signal.SIGKILL)
        procs[first.holder].wait(10)
        killed = time.monotonic()
        after = wait_until(lambda: (lambda le: le if le.holder != first.holder else None)(
            env.store.lease("scheduler")), 4 * ttl + 10, 0.1, "the standby to take the lease")
        took = time.monotonic() - killed
        assert after.epoch == first.epoch + 1 and took <= 2 * ttl + 1.0, took
        go.write_text("")   # the running jobs finish; the queued two run under the new scheduler
        wait_until(lambda: all(env.state(j) == "succeeded" for j in ids), 120, 0.3,
                   "every job to succeed under the new active scheduler")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()
                p.wait(20)
    starts = [ln[0] for ln in env.lines() if ln[2] == "start"]
    assert sorted(starts) == [f"ha-{i}" for i in range(4)]   # each ran exactly once
    assert [env.store.get(j).attempts for j in ids] == [0] * 4   # none restarted
    ray_ids = [sid for sid in env.adapter.list_jobs() if any(sid.startswith(f"orch-{j}-") for j in ids)]
    assert sorted(ray_ids) == sorted(f"orch-{j}-a0" for j in ids)
    log = (tmp_path / "sched.log").read_text()
    assert "standing by: the active scheduler is" in log and f"active scheduler {after.holder}" in log


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------
def test_pipeline_runs_stages_in_order_and_a_failed_stage_stops_its_dependants(env, tmp_path):
    def stage(name, deps, **kw):
        return {"name": name, "depends_on": deps,
                "spec": env.spec(f"p-{name}", **kw).model_dump(mode="json")}
    ck = str(tmp_path / "ckpt-prep")
    spec = parse_spec({"kind": "pipeline", "name": "pipe", "stages": [
        stage("evaluate", ["train"], fail_attempts=1),
        stage("train", ["prep"], checkpoint=str(tmp_path / "ckpt-train")),
        stage("prep", [], checkpoint=ck),
        stage("serve", ["evaluate"]),
        stage("report", ["train"])]})
    pid = env.store.submit(spec)
    env.until(lambda: env.state(pid) in ("succeeded", "failed"), 90, "the pipeline to finish")
    stages = {s.stage: s for s in env.store.list(parent_id=pid)}
    assert {n: s.state for n, s in stages.items()} == {
        "prep": "succeeded", "train": "succeeded", "evaluate": "failed", "serve": "failed",
        "report": "succeeded"}
    assert stages["serve"].reason.startswith("not run: upstream stage 'evaluate' failed (gave up")
    parent = env.store.get(pid)
    assert parent.reason.startswith("stage 'evaluate' failed: gave up after 0 retries")
    order = [ln[0] for ln in env.lines() if ln[2] == "start"]
    assert order.index("p-prep") < order.index("p-train") < min(order.index("p-evaluate"), order.index("p-report"))
    assert "p-serve" not in order
    # each stage was handed its upstream stage's checkpoint
    up = {ln[0]: json.loads(ln[2].split(" ", 1)[1]) for ln in env.lines() if ln[2].startswith("upstream")}
    assert up["p-train"] == {"prep": ck}
    assert up["p-report"] == {"train": str(tmp_path / "ckpt-train")}
    assert stages["prep"].checkpoint_url == ck


# ---------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------
def test_metrics_reach_the_ray_metrics_endpoint(env, head):
    env.sched.tick()  # at least one tick reports queue depth
    url = f"http://127.0.0.1:{head.ports['metrics-export-port']}/metrics"

    def scraped():
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        return all(m in text for m in ("orchestrator_queue_depth", "orchestrator_admissions",
                                       "orchestrator_wait_seconds", "orchestrator_jobs_waiting",
                                       'reason="behind_reserved_head"'))  # every code, every tick
    wait_until(scraped, 90, 2.0, "scheduler metrics on the node's Prometheus endpoint")


# ---------------------------------------------------------------------------------------------
# end to end: real elastic DeepSpeed train jobs
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_high_priority_job_preempts_a_low_one_which_resumes_and_sees_every_sample_once(
        adapter, tmp_path):
    """Two low-priority elastic train jobs (1..2 workers, each team's quota is one CPU) fill the
    2-CPU cluster. A high-priority job arrives: the low job with the freshest checkpoint is asked
    to checkpoint, stopped and requeued; the high job runs; the low job resumes from its
    checkpoint. Both low jobs finish every step with exactly the samples the pure data order
    assigns to it, none repeated or skipped across the preemption."""
    from actors.data import global_step_sample_ids, write_shards
    from actors.trainer.trainer import read_result
    from jobs.examples.datasets import classification
    N, G, MICRO = 1024, 32, 8  # noqa: N806 - 32 steps per epoch

    def assert_exact_sample_order(history):
        """Every global step saw exactly the samples the pure data order assigns to it."""
        for h in history:
            ids = global_step_sample_ids(N, 11, 0, global_batch_size=G, step=h["step"] - 1).astype("int64")
            assert (h["ids_sum"], h["ids_sqsum"]) == (int(ids.sum()), int((ids * ids).sum())), h

    STEPS = 300  # noqa: N806 - at <= 20 steps/s, >= 15 s of training per low job
    data = str(tmp_path / "data")
    write_shards(classification(N, seed=5), data, rows_per_shard=128, progress=False)

    def spec(name, team, priority, steps, max_w):
        return parse_spec({
            "kind": "train", "name": name, "max_steps": steps, "log_interval": 50, "seed": 3,
            "scheduling": {"team": team, "priority": priority, "max_retries": 0},
            "resources": {"min_workers": 1, "max_workers": max_w, "cpus_per_worker": 1},
            "model": {"factory": "jobs.examples.models:mlp",
                      "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 4}},
            "dataset": {"url": data, "shuffle": {"seed": 11}},
            "deepspeed": {"zero_stage": 1, "micro_batch_size": MICRO, "global_batch_size": G},
            "checkpoint": {"url": str(tmp_path / "ckpt" / name), "interval_steps": 50,
                           "keep_last": 2}})

    store = JobStore(str(tmp_path / "jobs.db"))
    config = SchedulerConfig(
        policy=PolicyConfig(min_run_before_preempt_s=0),
        quotas={"vision": Quota(cpus=1), "nlp": Quota(cpus=1)},
        # at most 20 steps/s: the low jobs are still training when the high one arrives
        entrypoint="{python} -m jobs.{kind} {spec} --option min_step_time_s=0.05",
        workdir=ROOT, spec_dir=str(tmp_path / "specs"), checkpoint_timeout_s=60,
        checkpoint_poll_s=0.5, tick_s=0.3)
    env = Env(store, adapter, config, tmp_path)
    lows = {store.submit(spec("low-vision", "vision", "low", STEPS, 2)): "low-vision",
            store.submit(spec("low-nlp", "nlp", "low", STEPS, 2)): "low-nlp"}

    def checkpointed(jid):
        env.sched.tick()
        return env.state(jid) == "running" and (store.get(jid).checkpoint_step or 0) >= 50
    wait_until(lambda: all(checkpointed(j) for j in lows), 300, 0.3, "both low jobs checkpointing")
    assert [store.get(j).workers for j in lows] == [1, 1]
    high = store.submit(spec("urgent", "prod", "high", 40, 1))
    env.until(lambda: any(env.state(j) == "preempted" for j in lows), 60, "a low job preempted")
    victim = next(j for j in lows if env.state(j) == "preempted")
    other = next(j for j in lows if j != victim)
    env.until(lambda: env.state(high) in ("running", "succeeded"), 180, "the high job to start")
    assert env.state(other) == "running"          # only what was needed was preempted
    env.until(lambda: all(env.state(j) == "succeeded" for j in (*lows, high)), 420,
              "every job to finish")

    hist = [(t.from_state, t.to_state) for t in store.history(victim)]
    assert hist == [(None, "queued"), ("queued", "admitted"), ("admitted", "running"),
                    ("running", "preempted"), ("preempted", "queued"), ("queued", "admitted"),
                    ("admitted", "running"), ("running", "succeeded")]
    preempt_reason = next(t.reason for t in store.history(victim) if t.to_state == "preempted")
    assert f"for {high}" in preempt_reason
    ray_jobs = adapter.list_jobs()
    assert ray_jobs[f"orch-{victim}-a0"].status == "STOPPED"
    assert ray_jobs[f"orch-{victim}-a1"].status == "SUCCEEDED"
    resumed = adapter.logs(f"orch-{victim}-a1")
    assert "resumed from" in resumed and "checkpointed at step" in adapter.logs(f"orch-{victim}-a0")
    for jid in lows:
        result = read_result(spec(lows[jid], "x", "low", STEPS, 2))
        assert [h["step"] for h in result.history] == list(range(1, STEPS + 1))
        assert_exact_sample_order(result.history)
        assert set(result.world_sizes) == {1}


@pytest.mark.slow
def test_ray_job_submit_runs_a_train_spec(head, tmp_path):
    """The README's `ray job submit --working-dir . -- python -m jobs.train SPEC`, without the
    scheduler: the checkout is uploaded as the working dir; nothing is installed on the workers."""
    from actors.data import write_shards
    from jobs.examples.datasets import classification
    data, ckpt = tmp_path / "data", tmp_path / "ckpt"
    write_shards(classification(1024, seed=1), str(data), rows_per_shard=256, progress=False)
    readme = open(os.path.join(ROOT, "README.md")).read()
    cmd = next(line.split("  #")[0].strip() for line in readme.splitlines()
               if line.startswith("ray job submit --working-dir ."))
    argv = cmd.split()
    sep = argv.index("--")
    entry = [sys.executable if a == "python" else a for a in argv[sep + 1:]]
    entry += ["--set", f"dataset.url={data}", "--set", f"checkpoint.url={ckpt}",
              "--set", "max_steps=4", "--set", "checkpoint.interval_steps=2"]
    submit = [os.path.join(os.path.dirname(sys.executable), "ray"), *argv[1:sep],
              "--address", head.dashboard, "--", *entry]
    proc = subprocess.run(submit, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    summary = json.loads((ckpt / "summary.json").read_text())
    assert summary["final_step"] == 4
