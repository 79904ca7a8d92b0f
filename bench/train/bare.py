"""The baseline trainer: plain DeepSpeed under its own launcher, with a plain torch DataLoader.

Run by ``python -m bench.train`` as ``deepspeed --num_gpus N bench/train/bare.py --config C.json``
(or under ``torchrun`` when ``--launcher torchrun``). It trains the same model factory on the same
samples (the synthetic dataset is regenerated from the same seed, so the arrays are the ones our
shards hold) with the same DeepSpeed config, optimizer and torch thread count as our workers, and
nothing else: a ``DistributedSampler`` + ``DataLoader`` over a ``TensorDataset``, no checkpoints,
no Ray. Rank 0 writes the wall time at the end of every global step to the config's ``out``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    cfg = json.load(open(ap.parse_args().config))

    import torch
    torch.set_num_threads(cfg["threads"])
    import deepspeed
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    deepspeed.init_distributed(dist_backend="gloo")
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(cfg["seed"])  # identical initial weights on every rank, as in our workers
    mod, fn = cfg["model"]["factory"].split(":")
    model = getattr(importlib.import_module(mod), fn)(**cfg["model"]["kwargs"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg["deepspeed"])

    from jobs.examples import datasets
    d = getattr(datasets, cfg["dataset"]["fn"])(**cfg["dataset"]["kwargs"])
    ds = TensorDataset(torch.from_numpy(d["x"]), torch.from_numpy(d["y"]))
    sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=cfg["seed"],
                                 drop_last=True)
    micro = cfg["deepspeed"]["train_micro_batch_size_per_gpu"]
    accum = cfg["deepspeed"]["gradient_accumulation_steps"]
    loader = DataLoader(ds, batch_size=micro, sampler=sampler, drop_last=True)

    times, losses = [], []
    step, micro_i, epoch = 0, 0, 0
    t0 = time.time()
    while step < cfg["steps"]:
        sampler.set_epoch(epoch)
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(engine(x).float(), y)
            engine.backward(loss)
            engine.step()
            micro_i += 1
            if micro_i % accum == 0:
                step += 1
                times.append(time.time())
                losses.append(float(loss))
                if rank == 0 and step % 10 == 0:
                    print(f"[bare] step {step}/{cfg['steps']} loss {losses[-1]:.4f}", flush=True)
                if step >= cfg["steps"]:
                    break
        epoch += 1
    if rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump({"start": t0, "t": times, "loss": losses, "world_size": world,
                       "pid": os.getpid()}, f)
    dist.barrier()


if __name__ == "__main__":
    main()
