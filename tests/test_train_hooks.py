"""The train loop's test and demo hooks (``actors/trainer/hooks.py``) on their own, without Ray,
and the loss plot the driver draws from a run's summary."""

from __future__ import annotations

import json
import os
import pickle
import threading

import pytest

from actors.trainer import hooks as hooks_mod
from actors.trainer.hooks import MIN_STEP_TIME_ENV, TrainHooks
from conftest import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Exited(Exception):
    pass


@pytest.fixture
def no_exit(monkeypatch):
    """``os._exit`` as the hooks see it raises :class:`Exited` instead of ending the test process."""
    def fake_exit(code):
        raise Exited(code)
    monkeypatch.setattr(hooks_mod.os, "_exit", fake_exit)


@pytest.fixture
def sleeps(monkeypatch):
    """The seconds each ``time.sleep`` of the hooks asked for (none really slept)."""
    asked: list[float] = []
    monkeypatch.setattr(hooks_mod.time, "sleep", asked.append)
    return asked


def test_the_default_hooks_do_nothing(tmp_path, monkeypatch, no_exit, sleeps):
    h = TrainHooks()
    (tmp_path / "hold").write_text("0")      # a hold file no hook was told about

    def no_loader():
        raise AssertionError("the default hooks asked for the loader's pid")
    monkeypatch.chdir(tmp_path)
    h.on_start(0, no_loader)
    for step in range(1, 4):
        h.before_step(step, 2, 0)
        h.after_compute(0.0)                 # a step begun long ago, or now: no pacing either way
        h.after_step(step, 1, 2, resumed=False)
    assert sleeps == [] and sorted(os.listdir(tmp_path)) == ["hold"]


def test_hold_file_blocks_until_the_file_is_gone(tmp_path):
    hold, held = tmp_path / "hold", tmp_path / "hold.held"
    hold.write_text("3")
    h = TrainHooks(hold_file=str(hold))
    h.before_step(2, 2, 0)                   # before the held step: passes
    t = threading.Thread(target=h.before_step, args=(3, 2, 0), daemon=True)
    t.start()
    wait_until(lambda: held.exists() and held.read_text() == "3 2", 30, 0.02, "rank 0 announcing the hold")
    assert t.is_alive()
    hold.unlink()
    t.join(30)
    assert not t.is_alive()


def test_hold_file_releases_once_its_step_moves_past(tmp_path):
    hold, held = tmp_path / "hold", tmp_path / "hold.held"
    hold.write_text("3")
    h = TrainHooks(hold_file=str(hold))
    t = threading.Thread(target=h.before_step, args=(5, 1, 1), daemon=True)   # rank 1: no .held
    t.start()
    r0 = threading.Thread(target=h.before_step, args=(5, 1, 0), daemon=True)
    r0.start()
    wait_until(held.exists, 30, 0.02, "rank 0 announcing the hold")
    assert t.is_alive() and r0.is_alive() and held.read_text() == "5 1"
    hold.write_text("6")                     # hold later: step 5 may run
    t.join(30)
    r0.join(30)
    assert not t.is_alive() and not r0.is_alive()


def test_pacing_stretches_a_step_to_min_step_time(sleeps):
    h = TrainHooks(min_step_time_s=0.5)
    t0 = hooks_mod.time.monotonic()
    h.after_compute(t0)
    h.after_compute(t0 - 2.0)                # already slower than the pace: no wait
    assert len(sleeps) == 2 and 0.3 < sleeps[0] <= 0.5 and sleeps[1] == 0.0


def test_fail_at_step_exits_the_last_rank_once_on_a_fresh_attempt(no_exit):
    h = TrainHooks(fail_at_step=6)
    h.after_step(5, 1, 2, resumed=False)
    h.after_step(6, 0, 2, resumed=False)     # not the last rank
    h.after_step(6, 1, 2, resumed=True)      # the retry, resumed from a checkpoint
    with pytest.raises(Exited):
        h.after_step(6, 1, 2, resumed=False)


def test_pid_dir_gets_each_ranks_pid_and_its_loaders(tmp_path):
    d = tmp_path / "pids"
    TrainHooks(pid_dir=str(d)).on_start(1, lambda: 4242)
    assert (d / "rank-1.pid").read_text() == str(os.getpid()) and (d / "loader-1.pid").read_text() == "4242"


def test_options_build_hooks_that_pickle_and_unknown_keys_are_refused(monkeypatch):
    h = TrainHooks.from_options({"fail_at_step": 4, "hold_file": "/x", "pid_dir": "/p",
                                 "min_step_time_s": 1, "control_poll_s": 0.5})
    assert h == TrainHooks(min_step_time_s=1.0, fail_at_step=4, hold_file="/x", pid_dir="/p",
                           control_poll_s=0.5)
    assert pickle.loads(pickle.dumps(h)) == h
    assert TrainHooks.from_options(None) == TrainHooks.from_options({}) == TrainHooks()
    with pytest.raises(ValueError, match="unknown train option.*fail_at"):
        TrainHooks.from_options({"fail_at": 4})
    with pytest.raises(ValueError, match="fail_at_step takes an integer"):
        TrainHooks.from_options({"fail_at_step": "soon"})
    # the driver reads the pacing variable; an explicit value wins over it
    assert TrainHooks().with_environment({MIN_STEP_TIME_ENV: "0.3"}).min_step_time_s == 0.3
    assert TrainHooks(min_step_time_s=0.1).with_environment({MIN_STEP_TIME_ENV: "0.3"}).min_step_time_s == 0.1
    assert TrainHooks().with_environment({}) == TrainHooks()


def test_an_unknown_option_on_the_command_line_exits_2_before_ray(capsys):
    from jobs.train import main
    assert main([os.path.join(ROOT, "jobs", "examples", "mlp_train.yaml"), "--option", "fail_at=3"]) == 2
    assert "unknown train option(s) fail_at" in capsys.readouterr().err


def test_the_driver_draws_loss_png_beside_the_summary(tmp_path):
    from actors.trainer.trainer import finish_run
    from orchestrator.spec import parse_spec
    spec = parse_spec({
        "kind": "train", "name": "plot", "max_steps": 3,
        "resources": {"min_workers": 1, "max_workers": 2, "cpus_per_worker": 1},
        "model": {"factory": "jobs.examples.models:mlp", "kwargs": {"in_dim": 4, "hidden": 4, "num_classes": 2}},
        "dataset": {"url": str(tmp_path / "data")},
        "deepspeed": {"micro_batch_size": 2, "global_batch_size": 4},
        "checkpoint": {"url": str(tmp_path / "ckpt")}})
    history = [{"step": s, "loss": 1.0 / s, "world_size": 2 if s < 3 else 1} for s in (1, 2, 3)]
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "summary.json").write_text(json.dumps(
        {"name": "plot", "final_step": 3, "world_size": 1, "history": history, "checkpoint": None}))
    result = finish_run(spec)
    assert result.final_step == 3 and result.world_sizes == [2, 1]
    assert (tmp_path / "ckpt" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
