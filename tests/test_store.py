"""The durable job store on each backend, a real SQLite file and a real PostgreSQL server (the
``store_url`` fixture): legal transitions only, nothing lost across restarts, one winner when many
processes race for the same job or open an empty database at once."""

from __future__ import annotations

import sqlite3
import sys

import pytest
import sqlalchemy as sa

from conftest import free_port
from store_racers import CHAIN, RACERS, move_every_job, open_store, race
from orchestrator import spec as specmod
from orchestrator.policy import Quota
from orchestrator.store import (LEGAL, SCHEMA_VERSION, STATES, IllegalTransition, InvalidQuota, JobStore,
                                StoreUnavailable, UnknownJob, UnknownQuota, normalize_url, redacted)

TRAIN = {
    "kind": "train", "name": "mlp", "scheduling": {"team": "research", "priority": "high", "max_retries": 2},
    "resources": {"min_workers": 2, "max_workers": 4, "cpus_per_worker": 2, "gpus_per_worker": 0.5},
    "model": {"factory": "jobs.examples.models:mlp"}, "dataset": {"url": "memory://data"},
    "deepspeed": {"micro_batch_size": 2, "global_batch_size": 16},
    "checkpoint": {"url": "memory://ckpt"}, "max_steps": 10,
}
PIPELINE = {
    "kind": "pipeline", "name": "pipe",
    "stages": [{"name": "train", "spec": TRAIN},
               {"name": "train2", "depends_on": ["train"], "spec": {**TRAIN, "name": "mlp2"}}],
}


@pytest.fixture
def store(store_url):
    s = JobStore(store_url)
    yield s
    s.close()


def spec(data=TRAIN):
    return specmod.parse_spec(data)


def test_submit_stores_the_resolved_spec_and_its_gang(store):
    job = store.get(store.submit(spec()))
    assert job.state == "queued" and job.kind == "train" and job.team == "research" and job.priority == "high"
    assert (job.min_workers, job.max_workers, job.cpus_per_worker, job.gpus_per_worker) == (2, 4, 2.0, 0.5)
    assert job.max_retries == 2 and job.attempts == 0
    assert job.load() == spec()  # the stored spec round-trips, defaults filled in
    assert job.spec["optimizer"]["name"] == "adamw"


def test_every_transition_is_recorded_with_its_reason(store):
    jid = store.submit(spec())
    store.transition(jid, "admitted", "fits on n0", workers=2, placement={"n0": 2})
    store.transition(jid, "running", "ray job started", ray_submission_id="orch-x-a1")
    store.transition(jid, "preempted", "for urgent-1", checkpoint_url="memory://ckpt/step-5",
                     checkpoint_step=5, checkpoint_time=123.0)
    store.transition(jid, "queued", "requeued after preemption")
    job = store.get(jid, history=True)
    assert [(t.from_state, t.to_state) for t in job.history] == [
        (None, "queued"), ("queued", "admitted"), ("admitted", "running"), ("running", "preempted"),
        ("preempted", "queued")]
    assert [t.reason for t in job.history][-2:] == ["for urgent-1", "requeued after preemption"]
    assert job.checkpoint_step == 5 and job.checkpoint_url == "memory://ckpt/step-5"
    assert job.workers == 0 and job.placement == {}  # a queued job holds nothing
    assert job.ray_submission_id == "orch-x-a1"


def test_illegal_transition_is_refused_and_changes_nothing(store):
    jid = store.submit(spec())
    with pytest.raises(IllegalTransition, match=f"{jid}.*queued.*cannot become running"):
        store.transition(jid, "running", "skip admission")
    assert store.get(jid).state == "queued" and len(store.history(jid)) == 1


def test_finished_jobs_are_final(store):
    jid = store.submit(spec())
    store.transition(jid, "admitted", "a")
    store.transition(jid, "running", "r")
    store.transition(jid, "succeeded", "done")
    for s in STATES:
        with pytest.raises(IllegalTransition):
            store.transition(jid, s, "again")
    assert store.get(jid).end_time is not None


def test_legal_table_covers_every_state():
    assert set(LEGAL) == set(STATES) and all(v <= set(STATES) for v in LEGAL.values())


def test_cancelling_a_finished_job_is_a_clear_error(store):
    jid = store.submit(spec())
    store.cancel(jid)
    with pytest.raises(IllegalTransition, match=f"{jid}.*already cancelled"):
        store.cancel(jid)


