"""The scheduler service's logic against an in-memory stand-in for Ray (no Ray, milliseconds):
crash recovery without duplicates, retry backoff, shrink through the trainer's worker cap,
admission timeouts, strays, autoscaler requests, the control protocol and pipeline stage plumbing.
``tests/test_service.py`` runs the same service against a real Ray head."""

from __future__ import annotations

import json

import pytest

from orchestrator.control import JobControl, latest_commit
from orchestrator import pipeline as pipemod
from orchestrator.cli import main as cli
from orchestrator.policy import JobView, Node, PolicyConfig, Quota
from orchestrator.ray_adapter import RayAdapter, RayJob, RayLink
from orchestrator.service import Scheduler, SchedulerConfig, free_capacity, parse_submission_id
from orchestrator.spec import parse_spec
from orchestrator.store import JobStore


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeRay:
    """The RayAdapter surface, in memory. ``place=False`` leaves placement groups pending;
    ``placed_on`` names the node it puts every gang on (default: the first)."""

    def __init__(self, nodes=(("n0", 4.0),), place: bool = True):
        self._nodes = [Node(n, c) for n, c in nodes]
        self.place = place
        self.placed_on: str | None = None
        self.jobs: dict[str, RayJob] = {}
        self.entrypoints: dict[str, str] = {}
        self.submits: list[str] = []
        self.stops: list[str] = []
        self.pgs: dict[str, list] = {}
        self.requests: list[list] = []
        self.crash_on_submit = False
        self.grace: dict[str, float | None] = {}
        self.apps: set[str] = set()          # Serve applications on the cluster
        self.deleted_apps: list[str] = []

    def nodes(self):
        return list(self._nodes)

    def list_jobs(self):
        return dict(self.jobs)

    def submit(self, sid, entrypoint, *, runtime_env=None, metadata=None, stop_grace_s=None):
        if self.crash_on_submit:
            self.crash_on_submit = False
            raise SystemExit("scheduler killed while submitting")
        self.submits.append(sid)
        self.grace[sid] = stop_grace_s
        if sid in self.jobs:
            return False
        self.jobs[sid] = RayJob(sid, "PENDING", "", dict(metadata or {}))
        self.entrypoints[sid] = entrypoint
        return True

    def set(self, sid, status, message=""):
        self.jobs[sid] = RayJob(sid, status, message)

    def stop(self, sid):
        self.stops.append(sid)
        if sid in self.jobs and self.jobs[sid].live:
            self.jobs[sid] = RayJob(sid, "STOPPED")
            return True
        return False

    def logs(self, sid):
        return ""

    def reserve(self, name, bundles):
        self.pgs.setdefault(name, bundles)

    def reservation_ready(self, name):
        return (self.place if name in self.pgs else None)

    def reservation_placement(self, name):
        if not (self.place and name in self.pgs):
            return None
        return {self.placed_on or self._nodes[0].id: len(self.pgs[name])}

    def release(self, name):
        self.pgs.pop(name, None)

    def reservations(self):
        return sorted(self.pgs)

    def request_resources(self, bundles):
        self.requests.append(bundles)

    def serve_apps(self):
        return set(self.apps)

    def delete_serve_app(self, name):
        self.deleted_apps.append(name)
        self.apps.discard(name)


def train_spec(tmp_path, name, *, lo=1, hi=1, priority="normal", retries=0, team="t", batch=4):
    return parse_spec({
        "kind": "train", "name": name, "max_steps": 10,
        "scheduling": {"team": team, "priority": priority, "max_retries": retries},
        "resources": {"min_workers": lo, "max_workers": hi, "cpus_per_worker": 1},
        "model": {"factory": "jobs.examples.models:mlp"},
        "dataset": {"url": str(tmp_path / "data")},
        "deepspeed": {"micro_batch_size": 1, "global_batch_size": batch},
        "checkpoint": {"url": str(tmp_path / "ckpt" / name)}})


@pytest.fixture
def world(tmp_path, store_url):
    """A scheduler's world on each store backend (SQLite, PostgreSQL): clock, store, fake Ray."""
    clock = Clock()
    store = JobStore(store_url, clock=clock)
    ray = FakeRay()
    config = SchedulerConfig(policy=PolicyConfig(min_run_before_preempt_s=0),
                             spec_dir=str(tmp_path / "specs"), retry_backoff_s=10,
                             admission_timeout_s=60, workdir=str(tmp_path))

    def scheduler():
        return Scheduler(store, ray, config, clock=clock)
    return clock, store, ray, scheduler


def run_ray_jobs(ray):
    for sid, j in list(ray.jobs.items()):
        if j.status == "PENDING":
            ray.set(sid, "RUNNING")


def running(scheduler, ray):
    """A scheduler that has admitted the queued jobs, seen Ray start them, and noted it."""
    s = scheduler()
    s.tick()
    run_ray_jobs(ray)
    s.tick()
    return s


