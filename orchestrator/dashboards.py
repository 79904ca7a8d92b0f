"""Grafana dashboards for this system's metrics (training, serving, data, scheduler).

The JSON files in ``cluster/grafana/`` are generated from the panels below
(``python -m orchestrator.dashboards cluster/grafana``; ``tests/test_metrics.py`` fails when they
are stale). :func:`install` copies them where Ray provisions its own generated dashboards
(``<session dir>/metrics/grafana/dashboards``), so a Grafana started with Ray's provisioning
(``grafana-server --config <session dir>/metrics/grafana/grafana.ini``) shows them beside Ray's.
Every query names only series of ``orchestrator.metrics.CATALOGUE``.
"""

from __future__ import annotations

import json
import logging
import os
import sys

log = logging.getLogger("orchestrator.dashboards")

# (title, [(legend, PromQL)], unit)
Panel = tuple[str, list[tuple[str, str]], str]

_J = '{job=~"$job"}'
_A = '{app=~"$app"}'

TRAINING: list[Panel] = [
    ("Loss", [("{{job}} attempt {{attempt}}", f"ray_orchestrator_train_loss{_J}")], "none"),
    ("Gradient norm", [("{{job}} attempt {{attempt}}", f"ray_orchestrator_train_grad_norm{_J}")], "none"),
    ("Learning rate", [("{{job}}", f"ray_orchestrator_train_learning_rate{_J}")], "none"),
    ("Step", [("{{job}} attempt {{attempt}}", f"ray_orchestrator_train_step{_J}")], "none"),
    ("Samples/s", [("{{job}}", f"ray_orchestrator_train_samples_per_second{_J}")], "none"),
    ("Tokens/s", [("{{job}}", f"ray_orchestrator_train_tokens_per_second{_J}")], "none"),
    ("Model FLOPs utilization", [("{{job}}", f"ray_orchestrator_train_mfu{_J}")], "percentunit"),
    ("Model FLOP/s", [("{{job}}", f"ray_orchestrator_train_model_flops_per_second{_J}")], "none"),
    ("Step time per rank", [("{{job}} rank {{rank}}", f"ray_orchestrator_train_step_seconds{_J}")], "s"),
    ("Input stall (share of step time waiting for data)",
     [("{{job}} rank {{rank}}", f"ray_orchestrator_train_input_stall_ratio{_J}")], "percentunit"),
    ("World size and accumulation", [("workers {{job}}", f"ray_orchestrator_train_world_size{_J}"),
                                     ("accumulation {{job}}", f"ray_orchestrator_train_grad_accumulation{_J}")], "none"),
    ("Checkpoint save (training thread)", [("{{job}}", f"ray_orchestrator_train_checkpoint_save_seconds{_J}")], "s"),
    ("Checkpoints saved (1h)", [("{{job}}", f"increase(ray_orchestrator_train_checkpoints_total{_J}[1h])")], "none"),
    ("Checkpoint bytes per rank", [("{{job}} rank {{rank}}", f"ray_orchestrator_train_checkpoint_bytes{_J}")], "bytes"),
    ("Last checkpoint age", [("{{job}}", f"time() - ray_orchestrator_train_last_checkpoint_timestamp_seconds{_J}")], "s"),
    ("Recoveries and their cost", [("recoveries (1h) {{job}}", f"increase(ray_orchestrator_train_recoveries_total{_J}[1h])"),
                                   ("recovery s {{job}}", f"ray_orchestrator_train_recovery_seconds{_J}"),
                                   ("restore s {{job}}", f"ray_orchestrator_train_restore_seconds{_J}")], "none"),
]

SERVING: list[Panel] = [
    ("Requests/s by code and arm",
     [("{{arm}} {{code}}", f"sum by (arm, code) (rate(ray_orchestrator_serve_requests_total{_A}[1m]))")], "reqps"),
    ("Error rate by arm (non-2xx)",  # 0, not "no data", while an arm answers only 2xx
     [("{{arm}}", '(sum by (arm) (rate(ray_orchestrator_serve_requests_total{app=~"$app", code!~"2.."}[1m])) '
                  f'or 0 * sum by (arm) (rate(ray_orchestrator_serve_requests_total{_A}[1m]))) '
                  f'/ sum by (arm) (rate(ray_orchestrator_serve_requests_total{_A}[1m]))')], "percentunit"),
    ("Latency p50 / p95 / p99 by arm",
     [(f"p{q} {{{{arm}}}}", f"histogram_quantile(0.{q}, sum by (le, arm) "
                            f"(rate(ray_orchestrator_serve_latency_ms_bucket{_A}[1m])))") for q in ("50", "95", "99")], "ms"),
    ("Mean batch size", [("{{arm}}", f"sum by (arm) (rate(ray_orchestrator_serve_batch_size_sum{_A}[1m])) / "
                                     f"sum by (arm) (rate(ray_orchestrator_serve_batch_size_count{_A}[1m]))")], "none"),
    ("Forward time per example", [("{{arm}}", f"ray_orchestrator_serve_forward_ms_per_example{_A}")], "ms"),
    ("Queue depth (examples waiting)", [("{{arm}}", f"sum by (arm) (ray_orchestrator_serve_queue_depth{_A})")], "none"),
    ("Canary share", [("{{app}}", f"ray_orchestrator_serve_canary_share{_A}")], "percentunit"),
    ("Gate decisions (5m)", [("{{gate}} {{outcome}}", f"sum by (gate, outcome) "
                                                     f"(increase(ray_orchestrator_serve_gate_decisions_total{_A}[5m]))")], "none"),
    ("Canary gate figures (during a rollout)", [("{{gate}} {{figure}}", f"ray_orchestrator_serve_gate_figures{_A}")], "none"),
]

