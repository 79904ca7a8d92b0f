"""The checkpoint format: committed or absent; corrupt or partial saves fall back to the previous one."""

from __future__ import annotations

import json
import logging
import os
import time

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
    path = f"{step_dir(20)}/params-r00001.safetensors"
    data = bytearray(store.storage.read_bytes(path))
    data[len(data) // 2] ^= 0xFF
    store.storage.write_bytes(path, bytes(data))
    with caplog.at_level(logging.WARNING):
        assert store.latest_valid() == 10
    assert "params-r00001.safetensors is corrupt" in caplog.text and "step-00000020" in caplog.text


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
    assert store.storage.exists(f"{step_dir(30)}/params-r00000.safetensors")


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
        assert len(rec["xxh3_128"]) == 32
    assert man["format"] == 3


def test_shards_are_safetensors_files_any_reader_opens(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    store = CheckpointStore(str(tmp_path))
    _save(store, 10)
    flat = safetensors_torch.load_file(str(tmp_path / step_dir(10) / "params-r00000.safetensors"))
    ours = store.load_tensors(10)
    assert flat and all(torch.equal(t, ours[k.rsplit("/", 1)[0]][k.rsplit("/", 1)[1]]) for k, t in flat.items())


def test_tensor_file_round_trips_every_dtype_and_shape():
    import io

    from actors.trainer import tensorfile
    tensors = {"a.weight": {"fp32": torch.randn(3, 4), "exp_avg": torch.zeros(0)},
               "b": {"bf16": torch.randn(5).bfloat16(), "scalar": torch.tensor(7, dtype=torch.int64),
                     "mask": torch.tensor([True, False]), "half": torch.randn(2, 2).half()},
               "c": {"t": torch.arange(12, dtype=torch.float64).reshape(3, 4).t()}}   # non-contiguous
    buf = io.BytesIO()
    n, digest = tensorfile.write_tensors(buf, tensors)
    data = buf.getvalue()
    assert n == len(data) and digest == tensorfile.checksum(data)
    back = tensorfile.read_tensors(data)
    for name, kinds in tensors.items():
        for kind, t in kinds.items():
            assert back[name][kind].dtype == t.dtype and torch.equal(back[name][kind], t), (name, kind)
    with pytest.raises(ValueError, match="not a tensor shard"):
        tensorfile.read_tensors(b"\x05")


def test_background_durability_commits_then_syncs_then_retains(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), keep_last=1, background_durability=True)
    order = []
    real_sync = store.storage.sync
    monkeypatch.setattr(store.storage, "sync", lambda rel="": (order.append(("sync", rel)), real_sync(rel)))
    real_retention = store.apply_retention
    monkeypatch.setattr(store, "apply_retention", lambda: (order.append(("retain", store.steps())),
                                                          real_retention())[1])
    _save(store, 10)
    _save(store, 20)   # waits for step 10's fsync + retention before publishing its own manifest
    store.wait_durable()
    assert store.steps() == [20]
    assert order == [("sync", step_dir(10)), ("retain", [10]), ("sync", step_dir(20)), ("retain", [10, 20])]


def test_background_durability_failure_surfaces_on_the_next_commit(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), background_durability=True)

    def broken(rel=""):
        raise OSError("fsync failed: EIO")

    monkeypatch.setattr(store.storage, "sync", broken)
    _save(store, 10)
    with pytest.raises(OSError, match="EIO"):
        _save(store, 20)


def test_failed_streamed_write_leaves_nothing_visible(url):
    from orchestrator.storage import Storage
    st = Storage(url)
    with pytest.raises(RuntimeError, match="mid-write"):
        with st.open_atomic("d/file.bin") as f:
            f.write(b"x" * (6 << 20))   # past s3fs's 5 MiB block: a multipart upload has begun
            raise RuntimeError("killed mid-write")
    assert not st.exists("d/file.bin") and st.list("d") == []
    with st.open_atomic("d/file.bin") as f:
        f.write(b"whole")
    assert st.read_bytes("d/file.bin") == b"whole"