# ---------------------------------------------------------------------------------------------
def test_a_scheduler_killed_between_admission_and_submission_submits_exactly_once(world, tmp_path):
    clock, store, ray, scheduler = world
    jid = store.submit(train_spec(tmp_path, "a"))
    ray.crash_on_submit = True
    with pytest.raises(SystemExit):
        scheduler().tick()                      # dies after admitting, before Ray has the job
    assert store.get(jid).state == "admitted" and ray.jobs == {}
    for _ in range(3):                          # restarted (several times): one Ray job, ever
        scheduler().tick()
    assert ray.submits == [f"orch-{jid}-a0"] and list(ray.jobs) == [f"orch-{jid}-a0"]
    run_ray_jobs(ray)
    scheduler().tick()
    assert store.get(jid).state == "running" and ray.pgs == {}  # gang handed to the job
    ray.set(f"orch-{jid}-a0", "SUCCEEDED")
    scheduler().tick()
    scheduler().tick()
    assert store.get(jid).state == "succeeded" and ray.submits == [f"orch-{jid}-a0"]


def test_the_submitted_entrypoint_runs_the_job_kind_on_its_resolved_spec(world, tmp_path):
    clock, store, ray, scheduler = world
    jid = store.submit(train_spec(tmp_path, "a"))
    scheduler().tick()
    entry = ray.entrypoints[f"orch-{jid}-a0"]
    assert entry.startswith(f"cd {tmp_path} && export PYTHONPATH=")
    assert f"-m jobs.train {tmp_path}/specs/orch-{jid}-a0.json" in entry
    written = json.loads((tmp_path / "specs" / f"orch-{jid}-a0.json").read_text())
    assert written["name"] == "a" and written["kind"] == "train"
    assert JobControl(str(tmp_path / "ckpt" / "a")).max_workers() == 1  # capped at its admission


def test_failed_job_waits_out_its_backoff_before_it_is_admitted_again(world, tmp_path):
    clock, store, ray, scheduler = world
    jid = store.submit(train_spec(tmp_path, "a", retries=2))
    s = scheduler()
    s.tick()
    ray.set(f"orch-{jid}-a0", "FAILED", "exit code 1")
    s.tick()
    job = store.get(jid)
    assert job.state == "queued" and job.attempts == 1
    assert job.reason.startswith("retry 1/2 after 10s backoff: Ray job")
    clock.t += 9
    s.tick()
    assert store.get(jid).state == "queued"
    clock.t += 1.5
    s.tick()
    assert store.get(jid).state == "admitted" and f"orch-{jid}-a1" in ray.jobs
    ray.set(f"orch-{jid}-a1", "FAILED", "again")
    s.tick()
    clock.t += 15                                 # second backoff is 20s
    s.tick()
    assert store.get(jid).state == "queued"
    clock.t += 6
    s.tick()
    ray.set(f"orch-{jid}-a2", "FAILED", "and again")
    s.tick()
    job = store.get(jid)
    assert job.state == "failed" and job.reason.startswith("gave up after 2 retries (max_retries=2)")


def test_a_lost_ray_job_is_retried_and_its_old_attempt_stopped_if_it_reappears(world, tmp_path):
    clock, store, ray, scheduler = world
    jid = store.submit(train_spec(tmp_path, "a", retries=1))
    s = running(scheduler, ray)
    old = ray.jobs.pop(f"orch-{jid}-a0")         # e.g. the head node restarted
    s.tick()
    assert store.get(jid).state == "queued" and "Ray has no job" in store.get(jid).reason
    ray.jobs[old.submission_id] = old            # it was only hidden: stop it, do not run twice
    s.tick()
    assert ray.jobs[old.submission_id].status == "STOPPED"


def test_cancelled_job_has_its_ray_job_stopped_and_its_gang_released(world, tmp_path):
    clock, store, ray, scheduler = world
    ray.place = False
    jid = store.submit(train_spec(tmp_path, "a"))
    other = store.submit(train_spec(tmp_path, "b"))
    s = scheduler()
    s.tick()
    assert sorted(ray.pgs) == sorted([f"orch-{jid}-a0", f"orch-{other}-a0"])
    store.cancel(jid)
    s.tick()
    assert sorted(ray.pgs) == [f"orch-{other}-a0"]
    ray.place = True
    s.tick()
    run_ray_jobs(ray)
    store.cancel(other)
    s.tick()
    assert ray.jobs[f"orch-{other}-a0"].status == "STOPPED"


def test_a_gang_ray_cannot_place_in_time_is_requeued(world, tmp_path):
    clock, store, ray, scheduler = world
    ray.place = False
    jid = store.submit(train_spec(tmp_path, "a"))
    s = scheduler()
    s.tick()
    clock.t += 61
    s.tick()
    job = store.get(jid)
    assert job.state in ("queued", "admitted") and ray.jobs == {}
    assert any("did not place its gang" in t.reason for t in store.history(jid))


