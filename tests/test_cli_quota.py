"""`orchestrator quota set | list | delete` against a real SQLite store, and the scheduler's
deprecated `--quota` flags, which seed that store."""

from __future__ import annotations

import json

from orchestrator.cli import main
from orchestrator.policy import Quota
from orchestrator.spec import parse_spec
from orchestrator.store import JobStore

TRAIN = {
    "kind": "train", "name": "mlp", "scheduling": {"team": "vision"},
    "resources": {"min_workers": 2, "max_workers": 2, "cpus_per_worker": 3, "gpus_per_worker": 1},
    "model": {"factory": "jobs.examples.models:mlp"}, "dataset": {"url": "memory://data"},
    "deepspeed": {"micro_batch_size": 1, "global_batch_size": 2},
    "checkpoint": {"url": "memory://ckpt"}, "max_steps": 10,
}


def test_quota_set_list_and_delete(tmp_path, capsys):
    db = str(tmp_path / "jobs.db")
    assert main(["quota", "list", "--store", db]) == 0
    assert "(no quotas" in capsys.readouterr().out
    assert main(["quota", "set", "vision", "--cpus", "8:32", "--gpus", "2", "--cohort", "ml", "--store", db]) == 0
    assert capsys.readouterr().out.strip() == \
        "vision: CPU 8 guaranteed, max 32; GPU 2 guaranteed, max 2; cohort ml"
    assert main(["quota", "set", "nlp", "--cpus", "0:16", "--store", db]) == 0   # a plain cap
    assert main(["quota", "set", "vision", "--gpus", "1:inf", "--store", db]) == 0  # only GPUs change
    assert capsys.readouterr().out.splitlines()[-1] == \
        "vision: CPU 8 guaranteed, max 32; GPU 1 guaranteed, no max; cohort ml"
    st = JobStore(db)
    jid = st.submit(parse_spec(TRAIN))
    st.transition(jid, "admitted", "test", workers=2, placement={"n0": 2})
    assert main(["quota", "list", "--store", db]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["TEAM", "COHORT", "CPU", "G/MAX", "GPU", "G/MAX", "IN", "USE", "CPU/GPU"]
    assert [ln.split() for ln in out[1:]] == [["nlp", "-", "0/16", "0/-", "0/0"],
                                              ["vision", "ml", "8/32", "1/-", "6/2"]]
    assert main(["quota", "list", "--json", "--store", db]) == 0
    rows = {r["team"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["vision"]["max_gpus"] is None and rows["vision"]["used_cpus"] == 6.0
    assert rows["nlp"]["cohort"] is None and rows["nlp"]["max_cpus"] == 16.0
    assert main(["quota", "set", "vision", "--no-cohort", "--store", db]) == 0
    assert main(["quota", "delete", "nlp", "--store", db]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "nlp: quota deleted"
    assert JobStore(db).quotas() == {"vision": Quota(cpus=32, guaranteed_cpus=8, guaranteed_gpus=1)}


def test_quota_errors_name_what_is_wrong_and_change_nothing(tmp_path, capsys):
    db = str(tmp_path / "jobs.db")
    assert main(["quota", "set", "vision", "--cpus", "4:8", "--store", db]) == 0
    capsys.readouterr()
    assert main(["quota", "set", "vision", "--cpus", "8:4", "--store", db]) == 2
    assert "max_cpus (4) must be >= guaranteed_cpus (8)" in capsys.readouterr().err
    assert main(["quota", "set", "vision", "--gpus", "-1", "--store", db]) == 2
    assert "--gpus: '-1' is not G[:MAX]" in capsys.readouterr().err
    assert main(["quota", "set", "vision", "--store", db]) == 2
    assert "give at least one of --cpus" in capsys.readouterr().err
    assert main(["quota", "delete", "nobody", "--store", db]) == 1
    assert "team 'nobody' has no quota" in capsys.readouterr().err
    assert JobStore(db).quotas() == {"vision": Quota(cpus=8, guaranteed_cpus=4)}


def test_scheduler_quota_flags_seed_the_store_only_for_teams_it_has_no_quota_for(tmp_path, capsys):
    from conftest import free_port
    db = str(tmp_path / "jobs.db")
    assert main(["quota", "set", "vision", "--cpus", "2:4", "--store", db]) == 0
    capsys.readouterr()
    addr = f"127.0.0.1:{free_port()}"  # no Ray there: the command stops after reading its flags
    assert main(["scheduler", "--once", "--store", db, "--address", addr,
                 "--quota", "vision=100", "--quota", "nlp=8:1"]) == 1
    err = capsys.readouterr().err
    assert "--quota vision=... ignored: the store has a quota for it" in err
    assert "--quota is deprecated; stored quota of 'nlp' (max 8 CPU, 1 GPU)" in err
    assert JobStore(db).quotas() == {"vision": Quota(cpus=4, guaranteed_cpus=2), "nlp": Quota(cpus=8, gpus=1)}