DATA: list[Panel] = [
    ("Shard bytes fetched/s by node", [("{{node}}", "rate(ray_orchestrator_data_fetched_bytes_total[1m])")], "Bps"),
    ("Shards fetched and cache hits /s", [("fetched {{node}}", "rate(ray_orchestrator_data_fetched_shards_total[1m])"),
                                          ("hits {{node}}", "rate(ray_orchestrator_data_cache_hits_total[1m])")], "none"),
    ("Node cache held vs limit", [("held {{node}}", "ray_orchestrator_data_cache_bytes"),
                                  ("limit {{node}}", "ray_orchestrator_data_cache_limit_bytes")], "bytes"),
    ("Shard verifications and failures /s",
     [("verified {{node}}", "rate(ray_orchestrator_data_shard_verifications_total[5m])"),
      ("failed {{node}}", "rate(ray_orchestrator_data_shard_failures_total[5m])")], "none"),
    ("Prefetch depth per rank", [("{{job}} rank {{rank}}", f"ray_orchestrator_data_prefetch_depth{_J}")], "none"),
]

SCHEDULER: list[Panel] = [
    ("Queue depth by priority", [("{{priority}}", "ray_orchestrator_queue_depth")], "none"),
    ("Running jobs by priority", [("{{priority}}", "ray_orchestrator_running_jobs")], "none"),
    ("Admissions and preemptions /min", [("admit {{priority}}", "60 * rate(ray_orchestrator_admissions_total[5m])"),
                                         ("preempt {{priority}}", "60 * rate(ray_orchestrator_preemptions_total[5m])")], "none"),
    ("Active scheduler (1) and standbys (0)", [("{{scheduler}}", "ray_orchestrator_scheduler_active")], "none"),
    ("Waiting jobs by reason", [("{{reason}}", "ray_orchestrator_jobs_waiting")], "none"),
    ("Queue wait p95 by priority", [("{{priority}}", "histogram_quantile(0.95, sum by (le, priority) "
                                                     "(rate(ray_orchestrator_wait_seconds_bucket[15m])))")], "s"),
]

DASHBOARDS = {"reo-training": ("Orchestrator: training", TRAINING, "job", "ray_orchestrator_train_step"),
              "reo-serving": ("Orchestrator: serving", SERVING, "app", "ray_orchestrator_serve_requests_total"),
              "reo-data": ("Orchestrator: data", DATA, "job", "ray_orchestrator_data_prefetch_depth"),
              "reo-scheduler": ("Orchestrator: scheduler", SCHEDULER, None, None)}


def _dashboard(uid: str, title: str, panels: list[Panel], var: str | None, var_metric: str | None) -> dict:
    out = []
    for i, (ptitle, targets, unit) in enumerate(panels):
        out.append({
            "id": i + 1, "type": "timeseries", "title": ptitle, "datasource": "${datasource}",
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"refId": chr(ord("A") + k), "expr": expr, "legendFormat": legend}
                        for k, (legend, expr) in enumerate(targets)]})
    templating = [{"name": "datasource", "type": "datasource", "query": "prometheus", "hide": 0,
                   "current": {}}]
    if var:
        templating.append({"name": var, "type": "query", "datasource": "${datasource}",
                           "query": f"label_values({var_metric}, {var})", "definition": f"label_values({var_metric}, {var})",
                           "includeAll": True, "multi": True, "allValue": ".*", "refresh": 2, "current": {}})
    return {"uid": uid, "title": title, "tags": ["ray-elastic-orchestrator"], "timezone": "browser",
            "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
            "templating": {"list": templating}, "panels": out}


def build() -> dict[str, dict]:
    """``{file name: dashboard JSON}``."""
    return {f"{uid}.json": _dashboard(uid, *rest) for uid, rest in DASHBOARDS.items()}


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression of a dashboard's panels."""
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def write(directory: str) -> list[str]:
    os.makedirs(directory, exist_ok=True)
    out = []
    for name, d in build().items():
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            json.dump(d, f, indent=1, sort_keys=True)
            f.write("\n")
        out.append(path)
    return out


def install(session_dir: str) -> list[str]:
    """Write the dashboards beside Ray's generated ones in a Ray session directory (on the head
    node); returns the paths written."""
    return write(os.path.join(session_dir, "metrics", "grafana", "dashboards"))


def install_for_ray() -> list[str]:
    """:func:`install` into the session of the Ray this process is connected to, when this machine
    holds its Grafana provisioning (the head node with Ray's dashboard); else nothing."""
    from orchestrator.compat.ray_internals import session_dir
    d = session_dir()
    if not d or not os.path.isdir(os.path.join(d, "metrics", "grafana")):
        return []
    try:
        return install(d)
    except OSError as e:
        log.warning("Grafana dashboards not installed in %s: %s", d, e)
        return []


if __name__ == "__main__":
    for p in write(sys.argv[1] if len(sys.argv) > 1 else "cluster/grafana"):
        print(p)