def test_the_recorded_placement_is_where_ray_put_the_gang_not_where_the_policy_planned_it(world, tmp_path):
    clock, store, ray, scheduler = world
    ray._nodes = [Node("n0", 4.0), Node("n1", 4.0)]
    ray.place = False
    jid = store.submit(train_spec(tmp_path, "a", lo=2, hi=2, batch=2))
    s = scheduler()
    s.tick()
    planned = store.get(jid).placement
    assert store.get(jid).state == "admitted" and sum(planned.values()) == 2 and len(planned) == 1
    other = "n1" if "n0" in planned else "n0"
    ray.place, ray.placed_on = True, other  # Ray packs the gang on the node the policy did not pick
    events = s.tick()
    assert store.get(jid).placement == {other: 2} and list(ray.jobs) == [f"orch-{jid}-a0"]
    assert any(e.startswith(f"{jid} placed by Ray on {other} x2") for e in events), events


def test_a_gang_ray_has_not_placed_yet_is_booked_once_beside_work_outside_the_scheduler(world, tmp_path):
    clock, store, ray, scheduler = world
    ray._nodes = [Node("n0", 4.0, free_cpus=2.0)]  # Ray: an actor not ours holds 2 of the 4 CPUs
    ray.place = False
    a = store.submit(train_spec(tmp_path, "a", lo=2, hi=2, batch=2))
    s = scheduler()
    s.tick()
    assert store.get(a).state == "admitted"
    b = store.submit(train_spec(tmp_path, "b"))
    s.tick()  # a's gang is booked, not in Ray's view yet: the actor's 2 CPUs are still outside
    job = store.get(b)
    assert (job.state, job.wait_reason) == ("queued", "gang_does_not_fit")
    assert "free in all 0 CPU" in job.wait_detail, job.wait_detail
    ray.place = True
    s.tick()  # placed and submitted after Ray's view was read: that view does not show it yet
    assert store.get(a).placement == {"n0": 2} and f"orch-{a}-a0" in ray.jobs
    assert store.get(b).state == "queued"
    ray._nodes = [Node("n0", 4.0, free_cpus=0.0)]  # Ray's view now counts a's bundles too
    s.tick()
    assert store.get(b).state == "queued"


def test_free_capacity_counts_work_outside_the_scheduler_once_and_the_schedulers_own_never_twice():
    """Ray's view (``free_*``: what Ray reports available, everything counted) reconciled with
    the store's bookings, on a node of 8 CPUs and 2 GPUs where others use 3 CPUs and 1 GPU."""
    def job(jid, workers, cpus=1.0, gpus=0.0):
        return JobView(jid, 100, state="running", workers=workers, placement={"n0": workers},
                       cpus_per_worker=cpus, gpus_per_worker=gpus)

    def free(ray_free_cpus, ray_free_gpus, running, unplaced=frozenset()):
        idle = Node("n1", 4.0)  # nobody uses it: all free
        nodes = free_capacity([Node("n0", 8.0, 2.0, ray_free_cpus, ray_free_gpus), idle], running,
                              set(unplaced))
        assert nodes[1] == Node("n1", 4.0, 0.0, 4.0, 0.0)
        return nodes[0].free_cpus, nodes[0].free_gpus

    assert free(5.0, 1.0, []) == (5.0, 1.0)                  # outside work alone
    a = job("a", 2, gpus=0.5)                               # ours, placed: Ray counts it too
    assert free(3.0, 0.0, [a]) == (3.0, 0.0)
    b = job("b", 2)                                         # just admitted: Ray has not placed it
    assert free(3.0, 0.0, [a, b], unplaced={"b"}) == (1.0, 0.0)
    assert free(1.0, 0.0, [a, b]) == (1.0, 0.0)             # placed: the same figure, not -2
    assert free(8.0, 2.0, [a, b], unplaced={"b"}) == (4.0, 1.0)  # nothing outside: bookings alone
    assert free(2.0, 1.0, [job("c", 2)]) == (2.0, 1.0)      # Ray use beyond its booking is counted
    assert free(0.0, 0.0, []) == (0.0, 0.0)                 # a node Ray reports nothing free on


def test_shrink_asks_for_a_checkpoint_then_caps_the_elastic_job(world, tmp_path):
    clock, store, ray, scheduler = world
    low = store.submit(train_spec(tmp_path, "low", lo=1, hi=4, priority="low"))
    s = running(scheduler, ray)
    assert store.get(low).workers == 4
    high = store.submit(train_spec(tmp_path, "high", lo=2, hi=2, priority="high"))
    s.tick()
    job = store.get(low)
    assert job.state == "running" and job.workers == 1 and job.reason.startswith("shrinking to 1")
    control = JobControl(str(tmp_path / "ckpt" / "low"), clock=clock)
    req = control.pending_request()
    assert req and req.startswith(f"orch-{low}-a0:resize-1")
    assert control.max_workers() is None         # not before the checkpoint is saved...
    control.mark_served(req, 30)
    assert control.max_workers() == 1            # ...then Ray Train resizes to the cap
    s.tick()
    assert store.get(high).state == "admitted"   # its gang waits for the freed CPUs


