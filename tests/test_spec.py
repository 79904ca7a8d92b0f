"""Job specs: every malformed spec fails before anything starts, naming the field and the reason."""

from __future__ import annotations

import copy
import glob
import subprocess
import sys

import pytest
import yaml

from orchestrator import spec as S

TRAIN = {
    "kind": "train", "name": "mlp",
    "resources": {"min_workers": 1, "max_workers": 2},
    "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 32}},
    "dataset": {"url": "/tmp/data"},
    "deepspeed": {"zero_stage": 2, "micro_batch_size": 8, "global_batch_size": 32},
    "checkpoint": {"url": "s3://bucket/ckpt"},
    "max_steps": 10,
}


def _set(d: dict, path: str, value):
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[p]
    if value is _DEL:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


_DEL = object()

# (mutation path, value, expected field path in the error, expected words in the reason)
MALFORMED = [
    ("resources.min_workers", "two", "resources.min_workers", "valid integer"),
    ("resources.min_workers", -1, "resources.min_workers", "greater than or equal to 1"),
    ("resources.max_workers", 0, "resources.max_workers", "greater than or equal to 1"),
    ("resources.min_workers", 3, "resources.min_workers", "must be <= max_workers"),
    ("resources.cpus_per_worker", 0, "resources.cpus_per_worker", "greater than 0"),
    ("resources.gpus_per_worker", -1, "resources.gpus_per_worker", "greater than or equal to 0"),
    ("resources.health_check_interval_s", 0, "resources.health_check_interval_s", "greater than or equal to 0.1"),
    ("resources.warm_spares", -1, "resources.warm_spares", "greater than or equal to 0"),
    ("resources.warm_spare_keep_alive_s", 1, "resources.warm_spare_keep_alive_s", "greater than or equal to 10"),
    ("deepspeed.zero_stage", 4, "deepspeed.zero_stage", "0, 1, 2 or 3"),
    ("deepspeed.precision", "fp8", "deepspeed.precision", "'fp32', 'bf16' or 'fp16'"),
    ("deepspeed.global_batch_size", 36, "deepspeed.global_batch_size", "not a multiple of micro_batch_size"),
    ("deepspeed.micro_batch_size", 0, "deepspeed.micro_batch_size", "greater than or equal to 1"),
    ("deepspeed.offload_params", True, "deepspeed.offload_params", "zero_stage 3"),
    ("dataset.url", "ftp://host/data", "dataset.url", "unsupported URL scheme 'ftp'"),
    ("checkpoint.url", "s3:///no-bucket", "checkpoint.url", "no bucket"),
    ("checkpoint.url", "", "checkpoint.url", "at least 1 character"),
    ("checkpoint.interval_steps", 0, "checkpoint.interval_steps", "greater than or equal to 1"),
    ("model.factory", "not a factory", "model.factory", "package.module:function"),
    ("name", "Has Spaces", "name", "lowercase"),
    ("optimizer", {"lr": -1}, "optimizer.lr", "greater than 0"),
    ("optimizer", {"betas": [0.9, 1.5]}, "optimizer.betas", "[0, 1)"),
    ("dataset.shuffle", {"mode": "random"}, "dataset.shuffle.mode", "'global', 'local', 'partitioned' or 'none'"),
    ("dataset.shuffle", {"tail": "pad"}, "dataset.shuffle.tail", "'drop' or 'carry'"),
    ("scheduling", {"priority": "urgent"}, "scheduling.priority", "'low', 'normal', 'high' or 'critical'"),
    ("scheduling", {"max_retries": -1}, "scheduling.max_retries", "greater than or equal to 0"),
    ("scheduling", {"time_limit": 0}, "scheduling.time_limit", "must be > 0 seconds"),
    ("scheduling", {"time_limit": "-5m"}, "scheduling.time_limit", "expected a duration like 90s"),
    ("scheduling", {"time_limit": "2 weeks"}, "scheduling.time_limit", "expected a duration like 90s"),
    ("unknown_top_level", 1, "unknown_top_level", "unknown key"),
    ("deepspeed.zero_stages", 2, "deepspeed.zero_stages", "unknown key"),
    ("model", _DEL, "model", "required field is missing"),
    ("max_steps", -5, "max_steps", "greater than or equal to 1"),
]


@pytest.mark.parametrize("path,value,field,reason", MALFORMED, ids=[f"{m[0]}={m[1]!r}"[:60] for m in MALFORMED])
def test_malformed_train_spec_names_field_and_reason(path, value, field, reason):
    data = _set(copy.deepcopy(TRAIN), path, value)
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(data)
    fields = dict(exc.value.errors)
    assert field in fields, f"expected an error at {field}, got {exc.value.errors}"
    assert reason in fields[field], fields[field]
    assert field in str(exc.value)