def test_unknown_job_ids_are_named(store):
    for call in (lambda: store.get("nope"), lambda: store.transition("nope", "admitted", "x"),
                 lambda: store.history("nope"), lambda: store.cancel("nope"),
                 lambda: store.update("nope", workers=1)):
        with pytest.raises(UnknownJob, match="'nope'"):
            call()


def test_expected_state_guards_against_a_second_scheduler(store):
    jid = store.submit(spec())
    store.transition(jid, "admitted", "first scheduler", expect="queued")
    with pytest.raises(IllegalTransition, match="another process"):
        store.transition(jid, "admitted", "second scheduler", expect="queued")


def test_a_restarted_scheduler_sees_every_job_exactly_once(store_url):
    path = store_url
    first = JobStore(path)
    ids = [first.submit(spec()) for _ in range(5)]
    first.transition(ids[0], "admitted", "a")
    first.transition(ids[1], "cancelled", "c")
    first.close()  # the scheduler dies
    second = JobStore(path)
    seen = [j.id for j in second.list()]
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    assert second.get(ids[0]).state == "admitted" and second.get(ids[1]).state == "cancelled"
    assert [j.id for j in second.list(["queued"])] == ids[2:]


def test_two_open_stores_on_one_database_see_each_other(store_url):
    # the URL as given, and its normal form (sqlite:///<abs path>; postgresql+psycopg://)
    a, b = JobStore(store_url), JobStore(normalize_url(store_url))
    assert a.url == b.url != store_url
    jid = a.submit(spec())
    b.transition(jid, "admitted", "by b")
    assert a.get(jid).state == "admitted"


def test_pipeline_stores_one_job_per_stage_with_its_dependencies(store):
    pid = store.submit(spec(PIPELINE))
    stages = store.list(parent_id=pid)
    assert [(s.stage, s.depends_on) for s in stages] == [("train", []), ("train2", ["train"])]
    assert store.get(pid).kind == "pipeline" and store.get(pid).max_workers == 0
    assert [j.id for j in store.list(top_level=True)] == [pid]
    store.cancel(pid)
    assert {s.state for s in store.list(parent_id=pid)} == {"cancelled"}


def test_schema_version_is_recorded_and_a_newer_one_refused(store_url):
    engine = sa.create_engine(JobStore(store_url).url)
    with engine.begin() as c:
        assert c.exec_driver_sql("select version from schema_version").all() == [(SCHEMA_VERSION,)]
        c.exec_driver_sql(f"update schema_version set version = {SCHEMA_VERSION + 1}")
    engine.dispose()
    with pytest.raises(StoreUnavailable, match="newer"):
        JobStore(store_url)


@pytest.mark.parametrize("url, why", [("foo://x", "not a usable database URL"),
                                      ("postgresql+nosuchdriver://u@h/db", "not a usable database URL")])
def test_a_store_url_that_cannot_be_opened_is_a_clear_error(url, why):
    with pytest.raises(StoreUnavailable, match=why) as e:
        JobStore(url)
    assert url in str(e.value)


def test_plain_postgresql_urls_use_psycopg_3():
    assert normalize_url("postgresql://u:p@db:5432/jobs") == "postgresql+psycopg://u:p@db:5432/jobs"
    assert normalize_url("postgres://db/jobs") == "postgresql+psycopg://db/jobs"
    assert normalize_url("postgresql+psycopg2://db/jobs") == "postgresql+psycopg2://db/jobs"  # as asked


def test_a_postgresql_server_that_is_not_there_is_named(postgres_server):
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(StoreUnavailable, match="cannot open job store 'postgresql://postgres@127") as e:
        JobStore(url)
    assert url in str(e.value)


def test_a_password_in_the_store_url_is_never_shown(postgres_server):
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{free_port()}/jobs"
    with pytest.raises(StoreUnavailable) as e:
        JobStore(url)
    assert "s3cret-pw" not in str(e.value)
    assert "postgresql://postgres:***@127.0.0.1" in str(e.value)
    assert redacted("sqlite:////tmp/jobs.db") == "sqlite:////tmp/jobs.db"


def test_without_the_driver_a_postgresql_url_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails as if not installed
    with pytest.raises(StoreUnavailable, match=r"driver is not installed.*psycopg.*\[postgres\]"):
        JobStore("postgresql://u@127.0.0.1/jobs")


def test_an_unwritable_store_path_names_the_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(StoreUnavailable, match="file/jobs.db"):
        JobStore(str(blocker / "jobs.db"))


