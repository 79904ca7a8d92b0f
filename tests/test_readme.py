"""The README stays true: every command in its shell blocks is run by a test here or elsewhere
(named below), by ``make demo``, or is listed with the reason it cannot run on this machine."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from cluster.configs import aws_ami_lookup_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BIN = os.path.dirname(sys.executable)


def readme_commands() -> list[str]:
    text = open(README).read()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                cmds.append(line)
    return cmds


# command prefix -> where it runs ("file.py::test" is checked to exist)
COVERED = {
    "make demo": "tests/test_demo.py::test_demo_runs_the_whole_product",
    "make test": ".ci/run (CI runs exactly this)",
    "orchestrator validate": "tests/test_readme.py::test_readme_cli_commands_run",
    "orchestrator data write": "tests/test_readme.py::test_readme_cli_commands_run",
    "orchestrator data inspect": "tests/test_readme.py::test_readme_cli_commands_run",
    "orchestrator export": "tests/test_zero_reshard.py::test_export_cli_matches_zero_to_fp32",
    "python -m jobs.train": "tests/test_readme.py::test_readme_train_command_runs",
    "ray job submit": "tests/test_service.py::test_ray_job_submit_runs_a_train_spec",
    "orchestrator submit": "tests/test_service.py::test_admitted_jobs_run_as_ray_jobs_that_show_in_ray_job_list",
    "orchestrator queue": "tests/test_cli_jobs.py",
    "orchestrator quota": "tests/test_cli_quota.py::test_quota_set_list_and_delete",
    "orchestrator status": "tests/test_cli_jobs.py",
    "orchestrator logs": "tests/test_service.py",
    "orchestrator cancel": "tests/test_service.py::test_cancel_stops_the_ray_job_and_cancelling_again_is_an_error",
    "orchestrator cluster": "tests/test_cluster_yaml.py",
    "export RAY_AUTH_MODE=token": "tests/test_service.py (the ray start fixture uses token auth)",
    "orchestrator scheduler": "tests/test_cluster_autoscaling.py::test_queued_job_that_does_not_fit_is_scaled_for_by_the_scheduler_runs_and_nodes_go_idle_away",
    "python -m jobs.tune": "tests/test_tune.py",
    "python -m jobs.serve jobs/examples/mlp_serve.yaml": "tests/test_serve.py::test_the_serve_example_serves_a_training_checkpoint_over_http",
    "python -m jobs.serve": "tests/test_demo.py::test_demo_runs_the_whole_product (the pipeline's serve stage runs it)",
    "RAY_SERVE_ENABLE_HA_PROXY=1": "tests/test_serve.py::test_jobs_serve_starting_ray_serves_the_port_through_haproxy_else_direct_ingress ([runs]: jobs.serve starts Ray with the same flags)",
    "python -m cluster.configs": "tests/test_cluster_yaml.py::test_validate_command_checks_every_shipped_yaml_and_fails_on_a_bad_one",
    'eval "$(python -m cluster.local up)"': "tests/test_cluster_autoscaling.py (its fixture runs `up`, then `down`)",
    "python -m cluster.local status": "tests/test_cluster_yaml.py::test_local_cluster_commands_without_a_running_cluster",
    "python -m cluster.local down": "tests/test_cluster_autoscaling.py (its fixture runs `up`, then `down`)",
    "prometheus --config.file=": "tests/test_demo.py::test_prometheus_from_rays_config_answers_every_dashboard_query",
    "RAY_GRAFANA_HOST=": "tests/test_demo.py::test_prometheus_from_rays_config_answers_every_dashboard_query",
}
NOT_RUNNABLE_HERE = {
    aws_ami_lookup_command("us-west-2"):
        "needs AWS credentials; tests/test_cluster_yaml.py checks it is the command aws.yaml and the "
        "validator give",
    "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128":
        "CUDA wheel: needs the PyTorch index and a GPU, neither reachable from CI",
    "pip install -e .": "what `make` does (with the CPU torch) on every CI run",
    "grafana-server --homepath /usr/share/grafana --config /tmp/ray/session_latest/metrics/grafana/grafana.ini web":
        "Grafana is not packaged for this machine; the dashboards are tested by their queries "
        "(tests/test_metrics.py, tests/test_demo.py)",
}


def test_every_readme_command_is_run_somewhere():
    missing = []
    for cmd in readme_commands():
        if cmd in NOT_RUNNABLE_HERE:
            continue
        where = next((w for p, w in COVERED.items() if cmd.startswith(p)), None)
        if where is None:
            missing.append(cmd)
            continue
        path, _, test = where.partition("::")
        path, test = path.split(" ")[0], test.split(" ")[0]
        assert os.path.exists(os.path.join(ROOT, path)), f"{cmd!r}: {path} does not exist"
        if test:
            src = open(os.path.join(ROOT, path)).read()
            assert f"def {test}(" in src, f"{cmd!r}: {where} does not exist"
    assert not missing, f"README commands no test runs: {missing}"


def _run(cmd: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    return subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_readme_cli_commands_run(tmp_path):
    cmds = [c for c in readme_commands() if c.startswith(("orchestrator validate",
                                                          "orchestrator data"))]
    assert len(cmds) >= 3
    for cmd in cmds:
        r = _run(cmd.replace("/tmp/cls", str(tmp_path / "cls")), ROOT)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        if cmd.startswith("orchestrator validate"):
            assert "mlp-classifier" in r.stdout
        if "inspect" in cmd:
            assert "4096" in r.stdout


@pytest.mark.slow
def test_readme_train_command_runs(tmp_path, ray_local):
    """``python -m jobs.train SPEC --set ...`` (in-process on the session's Ray)."""
    from actors.data import write_shards
    from jobs.examples.datasets import classification
    from jobs.train import main
    cmd = next(c for c in readme_commands() if c.startswith("python -m jobs.train"))
    args = cmd.split()[3:]
    data = str(tmp_path / "data")
    write_shards(classification(1024, seed=1), data, rows_per_shard=256, progress=False)
    args += ["--set", f"dataset.url={data}", "--set", f"checkpoint.url={tmp_path / 'ckpt'}",
             "--set", "max_steps=6", "--set", "checkpoint.interval_steps=3"]
    assert main(args) == 0
    assert (tmp_path / "ckpt" / "summary.json").exists()
