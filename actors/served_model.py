"""The served-checkpoint format: one directory at any storage URL holding

* ``model.pt``   - a torch fp32 ``state_dict`` (``torch.save``; loadable with ``weights_only=True``)
* ``model.json`` - ``{"factory": "module:function", "kwargs": {...}, "step": int, "metrics": {...}}``

The trainer's ``orchestrator export`` writes it with :func:`save_served_model`; Serve replicas read
it with :func:`load_served_model`. ``model.pt`` is written before ``model.json``, so a directory
whose ``model.json`` exists holds complete weights (each file is written atomically by Storage).
"""

from __future__ import annotations

import io
import json
from typing import Any

import torch

from orchestrator import storage
from orchestrator.spec import ModelRef

WEIGHTS = "model.pt"
META = "model.json"


class ServedCheckpointError(ValueError):
    """A served checkpoint is missing, incomplete or does not fit the model it is loaded into."""


def save_served_model(module: torch.nn.Module, url: str, factory: str, kwargs: dict[str, Any],
                      step: int = 0, metrics: dict[str, Any] | None = None,
                      storage_options: dict[str, Any] | None = None) -> str:
    """Write ``module``'s weights (as fp32, on CPU) and metadata to the directory ``url``.

    Returns ``url``. ``factory``/``kwargs`` must rebuild the module (checked by :class:`ModelRef`).
    """
    ref = ModelRef(factory=factory, kwargs=dict(kwargs))
    state = {k: (v.detach().to("cpu", torch.float32) if v.is_floating_point() else v.detach().cpu())
             for k, v in module.state_dict().items()}
    buf = io.BytesIO()
    torch.save(state, buf)
    st = storage.Storage(url, storage_options)
    st.write_bytes(WEIGHTS, buf.getvalue())
    meta = {"factory": ref.factory, "kwargs": ref.kwargs, "step": int(step),
            "metrics": dict(metrics or {})}
    st.write_text(META, json.dumps(meta, indent=1, sort_keys=True))
    return url


def read_served_meta(url: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's ``model.json``. Raises ServedCheckpointError if it is absent or not JSON."""
    st = storage.Storage(url, storage_options)
    try:
        meta = json.loads(st.read_text(META))
    except storage.StorageError as e:
        raise ServedCheckpointError(f"{url} is not a served checkpoint: {e}"
                                    f"{_export_hint(url, storage_options)}") from None
    except json.JSONDecodeError as e:
        raise ServedCheckpointError(f"{storage.join(url, META)} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or "factory" not in meta:
        raise ServedCheckpointError(f"{storage.join(url, META)} has no 'factory'")
    return meta


def _export_hint(url: str, storage_options: dict[str, Any] | None) -> str:
    """For a training checkpoint's URL, the command that makes it a served one."""
    from orchestrator.pipeline import served_location, training_step
    step = training_step(url, storage_options)
    if step is None:
        return ""
    return (f". It is a training checkpoint: `python -m jobs.serve SPEC --checkpoint {url}` exports "
            f"and serves it, or export it first: `orchestrator export {step} {served_location(step)}`")


def load_served_model(url: str, model_ref: ModelRef | dict | None = None,
                      storage_options: dict[str, Any] | None = None) -> torch.nn.Module:
    """Build the model and load the checkpoint's weights; returns it in eval mode on CPU.

    ``model_ref`` (the serve spec's ``model``) decides the architecture; without it the
    checkpoint's ``model.json`` does. Raises ServedCheckpointError when files are missing or the
    weights do not fit the model (the message names the URL and the mismatched keys).
    """
    meta = read_served_meta(url, storage_options)
    if model_ref is None:
        model_ref = ModelRef(factory=meta["factory"], kwargs=meta.get("kwargs") or {})
    elif isinstance(model_ref, dict):
        model_ref = ModelRef(**model_ref)
    model = model_ref.resolve()(**model_ref.kwargs)
    st = storage.Storage(url, storage_options)
    try:
        raw = st.read_bytes(WEIGHTS)
    except storage.StorageError as e:
        raise ServedCheckpointError(f"{url} has no weights: {e}") from None
    state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ServedCheckpointError(f"weights at {url} do not fit {model_ref.factory}"
                              f"({model_ref.kwargs}): {e}") from None
    return model.eval()
