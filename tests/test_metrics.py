"""Metrics: the catalogue, the dashboards' queries against it, ``orchestrator top``'s summary, and
(with real local Ray and a real train run) the series a live job exports."""

from __future__ import annotations

import json
import os
import re

import pytest

from orchestrator import dashboards, metrics as M
from orchestrator.commands import top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_catalogue_names_each_series_once_with_rays_prefix():
    assert len(M.CATALOGUE) == len(M.TRAIN) + len(M.DATA) + len(M.SERVE) + len(M.SCHEDULER)
    assert all(m.name.startswith("orchestrator_") for m in M.CATALOGUE.values())
    assert M.CATALOGUE["orchestrator_train_loss"].exported == "ray_orchestrator_train_loss"
    assert M.CATALOGUE["orchestrator_serve_requests"].exported == "ray_orchestrator_serve_requests_total"
    assert "ray_orchestrator_serve_latency_ms_bucket" in M.exported_names()


def test_a_recorder_refuses_a_tag_its_metric_does_not_declare():
    rec = M.Recorder(M.TRAIN, job="j", attempt="0")
    with pytest.raises(ValueError, match="orchestrator_train_step_seconds: tags .* declares"):
        rec.set("orchestrator_train_step_seconds", 1.0)      # needs rank too
    with pytest.raises(KeyError):
        rec.set("orchestrator_train_los", 1.0)


def test_every_dashboard_query_names_only_series_the_code_exports_and_covers_the_catalogue():
    exported = M.exported_names()
    seen = set()
    for name, d in dashboards.build().items():
        for q in dashboards.queries(d):
            names = set(re.findall(r"\bray_orchestrator_\w+", q))
            assert names, (name, q)
            assert names <= exported, (name, names - exported)
            seen |= names
        assert all(p["targets"] for p in d["panels"])
    missing = {m.exported for m in M.CATALOGUE.values()
               if not {m.exported, m.exported + "_bucket", m.exported + "_sum"} & seen}
    assert not missing, f"catalogue series no dashboard shows: {sorted(missing)}"


def test_the_dashboard_files_in_the_repo_are_the_generated_ones():
    for name, d in dashboards.build().items():
        with open(os.path.join(ROOT, "cluster", "grafana", name)) as f:
            assert json.load(f) == d, f"cluster/grafana/{name} is stale: python -m orchestrator.dashboards"


def test_install_puts_them_beside_rays_generated_dashboards(tmp_path):
    paths = dashboards.install(str(tmp_path))
    assert sorted(os.path.basename(p) for p in paths) == sorted(dashboards.build())
    assert all(os.path.dirname(p) == str(tmp_path / "metrics" / "grafana" / "dashboards") for p in paths)


_EXPOSITION = """\
# TYPE ray_orchestrator_train_loss gauge
ray_orchestrator_train_loss{job="a",attempt="0",WorkerId="w0"} 0.9
ray_orchestrator_train_step{job="a",attempt="0",WorkerId="w0"} 12
ray_orchestrator_train_loss{job="a",attempt="1",WorkerId="w1"} 0.5
ray_orchestrator_train_step{job="a",attempt="1",WorkerId="w1"} 40
ray_orchestrator_train_world_size{job="a",attempt="1",WorkerId="w1"} 2
ray_orchestrator_train_samples_per_second{job="a",attempt="1",WorkerId="w1"} 1000
ray_orchestrator_train_last_checkpoint_timestamp_seconds{job="a",attempt="1",WorkerId="w1"} 990
# TYPE ray_orchestrator_train_input_stall_ratio gauge
ray_orchestrator_train_input_stall_ratio{job="a",attempt="1",rank="0"} 0.01
ray_orchestrator_train_input_stall_ratio{job="a",attempt="1",rank="1"} 0.03
# TYPE ray_orchestrator_serve_requests_total counter
ray_orchestrator_serve_requests_total{app="s",arm="stable",code="200"} {ok}
ray_orchestrator_serve_requests_total{app="s",arm="canary",code="500"} {bad}
# TYPE ray_orchestrator_serve_latency_ms histogram
ray_orchestrator_serve_latency_ms_bucket{app="s",arm="stable",le="10.0"} {fast}
ray_orchestrator_serve_latency_ms_bucket{app="s",arm="stable",le="50.0"} {ok}
ray_orchestrator_serve_latency_ms_bucket{app="s",arm="stable",le="+Inf"} {ok}
ray_orchestrator_serve_latency_ms_count{app="s",arm="stable"} {ok}
ray_orchestrator_serve_latency_ms_sum{app="s",arm="stable"} 1.0
# TYPE ray_orchestrator_serve_canary_share gauge
ray_orchestrator_serve_canary_share{app="s"} 0.25
# TYPE ray_other gauge
ray_other{x="1"} 3
"""


