"""What a train spec's model and checkpoint URL would fail on at run time, found before anything
starts: the model is built and run on PyTorch's meta device (shapes and dtypes only, no memory and
no arithmetic, whatever its size), and the checkpoint URL gets a probe object written and deleted.
"""

from __future__ import annotations

import uuid

import torch

from actors.trainer.loop import COMPUTE_DTYPES
from orchestrator.spec import TrainSpec
from orchestrator.storage import Storage

_PROBE_BATCH = 2


def count_params(spec: TrainSpec) -> int:
    """Build the spec's model on the meta device (no memory) and count its trainable parameters."""
    with torch.device("meta"):
        model = spec.model.resolve()(**spec.model.kwargs)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def model_errors(spec: TrainSpec, schema: dict | None) -> list[tuple[str, str]]:
    """``(field path, reason)`` for a factory that does not import, kwargs it refuses, something
    that is not a ``torch.nn.Module``, or (given the dataset's column ``schema``) samples whose
    shape or dtype the model or the loss cannot take."""
    m = spec.model
    try:
        factory = m.resolve()
    except (ImportError, AttributeError) as e:
        return [("model.factory", f"cannot import {m.factory!r}: {type(e).__name__}: {e}")]
    try:
        with torch.device("meta"):
            model = factory(**m.kwargs)
    except Exception as e:  # noqa: BLE001 - whatever the factory raises is the user's error to see
        return [("model.kwargs", f"{m.factory}(**{m.kwargs}) raised {type(e).__name__}: {e}")]
    if not isinstance(model, torch.nn.Module):
        return [("model.factory", f"{m.factory} returned {type(model).__name__}, not a torch.nn.Module")]
    if schema is None or "x" not in schema or "y" not in schema:
        missing = sorted({"x", "y"} - set(schema or {}))
        return [("dataset.url", f"the dataset has no column(s) {missing}: the trainer feeds x to the model "
                 f"and scores its output against y")] if schema is not None else []
    x, y = schema["x"], schema["y"]
    dtype = COMPUTE_DTYPES[spec.deepspeed.precision]
    xt = torch.empty((_PROBE_BATCH, *x["shape"]), dtype=getattr(torch, x["dtype"]), device="meta")
    if xt.is_floating_point():
        xt = xt.to(dtype)
    model = model.to(dtype) if spec.deepspeed.precision != "fp32" else model
    try:
        with torch.no_grad():
            out = model(xt)
    except NotImplementedError:
        return []  # an op with no meta kernel: this check cannot tell, the first step will
    except Exception as e:  # noqa: BLE001
        return [("dataset.url", f"its samples (x {x['dtype']}{x['shape']}) do not fit {m.factory}: "
                 f"{type(e).__name__}: {e}")]
    return _loss_errors(spec.loss, out, x, y)


def _loss_errors(loss: str, out, x: dict, y: dict) -> list[tuple[str, str]]:
    if not isinstance(out, torch.Tensor):
        return [("model.factory", f"the model's output is a {type(out).__name__}, not a tensor")]
    ydt = y["dtype"]
    integer = ydt.startswith(("int", "uint"))
    got = f"output {list(out.shape[1:])} per sample, labels y {ydt}{y['shape']}"
    if loss == "cross_entropy" and (out.dim() != 2 or y["shape"] or not integer):
        return [("loss", f"cross_entropy needs an output [classes] and an integer label per sample; {got}")]
    if loss == "lm_cross_entropy" and (out.dim() != 3 or list(out.shape[1:2]) != y["shape"][:1] or not integer):
        return [("loss", f"lm_cross_entropy needs an output [tokens, vocab] and integer labels [tokens]; {got}")]
    if loss == "mse" and list(out.shape[1:]) != list(y["shape"]):
        return [("loss", f"mse needs an output shaped like y; {got}")]
    return []


def checkpoint_errors(spec: TrainSpec) -> list[tuple[str, str]]:
    """Write and delete a probe object under the checkpoint URL (one small write)."""
    try:
        st = Storage(spec.checkpoint.url, spec.storage.as_options())
        probe = f".probe-{uuid.uuid4().hex}"
        st.write_bytes(probe, b"", fsync=False)
        st.delete(probe)
    except Exception as e:  # noqa: BLE001 - any failure to write there will recur at the first save
        return [("checkpoint.url", f"cannot write under {spec.checkpoint.url}: {type(e).__name__}: {e}")]
    return []
