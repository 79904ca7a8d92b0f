"""``make demo`` runs ``python -m jobs.demo``: the whole product, end to end, on local Ray; and the
README's observability setup, for real, on the same run.

The demo (train with a worker killed, tune, serve) runs once, on local Ray started with
``RAY_GRAFANA_HOST``/``RAY_PROMETHEUS_HOST`` as the README starts it, and, where Debian's
``prometheus`` is installed, with Prometheus started from the config Ray generates in its session
directory, which finds every node through Ray's service-discovery file. One test checks what the
demo did; the other that every PromQL query of every panel of our Grafana dashboards answers with
data over the demo's run, except the few in :data:`EXEMPT`, whose series this demo cannot produce
(each with its reason). ``.ci/run`` installs Debian's ``prometheus`` package when it is missing;
elsewhere the Prometheus test is skipped without it (the demo test still runs).
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
from dataclasses import dataclass

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



@dataclass
class DemoRun:
    returncode: int
    out: str              # the demo's output (stdout and stderr)
    summary: dict | None
    session: str | None   # Ray's session directory
    prom: str | None      # Prometheus's URL, when it runs
    prom_error: str | None  # why Prometheus could not be set up, if it could not
    t_start: float = 0.0
    t_end: float = 0.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo, run once for both tests of this module, with Prometheus beside it if installed."""
    import ray
    if ray.is_initialized():
        ray.shutdown()  # the demo starts its own local Ray with the dashboard (Jobs API)
    tmp = tmp_path_factory.mktemp("demo")
    wait_until(_agent_port_free, 60, 0.5, "port 52365 (a Ray still running here?)")
    prom_port, grafana_port, serve_port = free_ports(3)
    prom = f"http://127.0.0.1:{prom_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "AWS_"))}
    # as the README starts Ray: its dashboard queries this Prometheus and embeds this Grafana
    env.update(RAY_PROMETHEUS_HOST=prom, RAY_GRAFANA_HOST=f"http://127.0.0.1:{grafana_port}")
    out, log = tmp / "demo", tmp / "demo.log"
    proc = prometheus = None
    prom_error, session, t_start = None, None, time.time()
    try:
        with open(log, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, "-m", "jobs.demo", "--out", str(out), "--steps", "30",
                 "--kill-after-step", "10", "--requests", "100", "--serve-seconds", "8",
                 "--port", str(serve_port)],
                cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)

        def printed(pattern: str):
            return re.search(pattern, log.read_text()) or proc.poll() is not None
        found = wait_until(lambda: printed(r"Ray session (\S+) "), 300, 0.5, "the demo's Ray session")
        if found is not True:
            session, dashboard = found.group(1), printed(r"Ray dashboard at (\S+)").group(1)
        if PROMETHEUS is None:
            prom_error = "needs Debian's prometheus (.ci/run installs it)"
        elif session is not None:
            try:
                prometheus, t_start = _start_prometheus(tmp, session, dashboard, prom, prom_port)
            except AssertionError as e:  # the demo test still stands; the Prometheus test says why
                prom_error = f"{type(e).__name__}: {e}"
        try:
            proc.wait(1500)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        t_end = time.time()
        summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else None
        yield DemoRun(proc.returncode, log.read_text(), summary, session,
                      prom if prometheus is not None else None, prom_error, t_start, t_end)
    finally:
        if proc is not None:
            _stop(proc)
        if prometheus is not None:
            _stop(prometheus)


def _start_prometheus(tmp, session: str, dashboard: str, prom: str, prom_port: int):
    """Prometheus from Ray's generated config (a shorter scrape interval), once it finds Ray's
    nodes and the Ray dashboard reaches it; returns the process and when it started."""
    rays = open(os.path.join(session, "metrics", "prometheus", "prometheus.yml")).read()
    sd_file = os.path.join(session, "prom_metrics_service_discovery.json")
    assert f"'{sd_file}'" in rays, rays               # every node, through Ray's discovery file
    ours = re.sub(r"(scrape_interval|evaluation_interval): 10s", rf"\1: {SCRAPE_S}s", rays)
    assert ours.count(f"{SCRAPE_S}s") == 2, rays
    (tmp / "prometheus.yml").write_text(ours)
    t_start = time.time()
    with open(tmp / "prometheus.log", "w") as f:
        prometheus = subprocess.Popen(
            [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
            stdout=f, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _get(f"{prom}/api/v1/targets")["data"]["activeTargets"], 60, 0.5,
                   "Prometheus to find Ray's nodes through the service-discovery file")
        # the Ray dashboard reaches Prometheus (its metrics view), and Ray provisions Grafana with it
        wait_until(lambda: _get(f"{dashboard}/api/prometheus_health", headers=_ray_token_header())["result"],
                   60, 0.5, "the Ray dashboard to reach Prometheus")
        datasources = os.path.join(session, "metrics", "grafana", "provisioning", "datasources")
        assert any(prom in open(os.path.join(datasources, n)).read() for n in os.listdir(datasources))
    except BaseException:
        _stop(prometheus)
        raise
    return prometheus, t_start


@pytest.mark.slow
@pytest.mark.multinode  # runs after the tests sharing the session Ray, which it must shut down
def test_demo_runs_the_whole_product(demo):
    tail = demo.out[-8000:]
    assert demo.returncode == 0, tail
    summary = demo.summary
    assert summary["ray_session"] == demo.session
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
    assert summary["serve"]["requests"] == 100 and summary["serve"]["p50_ms"] > 0
    for p in summary["plots"]:
        assert os.path.getsize(p) > 1000, p
    for line in ("[demo 6/6] summary", "chaos", "tune", "serve"):
        assert line in demo.out


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.skipif(PROMETHEUS is None, reason="needs Debian's prometheus (.ci/run installs it)")
def test_prometheus_from_rays_config_answers_every_dashboard_query(demo):
    assert demo.prom_error is None, demo.prom_error
    assert demo.returncode == 0, demo.out[-4000:]
    prom, session, t_start, t_end = demo.prom, demo.session, demo.t_start, demo.t_end

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