def test_preempted_train_job_is_stopped_only_after_it_checkpoints_or_times_out(world, tmp_path):
    clock, store, ray, scheduler = world
    low = store.submit(train_spec(tmp_path, "low", lo=4, hi=4, priority="low"))
    s = running(scheduler, ray)
    store.submit(train_spec(tmp_path, "high", lo=2, hi=2, priority="high"))
    s.tick()
    assert store.get(low).state == "preempted" and ray.stops == []
    s.tick()
    assert ray.stops == []                        # waiting for the checkpoint
    clock.t += s.config.checkpoint_timeout_s + 1
    s.tick()
    assert ray.jobs[f"orch-{low}-a0"].status == "STOPPED"
    s.tick()
    assert store.get(low).state == "queued" and store.get(low).attempts == 1


def serve_job_spec(name="srv", *, replicas=1, priority="normal", retries=0):
    return parse_spec({"kind": "serve", "name": name, "checkpoint_url": "/nowhere",
                       "model": {"factory": "jobs.examples.models:mlp"}, "input_shape": [32],
                       "scheduling": {"priority": priority, "max_retries": retries},
                       "replicas": {"min_replicas": replicas, "max_replicas": replicas,
                                    "cpus_per_replica": 0.5}})


def test_a_cancelled_serve_job_gets_a_stop_grace_and_leaves_no_serve_application(world):
    """jobs.serve deletes its own application on SIGTERM; where one is left (its driver was
    killed first), the scheduler deletes it once Ray reports the job stopped."""
    clock, store, ray, scheduler = world
    jid = store.submit(serve_job_spec())
    s = running(scheduler, ray)
    sid = f"orch-{jid}-a0"
    assert ray.grace[sid] == s.config.serve_stop_grace_s == 30
    ray.apps |= {"srv", "someone-elses"}
    s.tick()
    assert ray.deleted_apps == []                  # running: its application stays
    store.cancel(jid)
    s.tick()                                       # stops the Ray job
    assert ray.jobs[sid].status == "STOPPED" and ray.deleted_apps == []
    events = s.tick()
    assert ray.deleted_apps == ["srv"] and ray.apps == {"someone-elses"}
    assert f"deleted Serve application 'srv' that Ray job {sid} left behind" in events
    ray.apps.add("srv")                            # checked once: a later app of that name stays
    s.tick()
    assert ray.deleted_apps == ["srv"]


def test_a_preempted_serve_jobs_application_is_deleted_but_not_its_next_attempts(world, tmp_path):
    clock, store, ray, scheduler = world
    ray._nodes = [Node("n0", 1.0)]
    low = store.submit(serve_job_spec(replicas=2, priority="low"))
    s = running(scheduler, ray)
    ray.apps.add("srv")
    high = store.submit(train_spec(tmp_path, "high", priority="high"))
    s.tick()                                       # preempts the serve job: Ray stops it
    assert store.get(low).state == "preempted" and ray.jobs[f"orch-{low}-a0"].status == "STOPPED"
    s.tick()                                       # stopped: its application goes, it requeues
    assert ray.deleted_apps == ["srv"] and store.get(low).state == "queued"
    store.cancel(high)
    s.tick()
    run_ray_jobs(ray)
    s.tick()
    assert store.get(low).state == "running" and store.get(low).attempts == 1
    ray.apps.add("srv")                            # the next attempt serves the same name
    ray.set(f"orch-{low}-a0", "FAILED")            # an old attempt reported again (restart)
    s2 = scheduler()                               # a new scheduler process checks it again
    s2.tick()
    assert ray.deleted_apps == ["srv"] and "srv" in ray.apps


