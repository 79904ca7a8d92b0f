"""``make demo`` runs ``python -m jobs.demo``: the whole product, end to end, on local Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port


@pytest.mark.slow
@pytest.mark.multinode  # runs after the tests sharing the session Ray, which it must shut down
def test_demo_runs_the_whole_product(tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()  # the demo starts its own local Ray with the dashboard (Jobs API)
    out = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--out", str(out), "--steps", "30",
         "--kill-after-step", "10", "--requests", "50", "--serve-seconds", "0", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    tail = (proc.stdout[-4000:] + proc.stderr[-4000:])
    assert proc.returncode == 0, tail
    summary = json.loads((out / "summary.json").read_text())
    train = summary["train"]
    assert train["steps"] == 30
    assert train["killed_pid"], tail                       # a worker really was killed ...
    # ... and it resumed from a checkpoint taken after step 10, at the latest from the last step
    # done before the kill (how many steps ran between the checkpoint and the kill is timing)
    assert train["recovery_s"] is not None, tail
    assert 11 <= train["resumed_at_step"] <= train["last_step_before_kill"] + 1, train
    assert train["exactly_once"] is True
    assert train["final_loss"] < train["first_loss"]
    assert summary["tune"]["best"]["trial_id"]
    assert summary["serve"]["requests"] == 50 and summary["serve"]["p50_ms"] > 0
    for p in summary["plots"]:
        assert os.path.getsize(p) > 1000, p
    for line in ("[demo 6/6] summary", "chaos", "tune", "serve"):
        assert line in proc.stdout
