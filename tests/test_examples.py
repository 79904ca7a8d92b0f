"""The example specs in ``jobs/examples/`` run as shipped, with their paths pointed at a temporary
directory and their sizes made small: the train -> tune -> serve pipeline end to end, on the
session's real Ray, answering real HTTP. (``test_spec.py`` validates every example;
``test_serve.py`` runs ``mlp_serve.yaml``.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import yaml

from conftest import ROOT, _start_local_ray, free_port, wait_until

EXAMPLES = os.path.join(ROOT, "jobs", "examples")


def _small_pipeline(tmp, data: str, port: int) -> dict:
    """``mlp_pipeline.yaml`` with its paths under ``tmp`` and 4 steps a stage, one trial."""
    spec = yaml.safe_load(open(os.path.join(EXAMPLES, "mlp_pipeline.yaml")))
    stages = {s["name"]: s["spec"] for s in spec["stages"]}
    train, tune, serve = stages["train"], stages["tune"], stages["serve"]
    train.update(max_steps=4, resources={**train["resources"], "max_workers": 1})
    train["dataset"]["url"] = data
    train["checkpoint"].update(url=str(tmp / "train"), interval_steps=2)
    tune.update(results_url=str(tmp / "tune"), search_space={"optimizer.lr": {"type": "grid", "values": [0.003]}})
    tune["scheduler"]["grace_period"] = 2
    tune["trial"].update(max_steps=4, log_interval=2)
    tune["trial"]["dataset"]["url"] = data
    tune["trial"]["checkpoint"]["interval_steps"] = 2
    serve["http_port"] = port
    return spec


@pytest.mark.slow
def test_the_pipeline_example_trains_tunes_and_serves_the_best_trial_over_http(tmp_path):
    import requests
    from ray import serve

    from actors.data import write_shards
    from jobs.examples.datasets import classification
    ray = _start_local_ray()
    serve.shutdown()  # a Serve left by another module would keep its own port
    wait_until(lambda: ray.available_resources().get("CPU", 0) >= 1, 120, 0.2, "a free CPU")
    data = str(tmp_path / "data")
    write_shards(classification(256, seed=2), data, rows_per_shard=128, progress=False)
    spec = _small_pipeline(tmp_path, data, free_port())
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(spec))
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "jobs.pipeline", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        def serving():
            if proc.poll() is not None:
                return "exited"
            return next((ln.split(" at ", 1)[1].strip() for ln in lines if ln.startswith("[serve] serving ")), None)
        url = wait_until(serving, 600, 0.5, "the pipeline's serve stage to serve")
        assert url != "exited", "".join(lines[-40:])
        assert f"[serve] serving {tmp_path / 'tune' / 'best'} at " in "".join(lines)
        x = np.random.default_rng(0).standard_normal((2, 32)).tolist()
        r = requests.post(url, json={"inputs": x}, timeout=30)
        assert r.status_code == 200 and np.asarray(r.json()["outputs"]).shape == (2, 4), r.text
    finally:
        proc.send_signal(signal.SIGTERM)  # the serve stage deletes its application and exits
        code = proc.wait(120)
        reader.join(10)
        serve.shutdown()
    summary = json.loads(next(ln for ln in reversed(lines) if ln.startswith('{"pipeline"')))
    assert code == 128 + signal.SIGTERM, "".join(lines[-40:])
    assert {n: s["state"] for n, s in summary["stages"].items()} == {
        "train": "succeeded", "tune": "succeeded", "serve": "cancelled"}, summary
    assert summary["stages"]["train"]["checkpoint"] == str(tmp_path / "train" / "step-00000004")