def test_blocked_gangs_are_announced_to_the_autoscaler_and_never_fitting_ones_rejected(world, tmp_path):
    clock, store, ray, scheduler = world
    s = scheduler()
    s.config.autoscale_shapes = ((8.0, 0.0),)
    big = store.submit(train_spec(tmp_path, "big", lo=6, hi=6, batch=6))
    huge = parse_spec({**train_spec(tmp_path, "huge").model_dump(mode="json"),
                       "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 16}})
    hid = store.submit(huge)
    s.tick()
    assert store.get(big).state == "queued"
    assert ray.requests[-1] == [{"CPU": 1.0}] * 6
    assert store.get(hid).state == "failed" and "fits no node" in store.get(hid).reason
    store.cancel(big)
    s.tick()
    assert ray.requests[-1] == []                 # nothing blocked any more: request withdrawn


class Recorder:
    """The scheduler's Metrics callbacks, remembered."""

    def __init__(self):
        self.waiting: list[dict[str, int]] = []

    def on_tick(self, queued, running):
        pass

    def on_admit(self, priority, wait_s):
        pass

    def on_preempt(self, priority):
        pass

    def on_waiting(self, by_reason):
        self.waiting.append(dict(by_reason))

    def on_leader(self, holder, active):
        pass


def test_a_quota_held_job_shows_why_in_queue_and_status_until_it_is_admitted(world, tmp_path, capsys):
    clock, store, ray, scheduler = world
    s = scheduler()
    s.config.quotas = {"t": Quota(cpus=2)}
    s.metrics = Recorder()
    writes = []
    set_waits = store.set_waits
    store.set_waits = lambda w: writes.append(w) or set_waits(w)
    a = store.submit(train_spec(tmp_path, "a", lo=2, hi=2))
    b = store.submit(train_spec(tmp_path, "b", lo=2, hi=2))
    s.tick()
    detail = "team 't' CPU quota 2/2 in use, its gang needs 2 more"
    job = store.get(b)
    assert (job.state, job.wait_reason, job.wait_detail, job.wait_since) == ("queued", "quota", detail, clock.t)
    assert s.metrics.waiting[-1] == {"quota": 1, "gang_does_not_fit": 0, "autoscaler": 0,
                                     "behind_reserved_head": 0, "backoff": 0, "never_fits": 0, "upstream": 0}
    db = store.url
    assert cli(["queue", "--store", db]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "WAITING-FOR" in out[0].split()
    [row] = [ln for ln in out if ln.startswith(b)]
    assert "quota: team 't' CPU quota 2/2 in use" in row
    [row] = [ln for ln in out if ln.startswith(a)]
    assert row.split()[8] == "-"                  # admitted: waits for nothing
    assert cli(["status", b, "--store", db]) == 0
    assert "waiting for: quota since " in (out := capsys.readouterr().out) and detail in out
    assert cli(["status", b, "--store", db, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["wait_reason"], d["wait_detail"], d["wait_since"]) == ("quota", detail, clock.t)
    clock.t += 5
    s.tick()
    s.tick()                                      # nothing changed: nothing written
    assert writes[-2:] == [{}, {}] and store.get(b).wait_since == clock.t - 5
    run_ray_jobs(ray)
    s.tick()
    ray.set(f"orch-{a}-a0", "SUCCEEDED")
    s.tick()                                      # a is done: b is admitted, its reason gone
    job = store.get(b)
    assert job.state == "admitted" and (job.wait_reason, job.wait_detail, job.wait_since) == (None, None, None)
    assert s.metrics.waiting[-1]["quota"] == 0


def test_the_scheduler_reads_quotas_from_the_store_every_tick_so_quota_set_needs_no_restart(world, tmp_path,
                                                                                            capsys):
    clock, store, ray, scheduler = world
    db = store.url
    assert cli(["quota", "set", "t", "--cpus", "0:2", "--store", db]) == 0
    a = store.submit(train_spec(tmp_path, "a", lo=2, hi=2))
    b = store.submit(train_spec(tmp_path, "b", lo=2, hi=2))
    s = running(scheduler, ray)
    assert store.get(a).state == "running"
    assert (store.get(b).state, store.get(b).wait_reason) == ("queued", "quota")
    assert "team 't' CPU quota 2/2 in use" in store.get(b).wait_detail
    assert cli(["quota", "set", "t", "--cpus", "0:4", "--store", db]) == 0  # the same scheduler runs on
    s.tick()
    assert store.get(b).state == "admitted" and store.get(b).wait_reason is None
    # A stored quota wins over the service's configured default for that team; delete it and the
    # default holds again.
    s.config.quotas = {"t": Quota(cpus=4)}
    ray._nodes = [Node("n0", 4.0), Node("n1", 4.0)]
    c = store.submit(train_spec(tmp_path, "c", lo=1, hi=1))
    assert cli(["quota", "set", "t", "--cpus", "0:5", "--store", db]) == 0
    s.tick()
    assert store.get(c).state == "admitted"
    d = store.submit(train_spec(tmp_path, "d", lo=1, hi=1))
    assert cli(["quota", "delete", "t", "--store", db]) == 0
    s.tick()
    assert (store.get(d).state, store.get(d).wait_reason) == ("queued", "quota")
    assert "team 't' CPU quota 5/4 in use" in store.get(d).wait_detail


def test_a_failed_job_in_backoff_says_until_when_and_a_rejected_one_why_it_never_fits(world, tmp_path):
    clock, store, ray, scheduler = world
    jid = store.submit(train_spec(tmp_path, "a", retries=2))
    s = scheduler()
    s.tick()
    ray.set(f"orch-{jid}-a0", "FAILED", "exit code 1")
    s.tick()                                      # failed at t=1000: retry after 10s
    s.tick()
    job = store.get(jid)
    assert job.state == "queued" and job.wait_reason == "backoff"
    assert job.wait_detail == "until 1970-01-01 00:16:50 UTC: retry 1/2 after a failure, 10s backoff"
    clock.t += 10
    s.tick()
    job = store.get(jid)
    assert job.state == "admitted" and job.wait_reason is None
    huge = parse_spec({**train_spec(tmp_path, "huge").model_dump(mode="json"),
                       "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 16}})
    hid = store.submit(huge)
    s.tick()
    job = store.get(hid)
    assert job.state == "failed" and job.wait_reason == "never_fits"
    assert job.reason == f"rejected: {job.wait_detail}" and "even when empty" in job.wait_detail


def test_parse_submission_id_round_trips_and_ignores_foreign_ids():
    assert parse_submission_id("orch-mlp-1a2b3c4d-a3") == ("mlp-1a2b3c4d", 3)
    assert parse_submission_id("raysubmit_123") is None
    assert parse_submission_id("orch-x-abc") is None


# ---------------------------------------------------------------------------------------------
# the control protocol the scheduler and the trainer share
# ---------------------------------------------------------------------------------------------
def test_control_cap_applies_after_its_checkpoint_or_after_the_grace_period(tmp_path):
    clock = Clock()
    c = JobControl(str(tmp_path / "ck"), clock=clock)
    assert c.pending_request() is None and c.max_workers() is None
    c.request_checkpoint("r1")
    c.request_checkpoint("r1")                    # idempotent
    c.set_max_workers(2, checkpoint_first="r1")
    assert c.pending_request() == "r1" and c.max_workers() is None
    clock.t += 121
    assert c.max_workers() == 2                   # the checkpoint never came: apply anyway
    c.mark_served("r1", 12)
    assert c.pending_request() is None and c.checkpoint_served("r1") == 12
    c.clear()
    assert c.max_workers() is None


def test_latest_commit_reads_the_newest_manifest_only(tmp_path):
    root = tmp_path / "ck"
    for step, manifest in ((10, True), (20, True), (30, False)):
        d = root / f"step-{step:08d}"
        d.mkdir(parents=True)
        if manifest:
            (d / "MANIFEST.json").write_text(json.dumps({"committed_at": 5.0 + step}))
    c = latest_commit(str(root))
    assert (c.step, c.committed_at) == (20, 25.0) and c.url.endswith("step-00000020")
    assert latest_commit(str(tmp_path / "none")) is None


def test_the_elastic_scaling_policy_honours_the_schedulers_cap(tmp_path):
    import ray.train

    from actors.trainer.trainer import BatchAwareScalingPolicy
    from orchestrator.batch import BatchPlan
    cfg = ray.train.ScalingConfig(num_workers=(1, 4), resources_per_worker={"CPU": 1})
    control = JobControl(str(tmp_path / "ck"))
    policy = BatchAwareScalingPolicy(cfg, BatchPlan(32, 8, 1, 4), "job", control)  # allowed 1, 2, 4
    assert policy._count_possible_workers({"n0": {"CPU": 4}}) == 4
    assert policy._get_num_workers_for_resource_request() == 4
    control.set_max_workers(3)
    policy._cap_read = float("-inf")
    assert policy._count_possible_workers({"n0": {"CPU": 4}}) == 2   # 3 has no batch split
    assert policy._get_num_workers_for_resource_request() == 2       # so it reserves no 3rd


# ---------------------------------------------------------------------------------------------
# pipelines
# ---------------------------------------------------------------------------------------------
def serve_spec(ckpt: str):
    return parse_spec({"kind": "serve", "name": "srv", "checkpoint_url": ckpt,
                       "model": {"factory": "jobs.examples.models:mlp"}, "input_shape": [32]})


def test_a_serve_stage_serves_its_upstream_checkpoint_exporting_a_training_one(tmp_path):
    served = tmp_path / "served-ckpt"
    served.mkdir()
    (served / "model.json").write_text("{}")
    run = pipemod.prepare_stage(serve_spec("placeholder"), {"tune": str(served)})
    assert run.spec.checkpoint_url == str(served) and run.before == []
    train_ckpt = str(tmp_path / "ckpt" / "step-00000040")
    run = pipemod.prepare_stage(serve_spec("placeholder"), {"train": train_ckpt}, python="py")
    assert run.spec.checkpoint_url == str(tmp_path / "ckpt" / "served" / "step-00000040")
    assert run.before == [["py", "-m", "orchestrator", "export", train_ckpt, run.spec.checkpoint_url]]
    assert json.loads(run.env[pipemod.UPSTREAM_ENV]) == {"train": train_ckpt}


def test_a_serve_stage_in_the_scheduler_exports_then_serves(world, tmp_path):
    clock, store, ray, scheduler = world
    pipe = parse_spec({"kind": "pipeline", "name": "p", "stages": [
        {"name": "train", "spec": train_spec(tmp_path, "tr").model_dump(mode="json")},
        {"name": "serve", "depends_on": ["train"],
         "spec": serve_spec("placeholder").model_dump(mode="json")}]})
    pid = store.submit(pipe)
    stages = {s.stage: s for s in store.list(parent_id=pid)}
    s = scheduler()
    s.tick()
    assert list(ray.jobs) == [f"orch-{stages['train'].id}-a0"]    # serve waits for train
    assert store.get(pid).state == "running"
    ck = tmp_path / "ckpt" / "tr" / "step-00000010"
    ck.mkdir(parents=True)
    (ck / "MANIFEST.json").write_text(json.dumps({"committed_at": 1.0}))
    ray.set(f"orch-{stages['train'].id}-a0", "SUCCEEDED")
    s.tick()
    assert store.get(stages["train"].id).checkpoint_url == str(ck)
    entry = ray.entrypoints[f"orch-{stages['serve'].id}-a0"]
    assert f"-m orchestrator export {ck} {tmp_path}/ckpt/tr/served/step-00000010 && exec" in entry
    assert "-m jobs.serve" in entry and "ORCHESTRATOR_UPSTREAM_CHECKPOINTS=" in entry
    ray.set(f"orch-{stages['serve'].id}-a0", "SUCCEEDED")
    s.tick()
    assert store.get(pid).state == "succeeded"


def test_a_pipeline_stage_waiting_for_its_upstream_stages_says_which(world, tmp_path):
    clock, store, ray, scheduler = world
    pipe = parse_spec({"kind": "pipeline", "name": "p", "stages": [
        {"name": "a", "spec": train_spec(tmp_path, "a").model_dump(mode="json")},
        {"name": "b", "depends_on": ["a"], "spec": train_spec(tmp_path, "b").model_dump(mode="json")}]})
    pid = store.submit(pipe)
    s = scheduler()
    s.tick()
    b = next(st for st in store.list(parent_id=pid) if st.stage == "b")
    assert (b.state, b.wait_reason, b.wait_detail) == ("queued", "upstream", "waiting for stage(s) a")
    a = next(st for st in store.list(parent_id=pid) if st.stage == "a")
    assert a.wait_reason is None and a.state == "admitted"


def test_cancelling_a_pipeline_cancels_its_stages_and_stops_the_running_one(world, tmp_path):
    clock, store, ray, scheduler = world
    pipe = parse_spec({"kind": "pipeline", "name": "p", "stages": [
        {"name": "a", "spec": train_spec(tmp_path, "a").model_dump(mode="json")},
        {"name": "b", "depends_on": ["a"], "spec": train_spec(tmp_path, "b").model_dump(mode="json")}]})
    pid = store.submit(pipe)
    s = running(scheduler, ray)
    store.cancel(pid)
    s.tick()
    assert all(j.status == "STOPPED" for j in ray.jobs.values())
    assert {st.state for st in store.list(parent_id=pid)} == {"cancelled"}


def test_the_pipeline_entrypoint_runs_stages_in_order_and_skips_those_after_a_failure(tmp_path):
    """``python -m jobs.pipeline`` (no scheduler): stages run one after another in dependency
    order, each handed its upstream checkpoints; a failed stage's dependants do not run."""
    import os
    import sys

    from jobs.pipeline import run_pipeline
    log = tmp_path / "log"

    def stage(name, deps, **kw):
        sp = train_spec(tmp_path, f"s-{name}").model_dump(mode="json")
        sp["model"]["kwargs"] = {"log": str(log), **kw}
        return {"name": name, "depends_on": deps, "spec": sp}
    spec = parse_spec({"kind": "pipeline", "name": "p", "stages": [
        stage("c", ["b"]), stage("b", ["a"], fail_attempts=1), stage("a", [], checkpoint="mem-a"),
        stage("d", ["a"])]})
    fake = os.path.join(os.path.dirname(__file__), "fake_job.py")
    result = run_pipeline(spec, sys.executable, entrypoint="{python} " + fake + " {spec}")
    assert {n: r["state"] for n, r in result.items()} == {
        "a": "succeeded", "b": "failed", "c": "failed", "d": "succeeded"}
    assert result["c"]["reason"].startswith("not run: upstream stage 'b' failed")
    assert result["a"]["checkpoint"] == "mem-a"
    lines = [ln.split(" ", 2) for ln in log.read_text().splitlines()]
    assert [ln[0] for ln in lines if ln[2] == "start"] == ["s-a", "s-b", "s-d"]
    assert json.loads(next(ln[2] for ln in lines if ln[0] == "s-d" and ln[2].startswith("upstream"))
                      .split(" ", 1)[1]) == {"a": "mem-a"}


_PIPELINE_SCRIPT = """
import json, sys
from jobs.pipeline import PipelineStop, run_pipeline
from orchestrator.spec import load_spec
with PipelineStop() as stop:
    result = run_pipeline(load_spec(sys.argv[1]), sys.executable, entrypoint=sys.argv[2], stop=stop)
print("RESULT " + json.dumps({"signum": stop.signum, "stages": result}), flush=True)
"""


def test_the_pipeline_entrypoint_passes_a_stop_signal_to_the_running_stage_and_starts_no_other(tmp_path):
    """SIGTERM to the pipeline's process alone reaches the running stage (a serve stage cleans up
    on it), and the stages after it are not run."""
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT, wait_until
    log = tmp_path / "log"

    def stage(name, deps):
        sp = train_spec(tmp_path, f"s-{name}").model_dump(mode="json")
        sp["model"]["kwargs"] = {"log": str(log), "wait_for": str(tmp_path / "never")}
        return {"name": name, "depends_on": deps, "spec": sp}
    spec = parse_spec({"kind": "pipeline", "name": "p", "stages": [stage("a", []), stage("b", ["a"])]})
    (tmp_path / "p.json").write_text(json.dumps(spec.model_dump(mode="json")))
    fake = "{python} " + os.path.join(ROOT, "tests", "fake_job.py") + " {spec}"
    proc = subprocess.Popen([sys.executable, "-c", _PIPELINE_SCRIPT, str(tmp_path / "p.json"), fake],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: log.exists() and "s-a" in log.read_text(), 60, 0.05, "stage a to start")
        proc.send_signal(signal.SIGTERM)           # the parent only
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    result = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["signum"] == signal.SIGTERM, out
    stages = result["stages"]
    assert stages["a"]["state"] == "cancelled" and stages["a"]["reason"] == "stopped by SIGTERM (exit code -15)"
    assert stages["b"] == {"state": "cancelled", "reason": "not run: pipeline stopped by SIGTERM",
                           "checkpoint": None}
    assert [ln.split()[0] for ln in log.read_text().splitlines()] == ["s-a"]  # b never started
    assert pipemod.pipeline_outcome({n: (r["state"], r["reason"]) for n, r in stages.items()})[0] == "cancelled"


# ---------------------------------------------------------------------------------------------
# outages: the loop waits, with capped backoff, logging once
# ---------------------------------------------------------------------------------------------
class DownRay(FakeRay):
    """A FakeRay whose Jobs API fails while ``down`` is set; records when it was asked."""

    def __init__(self):
        super().__init__()
        self.down = True
        self.asked: list[float] = []

    def list_jobs(self):
        import time
        from orchestrator.ray_adapter import RayUnavailable
        self.asked.append(time.monotonic())
        if self.down:
            raise RayUnavailable("no Ray cluster at 127.0.0.1:1: connection refused")
        return super().list_jobs()


def test_the_ray_link_forwards_every_method_of_the_adapter():
    """The scheduler command talks to Ray through RayLink: an adapter method it does not forward
    would fail only there."""
    public = {n for n, v in vars(RayAdapter).items() if callable(v) and not n.startswith("_")}
    assert public == set(RayLink.METHODS)
    assert all(callable(getattr(RayLink, n)) for n in RayLink.METHODS)


def test_run_waits_out_a_ray_outage_with_capped_backoff_logging_it_once(tmp_path, caplog):
    import logging
    import threading

    from conftest import wait_until
    store = JobStore(str(tmp_path / "jobs.db"))
    ray = DownRay()
    health = tmp_path / "alive"
    sched = Scheduler(store, ray, SchedulerConfig(tick_s=0.02, reconnect_max_s=0.08,
                                                  health_file=str(health)))
    stop = threading.Event()
    t = threading.Thread(target=sched.run, args=(stop,), daemon=True)
    with caplog.at_level(logging.INFO, logger="orchestrator.scheduler"):
        t.start()
        try:
            wait_until(lambda: len(ray.asked) >= 9, 10, 0.01, "nine failed ticks")
            jid = store.submit(train_spec(tmp_path, "queued-meanwhile"))  # the store needs no Ray
            assert health.exists()
            ray.down = False
            wait_until(lambda: store.get(jid).state == "admitted", 10, 0.01, "the job admitted")
        finally:
            stop.set()
            t.join(10)
    gaps = [b - a for a, b in zip(ray.asked, ray.asked[1:9])]
    for gap, want in zip(gaps, (0.02, 0.04, 0.08, 0.08, 0.08, 0.08, 0.08, 0.08)):  # doubling...
        assert gap >= want * 0.9, gaps
    assert max(gaps) < 1.5, gaps  # ...capped (uncapped, the last would be 2.56 s)
    text = [r.getMessage() for r in caplog.records]
    assert sum("scheduler tick failed" in m for m in text) == 1, text
    assert sum("work again" in m for m in text) == 1, text


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------
def test_scheduler_command_rejects_bad_quota_and_autoscale_arguments(tmp_path, capsys):
    store = str(tmp_path / "jobs.db")
    assert cli(["scheduler", "--once", "--store", store, "--quota", "vision"]) == 2
    assert "TEAM=CPUS[:GPUS]" in capsys.readouterr().err
    assert cli(["scheduler", "--once", "--store", store, "--autoscale-node", "eight"]) == 2
    assert "CPUS[:GPUS]" in capsys.readouterr().err


def test_scheduler_command_fails_fast_naming_an_address_with_no_ray(tmp_path, capsys):
    from conftest import free_port
    addr = f"127.0.0.1:{free_port()}"
    assert cli(["scheduler", "--once", "--store", str(tmp_path / "jobs.db"), "--address", addr]) == 1
    err = capsys.readouterr().err
    assert f"no Ray cluster at {addr}" in err and "RAY_AUTH_MODE" in err