def test_a_file_that_is_not_a_database_is_refused(tmp_path):
    bad = tmp_path / "junk.db"
    bad.write_bytes(b"\x00garbage" * 1000)
    with pytest.raises(StoreUnavailable, match="junk.db"):
        JobStore(str(bad))


def test_only_scheduler_fields_can_be_updated(store):
    jid = store.submit(spec())
    assert store.update(jid, checkpoint_step=7).checkpoint_step == 7
    with pytest.raises(ValueError, match="state"):
        store.update(jid, state="running")


def test_a_record_becomes_the_policy_view_with_its_checkpoint_age(store):
    jid = store.submit(spec())
    store.transition(jid, "admitted", "a", workers=3, placement={"n0": 3}, start_time=50.0)
    store.update(jid, checkpoint_time=100.0)
    v = store.get(jid).view(now=130.0)
    assert (v.id, v.priority, v.team, v.min_workers, v.max_workers) == (jid, 200, "research", 2, 4)
    assert v.workers == 3 and v.placement == {"n0": 3} and v.checkpoint_age == 30.0 and v.start_time == 50.0
    assert v.time_limit is None
    limited = {**TRAIN, "scheduling": {**TRAIN["scheduling"], "time_limit": "1h30m"}}
    assert store.get(store.submit(spec(limited))).view(now=130.0).time_limit == 5400.0


def test_the_ray_submission_id_is_stable_per_attempt(store):
    jid = store.submit(spec())
    first = store.get(jid).submission_id
    assert first == JobStore(store.url).get(jid).submission_id  # a restarted scheduler agrees
    assert store.update(jid, attempts=1).submission_id != first


def test_a_wait_reason_is_written_when_it_changes_only_and_cleared_when_the_job_stops_waiting(tmp_path):
    t = [100.0]
    store = JobStore(str(tmp_path / "jobs.db"), clock=lambda: t[0])
    jid = store.submit(spec())
    assert store.set_waits({jid: ("quota", "team 'research' CPU quota: 4/4 in use")}) == 1
    job = store.get(jid)
    assert (job.wait_reason, job.wait_detail, job.wait_since) == ("quota", "team 'research' CPU quota: 4/4 in use", 100.0)
    t[0] = 150.0
    assert store.set_waits({jid: ("quota", "team 'research' CPU quota: 4/4 in use")}) == 0  # unchanged: no write
    assert store.set_waits({}) == 0
    assert store.set_waits({jid: ("quota", "team 'research' CPU quota: 2/4 in use")}) == 1
    assert store.get(jid).wait_since == 100.0  # same reason since 100, its detail moved
    assert store.set_waits({jid: ("autoscaler", "asked the autoscaler for 2 x (2 CPU)")}) == 1
    assert (store.get(jid).wait_reason, store.get(jid).wait_since) == ("autoscaler", 150.0)
    assert store.get(jid).updated_time == 100.0  # admission and checkpoint deadlines are not moved
    job = store.transition(jid, "admitted", "fits")
    assert (job.wait_reason, job.wait_detail, job.wait_since) == (None, None, None)
    assert store.set_waits({jid: ("quota", "late")}) == 0  # only waiting jobs have a reason
    other = store.submit(spec())
    store.set_waits({other: ("backoff", "until ...")})
    assert store.cancel(other).wait_reason is None
    assert store.set_waits({other: None}) == 0
    rejected = store.submit(spec())
    job = store.transition(rejected, "failed", "rejected: too big", wait_reason="never_fits",
                           wait_detail="too big", wait_since=150.0)
    assert (job.wait_reason, job.wait_detail) == ("never_fits", "too big")  # why it ended, kept


def test_a_store_made_by_the_previous_schema_opens_and_gains_the_wait_columns(tmp_path):
    path = tmp_path / "old.db"
    store = JobStore(str(path))
    jid = store.submit(spec())
    store.close()
    with sqlite3.connect(path) as c:  # the jobs table as schema 1 made it, with its row
        for col in ("wait_reason", "wait_detail", "wait_since"):
            c.execute(f"ALTER TABLE jobs DROP COLUMN {col}")
        assert "wait_reason" not in [r[1] for r in c.execute("PRAGMA table_info(jobs)")]
    for _ in range(2):  # opening again adds nothing twice
        store = JobStore(str(path))
        job = store.get(jid)
        assert job.state == "queued" and job.wait_reason is None and job.load() == spec()
        assert store.set_waits({jid: ("quota", "q")}) == 1
        assert store.set_waits({jid: None}) == 1
        store.close()
    with sqlite3.connect(path) as c:
        assert [r[1] for r in c.execute("PRAGMA table_info(jobs)")][-3:] == [
            "wait_reason", "wait_detail", "wait_since"]
        assert c.execute("select version from schema_version").fetchall() == [(SCHEMA_VERSION,)]


