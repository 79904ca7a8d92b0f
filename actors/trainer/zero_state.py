"""World-size-independent ZeRO state: gather full fp32 weights and optimizer moments per parameter,
and set them into an engine of any world size and any ZeRO stage.

DeepSpeed's own checkpoints are partitioned by rank; reloading them on a different world size needs
its offline Universal Checkpoint conversion (and growing a ZeRO-3 run is reported broken). We use
DeepSpeed's tensor-fragment API instead (``safe_get_full_*`` / ``safe_set_full_*``), which works for
stages 1-3 and bf16, plus the plain torch-optimizer path for stage 0 fp32.

Saving does not gather: :func:`local_fragments` copies the slice of every parameter (and its
moments) that this rank's optimizer partition holds, with its offset in the flattened parameter;
no collective, so it costs one memcpy of 1/world of the state and an async save keeps only that on
the training path. Readers assemble full tensors from every rank's fragments
(``CheckpointStore.load_tensors``). :func:`iter_full_state` (a collective for stages 1-3: every rank
must call it and consume it in the same order) gathers full tensors where a caller needs them live.
"""

from __future__ import annotations

from typing import Iterator

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optimizer_state_keys(optimizer_name: str) -> tuple[str, ...]:
    return ADAM_KEYS if optimizer_name in ("adam", "adamw") else ()