@pytest.mark.parametrize("first, then", [(2, 1), (3, 2)])
def test_a_step_saved_again_by_another_attempt_on_another_world_size_commits_a_checkpoint_that_verifies(
        url, first, then):
    """An attempt that crashed mid-save (every rank's shard written, no manifest) leaves records
    behind. The next attempt, on another world size, saving the same step commits only its own
    records: it waits for its ranks (the slow one here writes after the commit started), never
    takes the stale records' checksums, and removes what the crashed attempt left."""
    import threading
    store = CheckpointStore(url)
    names = {f"w{i}": 10 * (i + 1) for i in range(5)}

    def write(world, rank, attempt, value):
        owner = assign_params(names, world)
        mine = {n: {"fp32": torch.full((names[n],), value)} for n in names if owner[n] == rank}
        state = {"step": 8, "world_size": world, "data": {}} if rank == 0 else None
        store.write_shard(SaveRequest(8, rank, world, mine, {"seed": rank}, state, attempt=attempt))

    for r in range(first):
        write(first, r, "crashed", 1.0)
    for r in range(1, then):  # the new attempt's other ranks are slower than rank 0
        threading.Timer(0.5, write, (then, r, "fresh", 2.0)).start()
    write(then, 0, "fresh", 2.0)
    store.commit(8, then, timeout_s=10, attempt="fresh")
    man = store.verify(8)                                   # checksums match the files on disk
    assert man["world_size"] == then
    assert all(torch.equal(t["fp32"], torch.full_like(t["fp32"], 2.0)) for t in store.load_tensors(8).values())
    left = set(store.storage.list(step_dir(8)))
    assert f"params-r{first - 1:05d}.safetensors" not in left   # the crashed attempt's extra rank is gone


def _nice() -> int:
    import threading
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _policy() -> tuple[int, int]:
    return os.sched_getscheduler(0), _nice()


def test_background_work_runs_below_the_trainers_priority_and_the_caller_keeps_its_own():
    """The async checkpoint writer runs only on CPU time nothing else wants (SCHED_IDLE), but a
    save the trainer waits for at once runs at the trainer's own priority; the training thread's
    priority is unchanged."""
    from actors.trainer.checkpoint import AsyncSaver
    before = _policy()
    saver, seen = AsyncSaver(), []
    saver.submit(lambda: seen.append(_policy()))
    saver.wait()
    saver.submit(lambda: seen.append(_policy()), background=False)
    saver.wait()
    assert seen == [(os.SCHED_IDLE, before[1]), before] and _policy() == before


def test_a_preload_stage_runs_at_idle_priority_only_while_a_group_trains_here():
    """A spare warming beside running trainers takes only idle CPU time; a process a restart waits
    for (nothing trains) preloads at its own priority; each stage to its end before the next;
    an error reaches the caller and stops the stages after it."""
    from actors import warm
    before = _policy()
    busy = iter([True, False, True])
    seen = []
    ran_idle = warm.preload_in_stages([lambda: seen.append(_policy())] * 3, busy=lambda: next(busy))
    assert ran_idle == [True, False, True]
    assert seen == [(os.SCHED_IDLE, before[1]), before, (os.SCHED_IDLE, before[1])]
    assert _policy() == before

    def boom():
        raise RuntimeError("preload failed")
    after = []
    with pytest.raises(RuntimeError, match="preload failed"):
        warm.preload_in_stages([boom, lambda: after.append(1)], busy=lambda: True)
    assert after == []


def test_trainers_stepping_mark_the_machine_busy_for_three_of_their_steps(monkeypatch, tmp_path):
    """The mark holds for a few seconds, or three steps of a group with long steps (a spare must
    not take the cores between two of them); a group that stopped stepping releases it."""
    from actors import warm
    monkeypatch.setattr(warm, "TRAINING_MARK", str(tmp_path / "mark"))
    monkeypatch.setattr(warm, "_marked_at", 0.0)
    assert not warm.training_here()
    warm.mark_training(step_s=0.1)
    assert warm.training_here()
    assert os.stat(warm.TRAINING_MARK).st_mtime <= time.time() + warm.TRAINING_HOLD_S
    monkeypatch.setattr(warm, "_marked_at", 0.0)
    warm.mark_training(step_s=20.0)
    assert os.stat(warm.TRAINING_MARK).st_mtime >= time.time() + 59
    old = time.time() - 1
    os.utime(warm.TRAINING_MARK, (old, old))  # its last step was long ago
    assert not warm.training_here()


def test_waiting_for_an_idle_priority_writer_lifts_it_to_normal_priority():
    """On fully busy cores an idle-priority writer may never run: whoever waits for it (the next
    save, the end of training) gives it normal priority, so the wait is bounded."""
    from actors.trainer.checkpoint import AsyncSaver
    saver, seen = AsyncSaver(), []

    def writer():
        deadline = time.monotonic() + 30
        while os.sched_getscheduler(0) == os.SCHED_IDLE and time.monotonic() < deadline:
            time.sleep(0.01)
        seen.append(os.sched_getscheduler(0))
    saver.submit(writer)
    saver.wait()
    assert seen == [os.SCHED_OTHER]