def _exp(ok, bad, fast):
    return _EXPOSITION.replace("{ok}", str(ok)).replace("{bad}", str(bad)).replace("{fast}", str(fast))


def test_top_summarises_the_latest_attempt_and_rates_between_two_scrapes():
    prev, cur = M.parse(_exp(100, 0, 100)), M.parse(_exp(300, 10, 110))
    assert all(s.name.startswith("ray_orchestrator_") for s in cur)
    [row] = top.train_rows(cur, now=1000.0)
    assert row == {"job": "a", "attempt": "1", "step": 40.0, "loss": 0.5, "world_size": 2.0,
                   "samples_per_s": 1000.0, "input_stall": 0.03, "checkpoint_age_s": 10.0}
    [srv] = top.serve_rows(prev, cur, dt=2.0)
    assert srv["req_per_s"] == pytest.approx(105.0)            # (200 + 10) / 2 s
    assert srv["error_share"] == pytest.approx(10 / 210)
    assert srv["p95_ms"] == 50.0                                # 10 of 200 new ones under 10 ms
    assert srv["canary_share"] == 0.25
    assert top.serve_rows([], cur, dt=0.0)[0]["req_per_s"] is None   # one scrape: no rate yet


# ------------------------------------------------------------------------------ live, real Ray
def _scrape(url):
    return M.scrape([url])


def _one(samples, name, **labels):
    found = [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 0])
