"""Worker processes for test_zero_reshard.py: real gloo process groups, real DeepSpeed engines."""

from __future__ import annotations

import json
import os

import torch
import torch.distributed as dist

G, MICRO, IN_DIM, CLASSES = 12, 2, 16, 3
STAGES = (0, 1, 2, 3)


def make_spec(stage: int, ckpt_url: str):
    from orchestrator.spec import parse_spec
    return parse_spec({
        "kind": "train", "name": f"z{stage}", "max_steps": 100,
        "resources": {"min_workers": 1, "max_workers": 3},
        "model": {"factory": "jobs.examples.models:mlp",
                  "kwargs": {"in_dim": IN_DIM, "hidden": 24, "num_classes": CLASSES}},
        "dataset": {"url": "/unused"},
        "deepspeed": {"zero_stage": stage, "micro_batch_size": MICRO, "global_batch_size": G},
        "optimizer": {"lr": 0.01},
        "checkpoint": {"url": ckpt_url}})


def global_batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(G, IN_DIM, generator=g), torch.randint(0, CLASSES, (G,), generator=g)


def build(spec, world):
    from actors.trainer.loop import build_optimizer, deepspeed_config, seed_everything, use_environment_ninja
    use_environment_ninja()
    import deepspeed
    seed_everything(spec.seed)
    model = spec.model.resolve()(**spec.model.kwargs)
    opt = build_optimizer(spec, [p for p in model.parameters()])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                           config=deepspeed_config(spec, world), dist_init_required=False)
    return engine


def train_step(engine, step, rank, world):
    x, y = global_batch(step)
    per = G // world
    xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
    tot = torch.zeros(1, dtype=torch.float64)
    for i in range(0, per, MICRO):
        loss = torch.nn.functional.cross_entropy(engine(xs[i:i + MICRO]), ys[i:i + MICRO])
        engine.backward(loss)
        engine.step()
        tot += loss.detach().double()
    dist.all_reduce(tot)
    return float(tot) / (G // MICRO)


def full_state(engine, keys):
    from actors.trainer import zero_state
    return {n: {k: v for k, v in t.items()} for n, t in zero_state.iter_full_state(engine, keys)}


def save(engine, spec, step, rank, world):
    from actors.trainer import zero_state
    from actors.trainer.checkpoint import CheckpointStore, SaveRequest, assign_params
    from actors.trainer.loop import rng_state
    keys = zero_state.optimizer_state_keys("adamw")
    sizes = {n: getattr(p, "ds_numel", p.numel()) for n, p in engine.module.named_parameters()}
    owner = assign_params(sizes, world)
    mine, fragments = zero_state.local_fragments(engine, keys, owns=lambda n: owner[n] == rank)
    store = CheckpointStore(spec.checkpoint.url)
    state = {"step": step, "world_size": world, "optimizer_step": zero_state.optimizer_step_count(engine),
             "data": {}, "spec": spec.model_dump(mode="json")} if rank == 0 else None
    store.write_shard(SaveRequest(step, rank, world, mine, rng_state(), state, fragments=fragments))
    if rank == 0:
        store.commit(step, world)
    dist.barrier()


def load(engine, url, step):
    from actors.trainer import zero_state
    from actors.trainer.checkpoint import CheckpointStore
    store = CheckpointStore(url)
    state = store.load_state(step)
    zero_state.load_local_state(engine, store.load_slices(step, zero_state.local_ranges(engine)),
                                zero_state.optimizer_state_keys("adamw"), state["optimizer_step"])


def optimizer_partition_bytes(engine) -> int:
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    total = 0
    for st in base.state.values():
        total += sum(v.numel() * v.element_size() for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    # ZeRO keeps its own fp32 master partition; stage 0 fp32 uses the module weights as master
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        for t in getattr(engine.optimizer, attr, []) or []:
            total += t.numel() * t.element_size()
    return total


def run(rank: int, world: int, phase: str, tmp: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    from actors.trainer import zero_state
    from orchestrator.memory import plan
    keys = zero_state.optimizer_state_keys("adamw")
    out = {}
    for stage in STAGES:
        spec = make_spec(stage, f"{tmp}/ckpt{stage}")
        engine = build(spec, world)
        rec: dict = {}
        if phase == "save":
            for s in range(3):
                train_step(engine, s, rank, world)
            save(engine, spec, 3, rank, world)
            engine.save_checkpoint(f"{tmp}/native{stage}", tag="step3")
            n = sum(p.numel() for p in engine.module.parameters())
            rec["opt_bytes"] = optimizer_partition_bytes(engine)
            rec["planned_opt_bytes"] = plan(n, stage, world, "fp32").optimizer_bytes
            if stage >= 1:
                rec["planned_opt_bytes"] = plan(n, stage, world, "fp32").optimizer_bytes
            else:  # stage 0: plain torch AdamW (moments only; weights are the master copy)
                rec["planned_opt_bytes"] = 8 * n
            rec["state"] = {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in full_state(engine, keys).items()}
        else:
            # phase "load:<from stage>" loads that stage's checkpoint into this stage's engine
            src = int(phase.split(":")[1]) if ":" in phase else stage
            load(engine, f"{tmp}/ckpt{src}", 3)
            rec["state"] = {k: {kk: vv.tolist() for kk, vv in v.items()} for k, v in full_state(engine, keys).items()}
        rec["losses"] = [train_step(engine, s, rank, world) for s in (3, 4, 5)]
        out[stage] = rec
        del engine
    if rank == 0:
        with open(f"{tmp}/{phase.replace(':', '_')}-w{world}.json", "w") as f:
            json.dump(out, f)
    dist.barrier()
    dist.destroy_process_group()
