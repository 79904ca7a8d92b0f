"""World-size-independent ZeRO state: each rank saves and restores only the slices it holds.

DeepSpeed's own checkpoints are partitioned by rank; reloading them on a different world size needs
its offline Universal Checkpoint conversion (and growing a ZeRO-3 run is reported broken). Here a
save is :func:`local_fragments`: a copy of the slice of every parameter's fp32 master weight and
optimizer moments that this rank's partition holds, with its offset in the flattened parameter (no
collective: one memcpy of 1/world of the state). A restore is :func:`local_ranges` (what this rank's
engine, of any world size and ZeRO stage, holds now) read back from whichever shards hold it
(``CheckpointStore.load_slices``) and set by :func:`load_local_state`. ZeRO 1-2 and DeepSpeed's bf16
optimizer are reached through their tensor-fragment mappings, ZeRO-3 through
``safe_get/set_local_*``, stage 0 fp32 through the plain torch optimizer; every DeepSpeed internal
on the way is in :mod:`orchestrator.compat.deepspeed_internals`. :func:`iter_full_state`
(a collective for stages 1-3) gathers full tensors where a caller needs them live (tests).
"""

from __future__ import annotations

from typing import Iterator

import torch

from orchestrator.compat import deepspeed_internals as dsi

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def optimizer_state_keys(optimizer_name: str) -> tuple[str, ...]:
    return ADAM_KEYS if optimizer_name in ("adam", "adamw") else ()


def iter_full_state(engine, state_keys: tuple[str, ...]) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Yield ``(name, {"fp32": w, <key>: moment, ...})`` for every trainable parameter, in module order.

    Tensors are full (unpartitioned), fp32, on CPU. Collective for ZeRO stages 1-3.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    base = dsi.base_optimizer(engine)
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        out: dict[str, torch.Tensor] = {}
        if dsi.param_kind(p) != "plain":
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
    base = dsi.base_optimizer(engine)
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    fragments: dict[str, list] = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        kind = dsi.param_kind(p)
        if kind == "zero3":  # rank i of the partition group holds [i * n, (i + 1) * n)
            frag = _zero3_fragment(p, state_keys)
        elif kind == "fragment":  # ZeRO 1-2, bf16 optimizer: a contiguous slice, or none
            frag = dsi.fragment_tensors(p, state_keys)
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
        fragments[name] = [start, list(dsi.full_shape(p))]
    return tensors, fragments


def local_ranges(engine) -> dict[str, tuple[int, int, tuple[int, ...]]]:
    """What this rank's engine holds of every trainable parameter's fp32 state:
    ``{name: (start, n, full_shape)}``, elements ``[start, start + n)`` of the flattened
    parameter (its ZeRO partition's slice; the whole parameter where no optimizer partitions it).
    A restore reads only these (:func:`load_local_state`)."""
    out = {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        kind = dsi.param_kind(p)
        if kind == "zero3":
            start, n, _ = dsi.zero3_partition(p)
        elif kind == "fragment":
            start, n = dsi.fragment_range(p)
        else:
            start, n = 0, p.numel()
        out[name] = (start, max(0, n), dsi.full_shape(p))
    return out


def load_local_state(engine, slices: dict[str, dict[str, torch.Tensor]], state_keys: tuple[str, ...],
                     step_count: int) -> None:
    """Set this rank's slices (``local_ranges``, read by ``CheckpointStore.load_slices``) into its
    engine: fp32 master weights and optimizer moments, any ZeRO stage. All ranks call it together
    (the final low-precision refresh of stages 1-2 is a collective)."""
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state
    base = dsi.base_optimizer(engine)
    dsi.ensure_optimizer_state(engine, state_keys)
    zero_managed = False
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        t = slices.get(name, {})
        kind = dsi.param_kind(p)
        if kind == "zero3":
            zero_managed = True
            start, n, local = dsi.zero3_partition(p)
            if n <= 0:
                continue
            for k in ("fp32", *state_keys):
                part = local.clone() if k == "fp32" else torch.zeros_like(local)
                part[:n] = t[k]
                if k == "fp32":
                    safe_set_local_fp32_param(p, part)
                else:
                    safe_set_local_optimizer_state(p, part, k)
        elif kind == "fragment":
            zero_managed = True
            dsi.set_fragment(p, t, state_keys)
        else:
            with torch.no_grad():
                p.data.copy_(t["fp32"].reshape(p.shape).to(p.dtype))
            if state_keys:
                st = base.state.setdefault(p, {})
                for k in state_keys:
                    st[k] = t[k].reshape(p.shape).clone().to(p.dtype)
    _set_step(base, state_keys, step_count, engine)
    if zero_managed:
        dsi.refresh_low_precision(engine)


def _copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32, copy=True)


def _zero3_fragment(p, state_keys):
    from deepspeed.utils import safe_get_local_optimizer_state
    start, n, local = dsi.zero3_partition(p)
    if n <= 0:  # the last partitions hold padding, or nothing
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
    for st in dsi.base_optimizer(engine).state.values():
        if "step" in st:
            s = st["step"]
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


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