# ---------------------------------------------------------------------------------------------
# many processes at once (tests/store_racers.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_many_processes_racing_on_the_same_jobs_each_move_happens_exactly_once(store_url):
    store = JobStore(store_url)
    ids = [store.submit(spec()) for _ in range(4)]
    won = race(move_every_job, store_url, ids)
    assert not [w for w in won if isinstance(w, str)], won
    winners = {}  # (job, state) -> racers that moved the job there
    for me, steps in enumerate(won):
        for step in steps:
            winners.setdefault(step, []).append(me)
    assert {step: len(w) for step, w in winners.items()} == {(j, to): 1 for j in ids for _, to in CHAIN}
    for jid in ids:
        job = store.get(jid, history=True)
        assert [(t.from_state, t.to_state) for t in job.history] == [(None, "queued"), *CHAIN]
        # no lost update: each recorded move is its winner's, with the fields it wrote
        assert [t.reason for t in job.history[1:]] == [f"racer {winners[jid, to][0]}" for _, to in CHAIN]
        assert job.state == "succeeded" and job.ray_submission_id == f"racer-{winners[jid, 'succeeded'][0]}"


@pytest.mark.slow
def test_many_processes_opening_an_empty_database_at_once_all_succeed_with_one_schema(store_url):
    assert race(open_store, store_url) == ["ok"] * RACERS
    engine = sa.create_engine(normalize_url(store_url))
    try:
        assert set(sa.inspect(engine).get_table_names()) == {"jobs", "transitions", "schema_version", "leases", "quotas"}
        with engine.connect() as c:
            assert c.exec_driver_sql("select version from schema_version").all() == [(SCHEMA_VERSION,)]
    finally:
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# leases: one active scheduler, and a deposed one's writes refused
# ---------------------------------------------------------------------------------------------
def test_a_lease_is_renewed_by_its_holder_and_taken_over_only_once_expired(store_url):
    t = [1000.0]
    a, b = JobStore(store_url, clock=lambda: t[0]), JobStore(store_url, clock=lambda: t[0])
    la = a.acquire_lease("scheduler", "A", ttl_s=10)
    assert (la.holder, la.epoch, la.expires) == ("A", 1, 1010.0)
    assert b.acquire_lease("scheduler", "B", ttl_s=10) is None          # held: B stands by
    t[0] = 1008.0
    assert a.acquire_lease("scheduler", "A", ttl_s=10).epoch == 1        # renewed, same epoch
    t[0] = 1017.0
    assert b.acquire_lease("scheduler", "B", ttl_s=10) is None          # renewed at 1008: held to 1018
    t[0] = 1018.5
    lb = b.acquire_lease("scheduler", "B", ttl_s=10)
    assert (lb.holder, lb.epoch) == ("B", 2)                             # expired: taken over
    assert a.acquire_lease("scheduler", "A", ttl_s=10) is None          # A comes back: B holds it
    b.release_lease(lb)
    assert a.acquire_lease("scheduler", "A", ttl_s=10).epoch == 3        # released: free at once
    assert a.lease("scheduler").holder == "A" and b.lease("other") is None


def test_a_deposed_schedulers_writes_are_refused_and_change_nothing(store_url):
    from orchestrator.store import Deposed
    t = [1000.0]
    a, b = JobStore(store_url, clock=lambda: t[0]), JobStore(store_url, clock=lambda: t[0])
    jid = a.submit(spec())
    a.fence(a.acquire_lease("scheduler", "A", ttl_s=5))
    a.transition(jid, "admitted", "fits")                               # the leader writes
    t[0] = 1010.0                                                        # A stalls past its lease
    b.fence(b.acquire_lease("scheduler", "B", ttl_s=5))
    for write in (lambda: a.transition(jid, "running", "started"),
                  lambda: a.update(jid, workers=3),
                  lambda: a.set_waits({jid: ("quota", "x")}),
                  lambda: a.submit(spec())):
        with pytest.raises(Deposed, match="A \\(epoch 1\\) was deposed by B \\(epoch 2\\)"):
            write()
    job = b.get(jid, history=True)
    assert job.state == "admitted" and job.workers == 0 and len(b.list()) == 1
    b.transition(jid, "running", "started")                              # the new leader writes
    assert b.get(jid).state == "running"