@pytest.mark.parametrize("given,seconds", [(5400, 5400.0), (12.5, 12.5), ("90s", 90.0), ("30m", 1800.0),
                                           ("2h", 7200.0), ("1h30m", 5400.0), ("1d", 86400.0),
                                           ("01:30:00", 5400.0), ("10:00", 600.0),
                                           ("1-02:00:00", 93600.0), (None, None)])
def test_time_limit_is_seconds_from_a_number_a_duration_or_slurm_clock_time(given, seconds):
    data = _set(copy.deepcopy(TRAIN), "scheduling", {"time_limit": given})
    assert S.parse_spec(data).scheduling.time_limit == seconds


def test_global_batch_without_split_for_every_worker_count_is_rejected():
    data = copy.deepcopy(TRAIN)
    data["resources"] = {"min_workers": 3, "max_workers": 3}   # 32 % (8*3) != 0
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(data)
    (field, reason), = exc.value.errors
    assert field == "deepspeed.global_batch_size"
    assert "for any allowed worker count" in reason and "[3, 3]" in reason


def test_worker_counts_without_split_are_listed_not_rejected():
    data = copy.deepcopy(TRAIN)
    data["resources"] = {"min_workers": 1, "max_workers": 4}   # 3 does not split 32 over 8
    spec = S.parse_spec(data)
    assert S.feasible_worker_counts(spec) == [1, 2, 4]
    assert any("worker counts [3] have no integer split" in n for n in S.describe(spec))


def test_gradient_accumulation_keeps_global_batch_or_says_why():
    assert S.gradient_accumulation(64, 8, 2) == 4
    assert S.gradient_accumulation(64, 8, 4) == 2
    with pytest.raises(ValueError, match="cannot be split over 3 workers"):
        S.gradient_accumulation(64, 8, 3)


def test_several_errors_are_reported_together():
    data = copy.deepcopy(TRAIN)
    data["resources"]["cpus_per_worker"] = -1
    data["deepspeed"]["zero_stage"] = 9
    data["bogus"] = True
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(data)
    assert {f for f, _ in exc.value.errors} >= {"resources.cpus_per_worker", "deepspeed.zero_stage", "bogus"}


@pytest.mark.parametrize("text,reason", [
    ("", "spec is empty"),
    ("- just\n- a list\n", "must be a YAML mapping"),
    ("kind: train\nname: [unclosed\n", "not valid YAML at line"),
    ("name: x\n", "required field is missing"),
    ("kind: batch\nname: x\n", "unknown job kind 'batch'"),
])
def test_unparseable_or_shapeless_files_fail_clearly(tmp_path, text, reason):
    p = tmp_path / "spec.yaml"
    p.write_text(text)
    with pytest.raises(S.SpecError) as exc:
        S.load_spec(p)
    assert reason in str(exc.value)
    assert str(p) in str(exc.value)


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(S.SpecError, match="cannot read spec"):
        S.load_spec(tmp_path / "nope.yaml")


def test_tune_search_space_must_name_trial_fields():
    data = {"kind": "tune", "name": "t", "trial": copy.deepcopy(TRAIN), "results_url": "memory://r",
            "search_space": {"optimizer.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
                             "optimizer.learning_rate": {"type": "choice", "values": [1]}}}
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(data)
    assert exc.value.errors == [("search_space.optimizer.learning_rate", "not a field of the trial spec")]


@pytest.mark.parametrize("domain,reason", [
    ({"type": "loguniform", "low": 0, "high": 1}, "loguniform needs low > 0"),
    ({"type": "uniform", "low": 2, "high": 1}, "must be < high"),
    ({"type": "choice", "values": []}, "non-empty 'values'"),
    ({"type": "normal", "low": 0, "high": 1}, "'choice', 'uniform', 'loguniform', 'grid' or 'randint'"),
])
def test_bad_search_domain_is_rejected(domain, reason):
    data = {"kind": "tune", "name": "t", "trial": copy.deepcopy(TRAIN), "results_url": "memory://r",
            "search_space": {"optimizer.lr": domain}}
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(data)
    assert any(f.startswith("search_space.optimizer.lr") and reason in r for f, r in exc.value.errors), exc.value.errors


