"""Consolidate a checkpoint into one fp32 state dict that a plain ``torch.nn.Module`` loads.

Two inputs are accepted: this project's checkpoints (a ``step-XXXXXXXX`` directory, or the
checkpoint root, meaning its newest verified step), and native DeepSpeed checkpoint directories
(``engine.save_checkpoint`` output), which go through DeepSpeed's own ``zero_to_fp32``.
The output is a served checkpoint (``model.pt`` + ``model.json``) as ``actors.serve`` loads it.
"""

from __future__ import annotations

import io
import os
import re

import torch

from actors.trainer.checkpoint import CheckpointError, CheckpointStore
from orchestrator.storage import Storage, local_path, parent

_STEP = re.compile(r"step-(\d{8,})/?$")


def consolidated_state_dict(ckpt_url: str, storage_options: dict | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict]:
    """Return ``(fp32 state dict, checkpoint state.json)`` for a verified checkpoint.

    ``ckpt_url`` is a step directory or a checkpoint root (newest verified step is used).
    Raises CheckpointError naming the URL when nothing verifies.
    """
    m = _STEP.search(ckpt_url.rstrip("/"))
    if m:
        store = CheckpointStore(parent(ckpt_url.rstrip("/")), storage_options)
        step = int(m.group(1))
        store.verify(step)
    else:
        store = CheckpointStore(ckpt_url, storage_options)
        step = store.latest_valid()
        if step is None:
            raise CheckpointError(f"{ckpt_url}: no verified checkpoint (no step-* directory "
                                  "with a valid MANIFEST.json)")
    tensors = store.load_tensors(step)
    state = store.load_state(step)
    return {name: t["fp32"] for name, t in tensors.items()}, state


def is_native_deepspeed(url: str) -> bool:
    """A local DeepSpeed ``save_checkpoint`` directory (has ``latest`` or ``*_model_states.pt``)."""
    path = local_path(url)
    if path is None or not os.path.isdir(path):
        return False
    if os.path.exists(os.path.join(path, "latest")):
        return True
    return any(f.endswith("model_states.pt") for _, _, fs in os.walk(path) for f in fs)


def export(ckpt_url: str, out_url: str, storage_options: dict | None = None) -> dict:
    """Write the consolidated fp32 weights of ``ckpt_url`` as a served checkpoint at ``out_url``.

    Returns a small report (step, parameter count, source kind). The module is rebuilt from the
    spec stored in the checkpoint and loads the weights with ``strict=True`` before anything is
    written, so a mismatch fails here rather than in Serve.
    """
    from actors.served_model import save_served_model
    from orchestrator.spec import parse_spec
    if is_native_deepspeed(ckpt_url):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(local_path(ckpt_url))
        buf = io.BytesIO()
        torch.save({k: v.float() for k, v in sd.items()}, buf)
        # A native checkpoint does not say which factory built the model: weights only.
        Storage(out_url, storage_options).write_bytes("model.pt", buf.getvalue())
        return {"source": "deepspeed", "params": sum(v.numel() for v in sd.values()), "out": out_url}
    sd, state = consolidated_state_dict(ckpt_url, storage_options)
    spec = parse_spec(state["spec"])
    module = spec.model.resolve()(**spec.model.kwargs)
    full = module.state_dict()
    full.update(sd)  # buffers (if any) keep their constructed values
    module.load_state_dict(full, strict=True)
    save_served_model(module, out_url, spec.model.factory, spec.model.kwargs, step=state["step"],
                      metrics=state.get("metrics", {}), storage_options=storage_options)
    return {"source": "orchestrator", "step": state["step"], "params": sum(v.numel() for v in sd.values()),
            "out": Storage(out_url, storage_options).root}