# --- quotas ------------------------------------------------------------------------------------
def test_quotas_are_set_changed_listed_and_deleted(tmp_path):
    clock = iter(range(100, 200)).__next__
    store = JobStore(str(tmp_path / "jobs.db"), clock=lambda: float(clock()))
    q = store.set_quota("vision", guaranteed_cpus=4, max_cpus=16, cohort="ml")
    assert (q.team, q.cohort, q.guaranteed_cpus, q.max_cpus, q.guaranteed_gpus, q.max_gpus) == \
        ("vision", "ml", 4.0, 16.0, 0.0, None)                   # GPUs: nothing guaranteed, no max
    q = store.set_quota("vision", guaranteed_gpus=1, max_gpus=2)  # only what is given changes
    assert (q.guaranteed_cpus, q.max_cpus, q.cohort, q.guaranteed_gpus, q.max_gpus) == (4.0, 16.0, "ml", 1.0, 2.0)
    assert q.updated_time > store.get_quota("vision").updated_time - 1
    store.set_quota("nlp", max_cpus=8)
    assert store.set_quota("nlp", max_cpus=float("inf"), cohort="").max_cpus is None  # inf: no limit
    assert [q.team for q in store.list_quotas()] == ["nlp", "vision"]
    assert store.quotas() == {"nlp": Quota(), "vision": Quota(cpus=16, gpus=2, guaranteed_cpus=4,
                                                              guaranteed_gpus=1, cohort="ml")}
    JobStore(str(tmp_path / "jobs.db")).delete_quota("nlp")    # another process, same file
    assert list(store.quotas()) == ["vision"]
    with pytest.raises(UnknownQuota, match="team 'nlp' has no quota"):
        store.get_quota("nlp")
    with pytest.raises(UnknownQuota):
        store.delete_quota("nlp")


@pytest.mark.parametrize("fields, field, message", [
    ({"guaranteed_cpus": -1}, "guaranteed_cpus", "guaranteed_cpus must be a finite number >= 0, got -1"),
    ({"max_gpus": -0.5}, "max_gpus", "max_gpus must be a finite number >= 0"),
    ({"guaranteed_cpus": float("inf")}, "guaranteed_cpus", "finite"),
    ({"guaranteed_cpus": float("nan")}, "guaranteed_cpus", "finite"),
    ({"max_cpus": 2}, "max_cpus", "max_cpus (2) must be >= guaranteed_cpus (4)"),
    ({"guaranteed_gpus": "two"}, "guaranteed_gpus", "guaranteed_gpus must be a number, got 'two'"),
    ({"cpus": 4}, "cpus", "unknown quota field(s) ['cpus']; fields: cohort, guaranteed_cpus"),
    ({"cohort": "x" * 65}, "cohort", "cohort must be a name of at most 64 characters"),
])
def test_a_bad_quota_value_is_refused_naming_the_field_and_loses_nothing(store, fields, field, message):
    before = store.set_quota("vision", guaranteed_cpus=4, max_cpus=8, cohort="ml")
    with pytest.raises(InvalidQuota) as e:
        store.set_quota("vision", **fields)
    assert e.value.field == field and message in str(e.value) and "quota of 'vision'" in str(e.value)
    assert store.get_quota("vision") == before
    with pytest.raises(InvalidQuota, match="team"):
        store.set_quota("", max_cpus=1)
    assert [q.team for q in store.list_quotas()] == ["vision"]


def test_a_store_made_before_quotas_opens_and_gains_the_table_keeping_its_jobs(tmp_path):
    path = tmp_path / "old.db"
    store = JobStore(str(path))
    jid = store.submit(spec())
    store.close()
    with sqlite3.connect(path) as c:  # as the previous orchestrator left it: no quotas table
        c.execute("DROP TABLE quotas")
        assert "quotas" not in [r[0] for r in c.execute("select name from sqlite_master")]
    store = JobStore(str(path))
    assert store.get(jid).state == "queued" and store.quotas() == {}
    store.set_quota("research", guaranteed_cpus=2, max_cpus=4)
    store.close()
    store = JobStore(str(path))                  # opening again keeps it
    assert store.quotas() == {"research": Quota(cpus=4, guaranteed_cpus=2)}
    with sqlite3.connect(path) as c:
        assert c.execute("select version from schema_version").fetchall() == [(SCHEMA_VERSION,)]