def test_a_running_train_job_exports_its_kpis_and_top_shows_them(ray_local, metrics_url, tmp_path, stage):
    """A real 2-worker run (ZeRO-1, whose gradient norm DeepSpeed computes, and ZeRO-0 fp32, whose
    rank 0 takes it on log steps), held after step 12 (the hold-file hook): the node's metrics
    endpoint has every training series the dashboards use, with job/attempt/rank labels and the
    job's own values; ``orchestrator top`` shows the job from the same endpoint."""
    import subprocess
    import sys

    from actors.data.shards import write_shards
    from actors.trainer.hooks import TrainHooks
    from conftest import wait_until
    from jobs.examples.datasets import classification
    from orchestrator.spec import parse_spec
    from test_train_elastic import finished, held_at, start_training

    data = str(tmp_path / "data")
    write_shards(classification(1024, seed=5), data, rows_per_shard=128, progress=False)  # as test_train_elastic
    name = f"metrics-{tmp_path.name[-8:]}".lower()
    spec = parse_spec({
        "kind": "train", "name": name, "max_steps": 16, "log_interval": 4, "seed": 3,
        "resources": {"min_workers": 2, "max_workers": 2, "warm_spares": 0},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32, "hidden": 32, "num_classes": 4}},
        "dataset": {"url": data, "shuffle": {"seed": 11}},
        "deepspeed": {"zero_stage": stage, "micro_batch_size": 8, "global_batch_size": 32},
        "optimizer": {"lr": 0.01},
        # checkpoints at 5, 10, 15: none at a log step (4, 8, 12), so the job's log interval and
        # its history's step times cover the same work
        "checkpoint": {"url": str(tmp_path / "ckpt"), "interval_steps": 5, "keep_last": 2}})
    hold = tmp_path / "hold"
    hold.write_text("12")
    t, out = start_training(spec, TrainHooks(hold_file=str(hold)))
    held = tmp_path / "hold.held"
    wait_until(lambda: held_at(held) == (12, 2) or "error" in out, 600, 0.2, "the run held at step 12")
    assert "error" not in out, out.get("error")

    def at_12():
        s = _scrape(metrics_url)
        steps = [x for x in s if x.name == "ray_orchestrator_train_step" and x.labels.get("job") == name]
        ready = steps and steps[0].value == 12 and any(
            x.name == "ray_orchestrator_train_checkpoint_save_seconds" for x in s) and len(
            [x for x in s if x.name == "ray_orchestrator_train_step_seconds" and x.labels.get("job") == name]) == 2
        return s if ready else None
    samples = wait_until(at_12, 90, 0.5, "the step-12 series on the metrics endpoint")
    job = {"job": name}
    attempt = _one(samples, "ray_orchestrator_train_step", **job).labels["attempt"]
    job["attempt"] = attempt
    loss = _one(samples, "ray_orchestrator_train_loss", **job).value
    assert _one(samples, "ray_orchestrator_train_world_size", **job).value == 2
    assert _one(samples, "ray_orchestrator_train_grad_accumulation", **job).value == 2   # 32 / (2 x 8)
    assert _one(samples, "ray_orchestrator_train_learning_rate", **job).value > 0
    assert _one(samples, "ray_orchestrator_train_grad_norm", **job).value > 0
    assert _one(samples, "ray_orchestrator_train_checkpoints_total", **job).value == 2     # steps 5, 10
    sps = _one(samples, "ray_orchestrator_train_samples_per_second", **job).value
    for rank in ("0", "1"):
        assert 0 < _one(samples, "ray_orchestrator_train_step_seconds", rank=rank, **job).value < 60
        assert 0 <= _one(samples, "ray_orchestrator_train_input_stall_ratio", rank=rank, **job).value <= 1
        assert _one(samples, "ray_orchestrator_train_checkpoint_bytes", rank=rank, **job).value > 0
        assert _one(samples, "ray_orchestrator_data_prefetch_depth", rank=rank, **job).value >= 0
    import time
    age = time.time() - _one(samples, "ray_orchestrator_train_last_checkpoint_timestamp_seconds", **job).value
    assert 0 <= age < 300
    assert sum(x.value for x in samples if x.name == "ray_orchestrator_data_shard_verifications_total") >= 1

    shown = subprocess.run([sys.executable, "-m", "orchestrator", "top", "--metrics-url", metrics_url,
                            "--once", "--interval", "0.2"], capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "COLUMNS": "200"})
    assert shown.returncode == 0, shown.stderr
    row = next(line for line in shown.stdout.splitlines() if name in line)
    assert " 12 " in row and f"{loss:.4g}" in row, row

    hold.unlink()
    result = finished(t, out, spec, 16)
    assert result.history[11]["loss"] == pytest.approx(loss, rel=1e-9)   # the gauge is the job's value
    h = {r["step"]: r for r in result.history}
    own = 32 * 4 / (h[12]["t"] - h[8]["t"])                               # the job's own steps 9-12
    assert sps == pytest.approx(own, rel=0.2)


def test_model_flops_come_from_a_declaration_or_six_times_parameters_times_tokens():
    import types

    from actors.trainer.telemetry import flops_per_sample, peak_flops
    model, factory = types.SimpleNamespace(), types.SimpleNamespace()
    assert flops_per_sample(model, factory, (32,), "float32", 1000) is None       # unknown: no MFU
    assert flops_per_sample(model, factory, (128,), "int64", 1000) == 6 * 1000 * 128  # token ids
    factory.flops_per_sample = lambda m: 42.0                                     # the factory declares
    assert flops_per_sample(model, factory, (128,), "int64", 1000) == 42.0
    model.flops_per_sample = 7                                                    # the model wins
    assert flops_per_sample(model, factory, (32,), "float32", 1000) == 7.0
    spec = types.SimpleNamespace(resources=types.SimpleNamespace(peak_tflops_per_worker=None))
    assert peak_flops(spec, torch_device("cpu")) is None                          # CPU: not known
    spec.resources.peak_tflops_per_worker = 312.0
    assert peak_flops(spec, torch_device("cpu")) == 312e12


def torch_device(kind):
    import torch
    return torch.device(kind)
