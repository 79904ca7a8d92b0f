"""The scheduler outlives a Ray outage longer than Ray's own 60 s reconnect window.

A Ray driver that cannot reach the GCS for ``gcs_rpc_server_reconnect_timeout_s`` (60 s, Ray's
default, not lowered here) is ended by Ray's core worker, so ``orchestrator scheduler`` keeps its
driver in a child process (``ray_adapter.RayLink``) and starts a new one when the head is back.
One real head (``ray start --head`` on its own ports, as tests/test_service.py starts it), stopped
for 70 s and started again on the same address; one scheduler process throughout. About 2.5 min.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_until
from orchestrator.spec import parse_spec
from orchestrator.store import JobStore
from test_service import FAKE, RayHead, _ensure_token_auth

DOWN_S = 70  # longer than Ray's gcs_rpc_server_reconnect_timeout_s (60)


def _spec(tmp, name, *, retries=0, **kw):
    kw.setdefault("log", str(tmp / "events.log"))
    return parse_spec({
        "kind": "train", "name": name, "max_steps": 1,
        "scheduling": {"team": "t", "priority": "normal", "max_retries": retries},
        "resources": {"min_workers": 1, "max_workers": 1, "cpus_per_worker": 1},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": kw},
        "dataset": {"url": str(tmp / "data")},
        "deepspeed": {"micro_batch_size": 1, "global_batch_size": 1},
        "checkpoint": {"url": str(tmp / "ckpt" / name)}})


@pytest.mark.slow
def test_the_scheduler_waits_out_a_head_outage_longer_than_rays_60s_window_and_reconnects(
        tmp_path, tmp_path_factory):
    import ray
    from ray.job_submission import JobSubmissionClient
    if ray.is_initialized():
        ray.shutdown()  # the session Ray (conftest); `ray_local` restarts it lazily
    _ensure_token_auth()
    head = RayHead(str(tmp_path_factory.mktemp("oh")))  # short: Ray socket paths < 108 bytes
    store = JobStore(str(tmp_path / "jobs.db"))
    health = tmp_path / "alive"
    go = tmp_path / "go"
    sched_log = tmp_path / "sched.log"
    # Job entrypoints name their spec file: under the head's root, the head's teardown ends them
    # with it (as a lost head takes its job drivers along). The scheduler's own command line does
    # not name that root, so it is not ended with the head.
    env = dict(os.environ, ORCHESTRATOR_SPEC_DIR=os.path.join(head.root, "specs"))
    sched = None
    try:
        head.start()
        before = store.submit(_spec(tmp_path, "before"))
        during = store.submit(_spec(tmp_path, "during", retries=1, wait_for=str(go)))
        sched = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "scheduler", "--store", store.url,
             "--address", head.gcs, "--tick", "0.5", "--reconnect-max", "3", "--entrypoint", FAKE,
             "--workdir", ROOT, "--retry-backoff", "1", "--health-file", str(health)],
            cwd=ROOT, env=env, stdout=open(sched_log, "w"), stderr=subprocess.STDOUT)
        wait_until(lambda: store.get(before).state == "succeeded" and
                   store.get(during).state == "running", 120, 0.3,
                   "job 'before' to succeed and 'during' to run under the scheduler")
        history_before = [(t.to_state, t.reason) for t in store.history(before)]

        head.stop()  # only this head's processes (its process group and its job drivers)
        down_at = time.monotonic()
        queued = store.submit(_spec(tmp_path, "queued-in-outage"))  # the store needs no Ray

        def alive_through_outage():
            assert sched.poll() is None, sched_log.read_text()[-3000:]
            assert time.time() - health.stat().st_mtime < 15, "the scheduler loop stalled"
            return time.monotonic() - down_at >= DOWN_S
        wait_until(alive_through_outage, DOWN_S + 30, 1.0, f"{DOWN_S}s of outage")

        head.start()  # same ports, same address
        up_at = time.monotonic()
        after = store.submit(_spec(tmp_path, "after"))
        wait_until(lambda: (store.get(during).state, store.get(during).attempts) == ("running", 1),
                   120, 0.3, "'during' (lost with the head) to run again as attempt 1")
        reconnect_s = time.monotonic() - up_at
        go.write_text("")
        wait_until(lambda: all(store.get(j).state == "succeeded" for j in (during, queued, after)),
                   120, 0.3, "every job to succeed after the outage")
        assert sched.poll() is None, "the same scheduler process did all of this"
        ray_jobs = {d.submission_id: str(getattr(d.status, "value", d.status)) for d in
                    JobSubmissionClient(head.dashboard).list_jobs()
                    if (d.submission_id or "").startswith("orch-")}
        assert ray_jobs == {f"orch-{during}-a1": "SUCCEEDED", f"orch-{queued}-a0": "SUCCEEDED",
                            f"orch-{after}-a0": "SUCCEEDED"}  # the new head's; nothing twice
        sched.send_signal(signal.SIGTERM)
        assert sched.wait(30) == 0
        sched = None
    finally:
        if sched is not None:
            sched.kill()
            sched.wait(10)
        head.stop()
    log = sched_log.read_text()
    print(f"reconnected and relaunched {reconnect_s:.1f}s after the head was back")
    assert log.count("scheduler tick failed") == 1, log[-3000:]  # logged once for the outage
    assert "scheduler ticks work again" in log, log[-3000:]
    assert log.count("joined Ray at") >= 2, log[-3000:]
    # The store lost nothing: every job, 'before' untouched, 'during' failed over as a restart
    # does (Ray's new head has no job of the old one) and retried.
    assert {j.id for j in store.list()} == {before, during, queued, after}
    assert [(t.to_state, t.reason) for t in store.history(before)] == history_before
    assert any("Ray has no job" in t.reason for t in store.history(during))
    starts = sorted(ln.split()[:2] for ln in (tmp_path / "events.log").read_text().splitlines()
                    if ln.endswith(" start"))
    assert starts == sorted([["before", f"orch-{before}-a0"], ["during", f"orch-{during}-a0"],
                             ["during", f"orch-{during}-a1"], ["queued-in-outage", f"orch-{queued}-a0"],
                             ["after", f"orch-{after}-a0"]])
