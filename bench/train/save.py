"""Checkpoint save throughput: ``CheckpointStore`` against fsspec writing the same bytes.

Run by ``python -m bench.train`` in its own process (``python -m bench.train.save --config C.json``)
so the one-rank process group it opens stays out of the driver. It builds the benchmark model under a
DeepSpeed engine of the same ZeRO stage (one rank), takes one optimizer step so the Adam moments
exist, copies its share of the ZeRO state the way a train worker does (``zero_state.local_fragments``),
then times, interleaved over ``reps`` rounds:

* ``ours``          ``CheckpointStore.write_shard`` + ``commit`` as the trainer runs them (safetensors
                    shards streamed from the tensors' memory with an xxh3-128 checksum on the same
                    pass, atomic renames, done records, manifest): the time until the checkpoint is
                    committed and loadable; its fsync + retention then run in the background;
* ``ours+durable``  the same until that fsync has finished too (``wait_synced``; retention, which
                    deletes older checkpoints only then, follows in the background and is
                    timed on its own: ``retention_s``);
* ``fsspec``        ``fsspec.open(url, "wb").write(...)`` of exactly the bytes ``ours`` left on
                    storage (the same files, already serialized): the issue's baseline;
* ``fsspec+fsync``  the same, plus flush + ``os.fsync`` per file (local URLs only): the durability
                    ``ours`` pays for;
* ``torch.save``    ``torch.save(state, fsspec.open(url, "wb"))``: what a user would write by hand.

Writes a JSON report to the config's ``out``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    cfg = json.load(open(ap.parse_args().config))
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})

    import fsspec
    import torch
    torch.set_num_threads(cfg["threads"])
    import deepspeed

    from actors.trainer import zero_state
    from actors.trainer.checkpoint import CheckpointStore, SaveRequest, step_dir
    from actors.trainer.loop import build_optimizer, deepspeed_config, rng_state, seed_everything
    from orchestrator.spec import parse_spec

    t_setup = time.perf_counter()
    deepspeed.init_distributed(dist_backend="gloo")
    spec = parse_spec(cfg["spec"])
    seed_everything(spec.seed)
    model = spec.model.resolve()(**spec.model.kwargs)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(spec, model.parameters()),
                                           config=deepspeed_config(spec, 1), dist_init_required=False)
    in_dim = spec.model.kwargs["in_dim"]
    x = torch.randn(spec.deepspeed.micro_batch_size, in_dim)
    y = torch.zeros(spec.deepspeed.micro_batch_size, dtype=torch.long)
    for _ in range(engine.gradient_accumulation_steps()):  # one optimizer step: moments exist
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
    print(f"[save] engine ready in {time.perf_counter() - t_setup:.1f} s", flush=True)
    keys = zero_state.optimizer_state_keys(spec.optimizer.name)
    t = time.perf_counter()
    tensors, fragments = zero_state.local_fragments(engine, keys, owns=lambda n: True)
    copy_s = time.perf_counter() - t
    state = {"step": 1, "world_size": 1, "optimizer_step": zero_state.optimizer_step_count(engine),
             "metrics": {"loss": 1.0}, "history": [], "spec": spec.model_dump(mode="json"),
             "saved_at": time.time()}

    root = cfg["url"].rstrip("/")
    opts = spec.storage.as_options()
    store = CheckpointStore(f"{root}/ours", opts, keep_last=2, background_durability=True)
    fs, _ = fsspec.core.url_to_fs(root, **opts)
    local = fs.protocol in ("file", "local") or "file" in fs.protocol
    times: dict[str, list[float]] = {"ours": [], "ours+durable": [], "fsspec": [], "fsspec+fsync": [],
                                     "torch.save": []}
    if not local:
        del times["fsspec+fsync"]
    files: dict[str, bytes] = {}
    retention_s: list[float] = []

    def write_plain(sub: str, rep: int, sync: bool) -> None:
        for name, data in files.items():
            with fsspec.open(f"{root}/{sub}/{rep:04d}/{name}", "wb", auto_mkdir=True, **opts) as f:
                f.write(data)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())

    for rep in range(cfg["reps"]):
        step = rep + 1
        t = time.perf_counter()
        store.write_shard(SaveRequest(step=step, rank=0, world_size=1, tensors=tensors, rng=rng_state(),
                                      state=dict(state, step=step), metrics={"loss": 1.0},
                                      fragments=fragments))
        store.commit(step, 1, {"loss": 1.0})
        times["ours"].append(time.perf_counter() - t)
        store.wait_synced()
        times["ours+durable"].append(time.perf_counter() - t)
        t = time.perf_counter()
        store.wait_durable()  # nothing of ours runs while the baselines are timed
        retention_s.append(time.perf_counter() - t)
        if not files:  # the bytes ours left on storage, read back once
            d = step_dir(step)
            files = {n: store.storage.read_bytes(f"{d}/{n}") for n in store.storage.list(d)}
            print("[save] files: " + ", ".join(f"{n} {len(b)} B" for n, b in files.items()), flush=True)
        t = time.perf_counter()
        write_plain("fsspec", rep, sync=False)
        times["fsspec"].append(time.perf_counter() - t)
        if local:
            t = time.perf_counter()
            write_plain("fsspec-fsync", rep, sync=True)
            times["fsspec+fsync"].append(time.perf_counter() - t)
        t = time.perf_counter()
        with fsspec.open(f"{root}/torch-save/{rep:04d}.pt", "wb", auto_mkdir=True, **opts) as f:
            torch.save(tensors, f)
        times["torch.save"].append(time.perf_counter() - t)
        torch_save_bytes = fs.size(f"{root}/torch-save/{rep:04d}.pt")
        for sub in ("fsspec", "fsspec-fsync", "torch-save"):  # keep the disk footprint flat
            if fs.exists(f"{root}/{sub}"):
                fs.rm(f"{root}/{sub}", recursive=True)
        print(f"[save] round {rep + 1}/{cfg['reps']}: "
              + ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()), flush=True)

    nbytes = sum(len(b) for b in files.values())
    # the checksum's share of ours, and what sha256 (format 1) would cost on the same bytes
    import hashlib

    from actors.trainer import tensorfile
    blob = max(files.values(), key=len)
    t = time.perf_counter()
    tensorfile.checksum(blob)
    checksum_s = time.perf_counter() - t
    t = time.perf_counter()
    hashlib.sha256(blob).hexdigest()
    sha256_s = time.perf_counter() - t
    sizes = {k: nbytes for k in times} | {"torch.save": torch_save_bytes}
    report = {"bytes": nbytes, "files": {n: len(b) for n, b in files.items()}, "copy_s": copy_s,
              "params": sum(p.numel() for p in model.parameters()), "url": root, "reps": cfg["reps"],
              "times_s": times,
              "median_s": {k: statistics.median(v) for k, v in times.items()},
              "bytes_per_s": {k: sizes[k] / statistics.median(v) for k, v in times.items()},
              "torch_save_bytes": torch_save_bytes,
              "checksum_s": checksum_s, "sha256_s": sha256_s, "checksum_bytes": len(blob),
              "retention_s": statistics.median(retention_s)}
    with open(cfg["out"], "w") as f:
        json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
