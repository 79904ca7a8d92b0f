"""The README's observability setup, for real: ``make demo``'s pipeline (train with a worker
killed, tune, serve) on local Ray started with ``RAY_GRAFANA_HOST``/``RAY_PROMETHEUS_HOST``, and
Debian's ``prometheus`` started from the config Ray generates in its session directory, which
finds every node through Ray's service-discovery file. Every PromQL query of every panel of our
Grafana dashboards must answer with data over the demo's run, except the few in :data:`EXEMPT`,
whose series this demo cannot produce (each with its reason).

``.ci/run`` installs Debian's ``prometheus`` package when it is missing; elsewhere the test is
skipped without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest

from conftest import ROOT, free_ports, wait_until
from orchestrator import dashboards

PROMETHEUS = shutil.which("prometheus")
SCRAPE_S = 2   # Ray's generated config scrapes every 10 s; the test's copy every 2 s (short demo)

# series the demo cannot produce on this machine -> why; a query is exempt when every series it
# names is here (keep this short: a panel the demo can feed belongs in the demo, not here)
EXEMPT = {
    "ray_orchestrator_train_tokens_per_second": "the demo's inputs are float features, not tokens",
    "ray_orchestrator_train_mfu": "CPU workers without resources.peak_tflops_per_worker: no peak to divide by",
    **{f"ray_orchestrator_data_{s}": "the node cache holds remote (fsspec) datasets; the demo's is on local disk"
       for s in ("fetched_bytes_total", "fetched_shards_total", "cache_hits_total", "cache_bytes",
                 "cache_limit_bytes")},
    "ray_orchestrator_data_shard_failures_total": "no shard of the demo fails verification",
    "ray_orchestrator_preemptions_total": "the demo's one pipeline preempts nothing",
    **{s: "the demo's serve stage rolls out no canary (a second model version and its gated traffic: "
          "not cheap)" for s in ("ray_orchestrator_serve_gate_decisions_total",
                                 "ray_orchestrator_serve_gate_figures")},
}


def _get(url: str, timeout: float = 10.0, headers: dict | None = None):
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
        return json.loads(r.read())


def _ray_token_header() -> dict:
    """The Ray dashboard's token (Ray's default token auth), where Ray keeps it."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not token and os.path.exists(path):
        token = open(path).read()
    return {"Authorization": f"Bearer {token.strip()}"} if token else {}


def _concrete(expr: str) -> str:
    """A panel's query as Grafana sends it with "All" chosen for its variable."""
    return expr.replace("$job", ".*").replace("$app", ".*")


def _series_with_data(prom: str, expr: str, start: float, end: float) -> int:
    q = urllib.parse.urlencode({"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}",
                                "step": f"{SCRAPE_S}s"})
    r = _get(f"{prom}/api/v1/query_range?{q}")
    assert r["status"] == "success", (expr, r)
    return sum(1 for s in r["data"]["result"] if s["values"])


