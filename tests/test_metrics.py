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
    assert row == {"job": "a", "attempt": 1, "step": 40.0, "loss": 0.5, "world_size": 2.0,
                   "samples_per_s": 1000.0, "input_stall": 0.03, "checkpoint_age_s": 10.0}
    [srv] = top.serve_rows(prev, cur, dt=2.0)
    assert srv["req_per_s"] == pytest.approx(105.0)            # (200 + 10) / 2 s
    assert srv["error_share"] == pytest.approx(10 / 210)
    assert srv["p95_ms"] == 50.0                                # 10 of 200 new ones under 10 ms
    assert srv["canary_share"] == 0.25
    assert top.serve_rows([], cur, dt=0.0)[0]["req_per_s"] is None   # one scrape: no rate yet
