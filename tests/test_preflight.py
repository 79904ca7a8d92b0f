"""Bad specs are found before anything starts: ``orchestrator validate``, ``orchestrator submit`` and
every ``jobs.*`` entrypoint build the model on PyTorch's meta device against the dataset's shape,
read the dataset's manifest, probe the checkpoint URL and check precision against the devices,
then exit 2 naming the field, having taken no Ray resource."""

from __future__ import annotations

import pytest
import yaml

from actors.data import write_shards
from jobs.examples.datasets import classification, copy_task_tokens
from orchestrator.cli import main as cli


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("data") / "cls")
    write_shards(classification(256, in_dim=32), url, rows_per_shard=64, progress=False)
    return url


def spec_file(tmp_path, data, **changes) -> str:
    spec = yaml.safe_load(open("jobs/examples/mlp_train.yaml"))
    spec["dataset"]["url"] = data
    spec["checkpoint"]["url"] = str(tmp_path / "ckpt")
    for path, value in changes.items():
        node = spec
        *head, last = path.split("__")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    p = tmp_path / "spec.yaml"
    p.write_text(yaml.safe_dump(spec))
    return str(p)


def _regular_file(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("not a directory")
    return str(f / "ckpt")


BAD = [
    ("a factory that does not exist", {"model__factory": "jobs.examples.models:nope"},
     "model.factory", "has no attribute 'nope'"),
    ("a factory that raises for its kwargs", {"model__kwargs": {"in_dim": 32, "widht": 3}},
     "model.kwargs", "unexpected keyword argument 'widht'"),
    ("a dataset URL that does not exist", {"dataset__url": "/nowhere/data"}, "dataset.url", "no dataset at /nowhere/data"),
    ("fp16 with no GPU", {"deepspeed__precision": "fp16", "deepspeed__zero_stage": 2},
     "deepspeed.precision", "fp16 needs a GPU"),
    ("a checkpoint URL under a regular file", {"checkpoint__url": _regular_file}, "checkpoint.url", "cannot write"),
    ("samples the model cannot take", {"model__kwargs": {"in_dim": 16}}, "dataset.url", "do not fit"),
    ("labels the loss cannot take", {"loss": "mse"}, "loss", "mse needs an output shaped like y"),
]


@pytest.mark.parametrize("what, changes, field, words", BAD, ids=[b[0] for b in BAD])
def test_validate_names_the_field_of_a_spec_that_would_fail_at_run_time(data, tmp_path, capsys, what, changes,
                                                                         field, words):
    changes = {k: (v(tmp_path) if callable(v) else v) for k, v in changes.items()}
    assert cli(["validate", spec_file(tmp_path, data, **changes)]) == 2
    err = capsys.readouterr().err
    assert f"  {field}: " in err and words in err, err


@pytest.mark.parametrize("what, changes, field, words", BAD[:3], ids=[b[0] for b in BAD[:3]])
def test_jobs_train_exits_2_for_it_without_touching_ray(data, tmp_path, capsys, no_ray, what, changes, field, words):
    from jobs.train import main
    assert main([spec_file(tmp_path, data, **changes)]) == 2
    assert f"  {field}: " in capsys.readouterr().err


def test_submit_refuses_it_and_stores_nothing(data, tmp_path, capsys, monkeypatch):
    from orchestrator.store import JobStore
    monkeypatch.setenv("ORCHESTRATOR_STORE", str(tmp_path / "jobs.db"))
    assert cli(["submit", spec_file(tmp_path, data, model__factory="nowhere.module:mlp")]) == 2
    assert "  model.factory: cannot import 'nowhere.module:mlp'" in capsys.readouterr().err
    assert JobStore(str(tmp_path / "jobs.db")).list() == []


def test_a_good_spec_passes_and_token_models_are_checked_too(data, tmp_path, capsys):
    assert cli(["validate", spec_file(tmp_path, data)]) == 0
    assert "# dataset: local (256 samples in 4 shards" in capsys.readouterr().out
    tokens = str(tmp_path / "tokens")
    write_shards(copy_task_tokens(n=64, seq_len=16), tokens, rows_per_shard=32, progress=False)
    lm = {"model__factory": "jobs.examples.models:tiny_lm", "model__kwargs": {"seq_len": 16},
          "loss": "lm_cross_entropy", "dataset__url": tokens}
    assert cli(["validate", spec_file(tmp_path, data, **lm)]) == 0
    assert cli(["validate", spec_file(tmp_path, data, **{**lm, "loss": "cross_entropy"})]) == 2
    assert "cross_entropy needs an output [classes]" in capsys.readouterr().err
