"""The checkpoint format: committed or absent; corrupt or partial saves fall back to the previous one."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from actors.trainer.checkpoint import (AsyncSaver, CheckpointError, CheckpointStore, SaveRequest,
                                       assign_params, step_dir)


def _save(store: CheckpointStore, step: int, world: int = 2, loss: float = 1.0, commit: bool = True):
    names = {f"w{i}": 10 * (i + 1) for i in range(5)}
    owner = assign_params(names, world)
    for r in range(world):
        mine = {n: {"fp32": torch.full((names[n],), float(step)), "exp_avg": torch.zeros(names[n])}
                for n in names if owner[n] == r}
        state = {"step": step, "world_size": world, "optimizer_step": step, "data": {"epoch": 0}} if r == 0 else None
        store.write_shard(SaveRequest(step, r, world, mine, {"seed": r}, state))
    if commit:
        return store.commit(step, world, {"loss": loss}, timeout_s=5)


@pytest.fixture(params=["local", "s3"])
def url(request, tmp_path):
    return str(tmp_path / "ck") if request.param == "local" else request.getfixturevalue("s3") + "/ck"


def test_commit_then_load_merges_every_rank_shard(url):
    store = CheckpointStore(url)
    _save(store, 10)
    assert store.latest_valid() == 10
    tensors = store.load_tensors(10)
    assert sorted(tensors) == [f"w{i}" for i in range(5)]
    assert all(torch.equal(t["fp32"], torch.full_like(t["fp32"], 10.0)) for t in tensors.values())
    assert store.load_state(10)["data"] == {"epoch": 0}


def test_shards_without_manifest_are_invisible(url):
    store = CheckpointStore(url)
    _save(store, 10)
    _save(store, 20, commit=False)       # crashed before the manifest
    assert store.steps() == [10]
    assert store.latest_valid() == 10


def test_commit_waits_for_missing_rank_and_fails_naming_it(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.write_shard(SaveRequest(5, 0, 2, {}, {}, {"step": 5}))
    with pytest.raises(CheckpointError, match=r"params-r00001.json"):
        store.commit(5, 2, timeout_s=0.3)
    assert store.latest_valid() is None


def test_corrupt_shard_falls_back_to_previous_checkpoint_with_warning(url, caplog):
    store = CheckpointStore(url)
    _save(store, 10)
    _save(store, 20)
    path = f"{step_dir(20)}/params-r00001.pt"
    data = bytearray(store.storage.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    store.storage.write_bytes(path, bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.latest_valid() == 10
    assert "params-r00001.pt is corrupt" in caplog.text and "step-00000020" in caplog.text


def test_missing_shard_is_named(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 10)
    store.storage.delete(f"{step_dir(10)}/rng-r00000.pt")
    with pytest.raises(CheckpointError, match="shard rng-r00000.pt is missing"):
        store.verify(10)
    assert store.latest_valid() is None


def test_truncated_manifest_is_skipped(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 10)
    _save(store, 20)
    store.storage.write_text(f"{step_dir(20)}/MANIFEST.json", '{"files": ')
    assert store.latest_valid() == 10


def test_retention_keeps_last_k_and_best_by_metric(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2, keep_best=1, best_metric="loss", best_mode="min")
    losses = {10: 0.9, 20: 0.1, 30: 0.5, 40: 0.7, 50: 0.6}
    for step, loss in losses.items():
        _save(store, step, loss=loss)
    assert store.steps() == [20, 40, 50]
    assert store.best() == 20


def test_retention_never_deletes_a_save_in_flight(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=1)
    _save(store, 10)
    _save(store, 30, commit=False)   # another rank is still writing step 30
    _save(store, 20)                 # an older step commits meanwhile
    assert store.storage.exists(f"{step_dir(30)}/params-r00000.pt")


def test_rank_assignment_is_balanced_and_deterministic():
    sizes = {"a": 100, "b": 90, "c": 10, "d": 5, "e": 1}
    owner = assign_params(sizes, 2)
    assert owner == assign_params(dict(reversed(list(sizes.items()))), 2)
    loads = [sum(s for n, s in sizes.items() if owner[n] == r) for r in range(2)]
    assert max(loads) - min(loads) <= 10


def test_async_saver_surfaces_errors_on_wait():
    saver = AsyncSaver()
    saver.submit(lambda: (1, "u1"))
    saver.wait()
    assert saver.last_committed == (1, "u1")

    def boom():
        raise OSError("disk full")

    saver.submit(boom)
    with pytest.raises(OSError, match="disk full"):
        saver.wait()


def test_manifest_lists_sizes_and_checksums(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 10)
    man = json.loads(store.storage.read_text(f"{step_dir(10)}/MANIFEST.json"))
    assert man["world_size"] == 2 and man["step"] == 10
    for name, rec in man["files"].items():
        assert store.storage.size(f"{step_dir(10)}/{name}") == rec["bytes"]
        assert len(rec["sha256"]) == 64