def _save_fragments(store, step: int, cuts: dict[str, list[int]], full: dict[str, torch.Tensor]) -> None:
    """Each rank r writes elements [cuts[name][r], cuts[name][r + 1]) of every parameter (an empty
    slice is not written), the way ZeRO partitions hand them out."""
    world = len(next(iter(cuts.values()))) - 1
    for r in range(world):
        tensors, frags = {}, {}
        for name, c in cuts.items():
            if c[r + 1] > c[r]:
                flat = full[name].reshape(-1)
                tensors[name] = {"fp32": flat[c[r]:c[r + 1]].clone(), "exp_avg": -flat[c[r]:c[r + 1]]}
                frags[name] = [c[r], list(full[name].shape)]
        state = {"step": step, "world_size": world, "optimizer_step": step, "data": {}} if r == 0 else None
        store.write_shard(SaveRequest(step, r, world, tensors, {"seed": r}, state, fragments=frags))
    store.commit(step, world, timeout_s=5)


@pytest.mark.parametrize("cuts", [
    {"a": [0, 7, 20], "b": [0, 0, 6]},          # two ranks; one holds nothing of "b"
    {"a": [0, 7, 13, 20], "b": [0, 6, 6, 6]},   # three ranks; uneven, one parameter whole on rank 0
])
def test_slices_saved_by_every_rank_assemble_into_full_tensors(tmp_path, cuts):
    full = {"a": torch.arange(20.0).reshape(4, 5), "b": torch.arange(100.0, 106.0).reshape(2, 3)}
    store = CheckpointStore(str(tmp_path))
    _save_fragments(store, 4, cuts, full)
    assert store.latest_valid() == 4
    got = store.load_tensors(4)
    for name, t in full.items():
        assert torch.equal(got[name]["fp32"], t) and torch.equal(got[name]["exp_avg"], -t)


@pytest.mark.parametrize("slices, problem", [
    ([(0, 7), (7, 13), (13, 20)], None),
    ([(0, 7), (9, 13), (13, 20)], "a gap at element 7"),
    ([(0, 9), (7, 13), (13, 20)], "overlap at element 9"),
    ([(0, 7), (7, 13), (13, 19)], "hold 19 of its 20 elements"),
])
def test_slices_that_do_not_cover_a_parameter_exactly_once_are_refused_by_name(tmp_path, slices, problem):
    full = torch.arange(20.0).reshape(4, 5)
    store = CheckpointStore(str(tmp_path))
    for r, (lo, hi) in enumerate(slices):
        state = {"step": 4, "world_size": 3, "optimizer_step": 4, "data": {}} if r == 0 else None
        store.write_shard(SaveRequest(4, r, 3, {"a": {"fp32": full.reshape(-1)[lo:hi].clone()}}, {}, state,
                                      fragments={"a": [lo, [4, 5]]}))
    store.commit(4, 3, timeout_s=5)
    if problem is None:
        assert torch.equal(store.load_tensors(4)["a"]["fp32"], full)
    else:
        with pytest.raises(CheckpointError, match=rf"step-00000004: a: .*{problem}"):
            store.load_tensors(4)
        with pytest.raises(CheckpointError, match=r"step-00000004: a: the shards"):  # a restoring rank
            store.load_slices(4, {"a": (0, 20, (4, 5))})


@pytest.mark.parametrize("want", [(0, 20), (5, 10), (7, 6), (13, 7), (19, 1), (0, 0)])
def test_a_rank_reads_back_exactly_its_range_across_the_shards_that_hold_it(url, want):
    """A restoring rank asks for its partition's range of each parameter, whatever world size saved
    it: the elements come from every shard that holds part of the range, and only those."""
    full = {"a": torch.arange(20.0).reshape(4, 5), "b": torch.arange(100.0, 106.0).reshape(2, 3)}
    store = CheckpointStore(url)
    _save_fragments(store, 4, {"a": [0, 7, 13, 20], "b": [0, 6, 6, 6]}, full)
    start, n = want
    got = store.load_slices(4, {"a": (start, n, (4, 5)), "b": (0, 6, (2, 3))})
    if n:
        assert torch.equal(got["a"]["fp32"], full["a"].reshape(-1)[start:start + n])
        assert torch.equal(got["a"]["exp_avg"], -full["a"].reshape(-1)[start:start + n])
    assert torch.equal(got["b"]["fp32"], full["b"].reshape(-1))


def test_reading_slices_names_a_missing_parameter_a_wrong_shape_and_a_whole_tensor_shard(tmp_path):
    store = CheckpointStore(str(tmp_path))
    _save(store, 10)   # whole tensors per shard (format 2 layout): w0..w4, 10..50 elements
    got = store.load_slices(10, {"w1": (5, 10, (20,)), "w4": (0, 50, (50,))})
    assert torch.equal(got["w1"]["fp32"], torch.full((10,), 10.0)) and got["w4"]["fp32"].shape == (50,)
    with pytest.raises(KeyError, match="lacks parameters \\['nope'\\]"):
        store.load_slices(10, {"nope": (0, 1, (1,))})
    with pytest.raises(ValueError, match="parameter w0: checkpoint shape \\(10,\\) != model \\(2, 5\\)"):
        store.load_slices(10, {"w0": (0, 10, (2, 5))})