def test_serve_spec_bounds():
    base = {"kind": "serve", "name": "s", "checkpoint_url": "memory://c",
            "model": {"factory": "jobs.examples.models:mlp"}, "input_shape": [32]}
    assert S.parse_spec(base).replicas.min_replicas == 1
    assert (S.parse_spec(base).graph_mode, S.parse_spec(base).access_log) == ("auto", False)
    bad = dict(base, replicas={"min_replicas": 3, "max_replicas": 2}, input_shape=[0], graph_mode="jit",
               access_log="sometimes")
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(bad)
    fields = {f for f, _ in exc.value.errors}
    assert {"replicas.min_replicas", "input_shape", "graph_mode", "access_log"} <= fields


def test_serve_spec_ingress_defaults_to_auto_and_names_the_field_for_an_unknown_one():
    base = {"kind": "serve", "name": "s", "checkpoint_url": "memory://c",
            "model": {"factory": "jobs.examples.models:mlp"}, "input_shape": [32]}
    assert S.parse_spec(base).ingress == "auto"
    for choice in ("haproxy", "direct", "proxy"):
        assert S.parse_spec(dict(base, ingress=choice)).ingress == choice
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(dict(base, ingress="nginx"))
    assert [f for f, _ in exc.value.errors] == ["ingress"]
    assert "'auto', 'haproxy', 'direct' or 'proxy'" in exc.value.errors[0][1]


def test_pipeline_rejects_cycles_and_unknown_dependencies():
    stage = lambda n, deps: {"name": n, "depends_on": deps, "spec": copy.deepcopy(TRAIN)}  # noqa: E731
    cyc = {"kind": "pipeline", "name": "p", "stages": [stage("a", ["b"]), stage("b", ["a"])]}
    with pytest.raises(S.SpecError, match="dependency cycle"):
        S.parse_spec(cyc)
    unk = {"kind": "pipeline", "name": "p", "stages": [stage("a", ["zz"])]}
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(unk)
    assert exc.value.errors[0][0] == "stages.a.depends_on"
    ok = {"kind": "pipeline", "name": "p", "stages": [stage("c", ["a", "b"]), stage("a", []), stage("b", ["a"])]}
    assert S.topo_order(S.parse_spec(ok)) == ["a", "b", "c"]


def test_nested_stage_errors_carry_the_stage_path():
    bad = copy.deepcopy(TRAIN)
    bad["resources"]["min_workers"] = 0
    p = {"kind": "pipeline", "name": "p", "stages": [{"name": "a", "spec": bad}]}
    with pytest.raises(S.SpecError) as exc:
        S.parse_spec(p)
    assert exc.value.errors[0][0] == "stages[0].spec.resources.min_workers"


def test_resolved_spec_round_trips_through_yaml():
    spec = S.parse_spec(copy.deepcopy(TRAIN))
    again = S.parse_spec(yaml.safe_load(S.dump_spec(spec)))
    assert again == spec
    assert spec.dataset.shuffle.mode == "auto" and spec.checkpoint.keep_last == 3


def test_with_overrides_revalidates():
    spec = S.parse_spec(copy.deepcopy(TRAIN))
    assert S.with_overrides(spec, {"optimizer.lr": 0.01}).optimizer.lr == 0.01
    with pytest.raises(S.SpecError, match="deepspeed.zero_stage"):
        S.with_overrides(spec, {"deepspeed.zero_stage": 5})


@pytest.mark.parametrize("path", sorted(glob.glob("jobs/examples/*.yaml")))
def test_every_example_spec_is_valid(path):
    S.load_spec(path)


@pytest.mark.parametrize("path, kind, names", [
    ("jobs/examples/mlp_serve.yaml", "serve", ["mlp-serve"]),
    ("jobs/examples/mlp_pipeline.yaml", "pipeline", ["mlp-pipeline-train", "mlp-pipeline-tune", "mlp-pipeline-serve"]),
])
def test_cli_validate_accepts_the_serve_and_pipeline_examples(path, kind, names):
    r = subprocess.run([sys.executable, "-m", "orchestrator", "validate", path, "--offline"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"valid {kind} spec" in r.stdout and all(f"name: {n}" in r.stdout for n in names), r.stdout


def test_cli_validate_prints_resolved_spec_or_every_error(tmp_path):
    good = subprocess.run([sys.executable, "-m", "orchestrator", "validate", "jobs/examples/mlp_train.yaml",
                           "--offline"], capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "valid train spec" in good.stdout and "zero_stage: 1" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: train\nname: x\nresources: {min_workers: 0}\nsurprise: 1\n")
    out = subprocess.run([sys.executable, "-m", "orchestrator", "validate", str(bad)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    for field in ("resources.min_workers", "surprise", "model", "dataset", "checkpoint"):
        assert f"  {field}: " in out.stderr