def _base_optimizer(engine):
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _is_zero_managed(param) -> bool:
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def iter_full_state(engine, state_keys: tuple[str, ...]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ``(name, {"fp32": w, <key>: moment, ...})`` for every trainable parameter, in module order.

    Tensors are full (unpartitioned), fp32, on CPU. Collective for ZeRO stages 1-3.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    base = _base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out: dict[str, torch.Tensor] = {}
        if _is_zero_managed(p):
            out["fp32"] = safe_get_full_fp32_param(p).detach().float().cpu().clone()
            for k in state_keys:
                v = safe_get_full_optimizer_state(p, k)
                out[k] = (v.detach().float().cpu().clone() if v is not None
                          else torch.zeros_like(out["fp32"]))
        else:  # ZeRO stage 0, fp32: the module parameter is the master weight
            out["fp32"] = p.detach().float().cpu().clone()
            st = base.state.get(p, {})
            for k in state_keys:
                out[k] = st[k].detach().float().cpu().clone() if k in st else torch.zeros_like(out["fp32"])
        yield name, out


def local_fragments(engine, state_keys: tuple[str, ...], owns) -> tuple[
        dict[str, dict[str, torch.Tensor]], dict[str, list]]:
    """This rank's share of the full fp32 state, copied to CPU; not a collective.

    Returns ``(tensors, fragments)``: ``tensors[name][kind]`` is a flat fp32 copy of elements
    ``[start, start + n)`` of the flattened parameter (kinds ``fp32`` and ``state_keys``), and
    ``fragments[name] = [start, full_shape]``. Every element of every trainable parameter is in
    exactly one rank's fragments: ZeRO 1-3 (and DeepSpeed's bf16 optimizer) by the rank's optimizer
    partition; parameters no optimizer partitions (ZeRO-0 fp32) whole, on the rank ``owns(name)``
    picks.
    """
    base = _base_optimizer(engine)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    fragments: dict[str, list] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        if hasattr(p, "ds_id"):  # ZeRO-3: rank i of the partition group holds [i * n, (i + 1) * n)
            frag = _zero3_fragment(p, state_keys)
        elif hasattr(p, "_hp_mapping"):  # ZeRO 1-2, bf16 optimizer: a contiguous slice, or none
            frag = _hp_fragment(p, state_keys)
        elif owns(name):  # the module parameter is the master weight
            st = base.state.get(p, {})
            frag = (0, {"fp32": p.detach().reshape(-1)}
                    | {k: st[k].detach().reshape(-1) for k in state_keys if k in st})
        else:
            frag = None
        if frag is None:
            continue
        start, parts = frag
        n = parts["fp32"].numel()
        out = {"fp32": _copy(parts["fp32"])}
        for k in state_keys:
            v = parts.get(k)
            out[k] = _copy(v) if v is not None else torch.zeros(n)
        tensors[name] = out
        fragments[name] = [start, list(getattr(p, "ds_shape", p.shape))]
    return tensors, fragments


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _hp_fragment(p, state_keys):
    m = p._hp_mapping
    if m is None:
        return None
    parts = {"fp32": m.get_hp_fragment()}
    for k in state_keys:
        if m.optim_fragment and k in m.optim_fragment:  # created by the optimizer's first step
            parts[k] = m.get_hp_fragment(k)
    return m.lp_fragment_address.start, parts


def _zero3_fragment(p, state_keys):
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    local = safe_get_local_fp32_param(p).reshape(-1)
    start = dist.get_rank(group=getattr(p, "ds_process_group", None)) * local.numel()
    n = min(local.numel(), p.ds_numel - start)  # the last partitions hold padding, or nothing
    if n <= 0:
        return None
    parts = {"fp32": local[:n]}
    for k in state_keys:
        try:
            parts[k] = safe_get_local_optimizer_state(p, k).reshape(-1)[:n]
        except KeyError:  # no optimizer step yet
            pass
    return start, parts


def optimizer_step_count(engine) -> int:
    """Adam's bias-correction step counter (same for every parameter group)."""
    for st in _base_optimizer(engine).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def load_full_state(engine, tensors: dict[str, dict[str, torch.Tensor]], state_keys: tuple[str, ...],
                    step_count: int) -> None:
    """Set full fp32 weights and optimizer moments into ``engine`` (any world size, any stage).

    ``tensors`` must hold every trainable parameter by name. Not a collective for the setters, but the
    final low-precision refresh of stages 1-2 is (all ranks call this together).
    Raises KeyError/ValueError naming the parameter when the checkpoint does not match the model.
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    base = _base_optimizer(engine)
    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"checkpoint lacks parameters {missing[:5]}{'...' if len(missing) > 5 else ''}")
    _ensure_optimizer_state(engine, base, state_keys)
    zero_managed = False
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        t = tensors[name]
        full_shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(t["fp32"].shape) != full_shape:
            raise ValueError(f"parameter {name}: checkpoint shape {tuple(t['fp32'].shape)} != model {full_shape}")
        if _is_zero_managed(p):
            zero_managed = True
            safe_set_full_fp32_param(p, t["fp32"].to(p.device if p.numel() else "cpu"))
            for k in state_keys:
                safe_set_full_optimizer_state(p, t[k], k)
        else:
            with torch.no_grad():
                p.data.copy_(t["fp32"].to(p.dtype))
            if state_keys:
                st = base.state.setdefault(p, {})
                for k in state_keys:
                    st[k] = t[k].clone().to(p.dtype)
    _set_step(base, state_keys, step_count, engine)
    if zero_managed:
        _refresh_low_precision(engine)


def _ensure_optimizer_state(engine, base, state_keys) -> None:
    """A fresh engine has no optimizer state until its first step: create zeroed Adam state so the
    fragment setters have somewhere to write, then let ZeRO link it to the parameters."""
    if not state_keys:
        return
    flat = [p for g in base.param_groups for p in g["params"]]
    # ZeRO-3 keeps its fp32 partitions outside param_groups between steps
    flat += list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", None) or [])
    for p in flat:
        st = base.state[p]
        if not all(k in st for k in state_keys):
            st.setdefault("step", torch.tensor(0.0))
            for k in state_keys:
                st.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
    link = getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def _set_step(base, state_keys, step_count, engine) -> None:
    if not state_keys:
        return
    for st in base.state.values():
        old = st.get("step")
        if torch.is_tensor(old):
            st["step"] = torch.tensor(float(step_count), dtype=old.dtype, device=old.device)
        elif isinstance(old, int):  # DeepSpeedCPUAdam keeps a plain int
            st["step"] = int(step_count)
        else:
            st["step"] = torch.tensor(float(step_count))


def _refresh_low_precision(engine) -> None:
    """Copy fp32 master partitions into the model's working weights after a restore."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):                 # ZeRO 1/2 (collective all-gather)
        opt.update_lp_params()
    elif hasattr(opt, "_reassign_or_swap_out_partitioned_parameters"):  # ZeRO 3
        for sub_group_id in range(len(opt.fp16_groups)):
            opt._reassign_or_swap_out_partitioned_parameters(sub_group_id)
