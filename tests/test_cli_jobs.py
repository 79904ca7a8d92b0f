"""`orchestrator submit | status | queue | cancel | logs` against a real store: a SQLite file and a
PostgreSQL database (a plain ``postgresql://`` URL, as a user writes it)."""

from __future__ import annotations

import os

import pytest
import yaml

from orchestrator.cli import main
from orchestrator.store import JobStore

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "jobs", "examples", "mlp_train.yaml")


@pytest.fixture
def db(tmp_path, monkeypatch, store_url):
    """A store URL on each backend, and the example's dataset where its relative URL points
    (submit reads its manifest before storing anything)."""
    from actors.data import write_shards
    from jobs.examples.datasets import classification
    monkeypatch.chdir(tmp_path)
    write_shards(classification(256, in_dim=32), "demo_out/data/classification", rows_per_shard=128, progress=False)
    monkeypatch.setenv("ORCHESTRATOR_STORE", store_url)
    return store_url


def test_submit_of_a_spec_whose_dataset_is_missing_exits_2_and_stores_nothing(db, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(open(EXAMPLE))
    data["dataset"]["url"] = str(tmp_path / "nothing-here")
    bad.write_text(yaml.safe_dump(data))
    assert main(["submit", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "dataset.url: no dataset at" in err and "nothing-here" in err
    assert JobStore(db).list() == []


def submit(capsys, *args) -> str:
    assert main(["submit", EXAMPLE, *args]) == 0
    return capsys.readouterr().out.split()[0]


def test_submit_queues_the_job_and_prints_its_id(db, capsys):
    jid = submit(capsys)
    assert JobStore(db).get(jid).state == "queued"


def test_submit_of_an_invalid_spec_exits_2_and_stores_nothing(db, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    data = yaml.safe_load(open(EXAMPLE))
    data["resources"]["min_workers"] = 0
    bad.write_text(yaml.safe_dump(data))
    assert main(["submit", str(bad)]) == 2
    assert "resources.min_workers" in capsys.readouterr().err
    assert JobStore(db).list() == []


def test_submit_rejects_a_spec_that_can_never_fit_the_known_cluster(db, capsys):
    assert main(["submit", EXAMPLE, "--cluster", "1x0.5"]) == 2
    assert "can never fit" in capsys.readouterr().err
    assert JobStore(db).list() == []
    assert main(["submit", EXAMPLE, "--cluster", "2x1"]) == 0


def test_queue_is_a_table_of_waiting_and_running_jobs(db, capsys):
    a, b = submit(capsys), submit(capsys)
    st = JobStore(db)
    st.transition(a, "admitted", "fits")
    st.transition(b, "cancelled", "no")
    assert main(["queue"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:5] == ["ID", "KIND", "TEAM", "PRIORITY", "STATE"]
    assert len(out) == 2 and out[1].split()[:5] == [a, "train", "research", "normal", "admitted"]
    assert main(["queue", "--all"]) == 0
    assert b in capsys.readouterr().out


def test_status_shows_the_history_with_reasons(db, capsys):
    jid = submit(capsys)
    JobStore(db).transition(jid, "admitted", "fits on n0")
    assert main(["status", jid]) == 0
    out = capsys.readouterr().out
    assert "admitted" in out and "fits on n0" in out and "queued" in out
    assert main(["status", jid, "--json"]) == 0
    assert '"state": "admitted"' in capsys.readouterr().out


def test_cancel_then_cancel_again_is_a_clear_error(db, capsys):
    jid = submit(capsys)
    assert main(["cancel", jid]) == 0
    assert main(["cancel", jid]) == 1
    assert "already cancelled" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["status", "cancel", "logs"])
def test_unknown_job_ids_exit_1_naming_the_id(db, capsys, cmd):
    assert main([cmd, "no-such-job"]) == 1
    assert "no job with id 'no-such-job'" in capsys.readouterr().err


def test_logs_of_a_job_not_yet_on_ray_says_so(db, capsys):
    jid = submit(capsys)
    assert main(["logs", jid]) == 1
    assert "not been submitted to Ray yet" in capsys.readouterr().err


def test_a_store_that_cannot_be_opened_exits_1_naming_it(capsys):
    assert main(["queue", "--store", "nosuchdb://x"]) == 1
    assert "nosuchdb://x" in capsys.readouterr().err


def test_store_flag_overrides_the_environment(db, tmp_path, capsys):
    other = str(tmp_path / "other.db")
    assert main(["submit", EXAMPLE, "--store", other]) == 0
    capsys.readouterr()
    assert len(JobStore(other).list()) == 1 and JobStore(db).list() == []