def _agent_port_free() -> bool:
    """Ray's dashboard agent port (which the demo's Jobs API needs) has no listener (a Ray that
    a test before this one shut down may take a moment to go)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", 52365))
            return True
        except OSError:
            return False


def _stop(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)   # the demo's Ray shuts down with it
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.mark.slow
@pytest.mark.multinode  # runs after the tests sharing the session Ray, which it must shut down
@pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (.ci/run installs it)")
def test_prometheus_from_rays_config_answers_every_dashboard_query(tmp_path):
    import ray
    if ray.is_initialized():
        ray.shutdown()  # the demo starts its own local Ray with the dashboard (Jobs API)
    wait_until(_agent_port_free, 60, 0.5, "port 52365 (a Ray still running here?)")
    prom_port, grafana_port, serve_port = free_ports(3)
    prom = f"http://127.0.0.1:{prom_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    # as the README starts Ray: its dashboard queries this Prometheus and embeds this Grafana
    env.update(RAY_PROMETHEUS_HOST=prom, RAY_GRAFANA_HOST=f"http://127.0.0.1:{grafana_port}")
    out, log = tmp_path / "demo", tmp_path / "demo.log"
    demo = prometheus = None
    try:
        with open(log, "w") as f:
            demo = subprocess.Popen(
                [sys.executable, "-m", "jobs.demo", "--out", str(out), "--steps", "20",
                 "--kill-after-step", "10", "--requests", "100", "--serve-seconds", "8",
                 "--port", str(serve_port)],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)

        def printed(pattern: str):
            return re.search(pattern, log.read_text()) or demo.poll() is not None
        session = wait_until(lambda: printed(r"Ray session (\S+) "), 300, 0.5, "the demo's Ray session")
        assert session is not True, f"the demo exited {demo.returncode}:\n{log.read_text()[-4000:]}"
        session, dashboard = session.group(1), printed(r"Ray dashboard at (\S+)").group(1)

        # Ray's generated config, as the README runs it, with a shorter scrape interval
        rays = open(os.path.join(session, "metrics", "prometheus", "prometheus.yml")).read()
        sd_file = os.path.join(session, "prom_metrics_service_discovery.json")
        assert f"'{sd_file}'" in rays, rays               # every node, through Ray's discovery file
        ours = re.sub(r"(scrape_interval|evaluation_interval): 10s", rf"\1: {SCRAPE_S}s", rays)
        assert ours.count(f"{SCRAPE_S}s") == 2, rays
        (tmp_path / "prometheus.yml").write_text(ours)
        t_start = time.time()
        with open(tmp_path / "prometheus.log", "w") as f:
            prometheus = subprocess.Popen(
                [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                 f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                stdout=f, stderr=subprocess.STDOUT)
        wait_until(lambda: _get(f"{prom}/api/v1/targets")["data"]["activeTargets"], 60, 0.5,
                   "Prometheus to find Ray's nodes through the service-discovery file")

        # the Ray dashboard reaches Prometheus (its metrics view), and Ray provisions Grafana with it
        wait_until(lambda: _get(f"{dashboard}/api/prometheus_health", headers=_ray_token_header())["result"], 60, 0.5,
                   "the Ray dashboard to reach Prometheus")
        datasources = os.path.join(session, "metrics", "grafana", "provisioning", "datasources")
        assert any(prom in open(os.path.join(datasources, n)).read() for n in os.listdir(datasources))

        assert demo.wait(1200) == 0, log.read_text()[-4000:]
        t_end = time.time()
        summary = json.loads((out / "summary.json").read_text())
        assert summary["ray_session"] == session and summary["train"]["killed_pid"]

        # our dashboards beside Ray's own, as Grafana provisions them
        installed = os.path.join(session, "metrics", "grafana", "dashboards")
        names = set(os.listdir(installed))
        assert set(dashboards.build()) <= names and names - set(dashboards.build()), names
        for name, d in dashboards.build().items():
            with open(os.path.join(installed, name)) as f:
                assert json.load(f) == d, name

        # every panel's query answers with data over the demo's run (the shipped JSON files)
        targets = _get(f"{prom}/api/v1/targets")["data"]["activeTargets"]
        assert targets and all(t["scrapePool"] == "ray" for t in targets), targets
        empty, exempt = [], []
        for name in sorted(dashboards.build()):
            with open(os.path.join(ROOT, "cluster", "grafana", name)) as f:
                d = json.load(f)
            for p in d["panels"]:
                for expr in dashboards.queries({"panels": [p]}):
                    series = set(re.findall(r"\bray_orchestrator_\w+", expr))
                    if series and series <= set(EXEMPT):
                        exempt.append((name, p["title"], expr))
                        continue
                    if _series_with_data(prom, _concrete(expr), t_start, t_end) == 0:
                        empty.append(f"{name} / {p['title']}: {expr}")
        assert not empty, "dashboard queries with no data over the demo's run:\n" + "\n".join(empty)
        # an exemption that the demo does feed is stale: take it off the list
        stale = [s for s in EXEMPT if _series_with_data(prom, s, t_start, t_end)]
        assert not stale, f"EXEMPT series the demo exports after all: {stale}"
    finally:
        if demo is not None:
            _stop(demo)
        if prometheus is not None:
            _stop(prometheus)
