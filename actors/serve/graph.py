"""Run a served model as one TorchScript graph where that is safe, eagerly otherwise.

Why: a replica's forward runs in its own thread beside the event loop that parses requests.
An eager forward calls back into Python for every module and op, and each time it must win the
GIL back from the event loop, which nearly doubles a batch's time on a 2-core machine. A frozen
TorchScript graph runs every op in C++ with the GIL released, so the
forward thread needs the GIL once at the start and once at the end of a batch
(docs/BENCHMARKS.md, Serve).

``graph_mode`` (a serve spec field):

* ``auto`` (default): trace the model on the spec's input shape and dtype, freeze it, and keep
  the graph only if it gives the eager model's outputs on batch sizes other than the traced one.
  A model that does not trace, or traces into something shape-specific, is served eagerly, with
  a warning in the replica's log.
* ``torchscript``: the same, but a model that fails the check fails the deployment.
* ``eager``: never trace.

``torch.jit.trace`` and ``torch.jit.freeze`` are deprecated in PyTorch 2.13 but still supported;
their deprecation warnings are silenced here. If a later PyTorch drops them, ``auto`` falls back
to eager by itself.
"""

from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger("ray.serve")

GRAPH_MODES = ("auto", "torchscript", "eager")
_CHECK_BATCHES = (1, 3)  # traced on 2 examples: outputs must match eager on other batch sizes


class GraphError(RuntimeError):
    """``graph_mode: torchscript`` and the model cannot be served as a TorchScript graph."""


def _probe(n: int, shape: tuple[int, ...], dtype: str, device: torch.device, seed: int) -> torch.Tensor:
    if dtype == "int64":  # token ids: only 0 is in range for every vocabulary
        return torch.zeros(n, *shape, dtype=torch.int64, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g).to(device)


def _close(got, want) -> bool:
    if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
        return False
    if got.shape != want.shape or got.dtype != want.dtype:
        return False
    tol = 1e-4 if want.dtype in (torch.float32, torch.float64) else 2e-2
    return bool(torch.allclose(got.float(), want.float(), rtol=tol, atol=tol))


def as_graph(model: torch.nn.Module, input_shape: tuple[int, ...], input_dtype: str,
             mode: str = "auto", what: str = "model") -> tuple[torch.nn.Module, str]:
    """``(module to serve, "torchscript" or "eager")`` for an eval-mode model already on its device.

    Raises GraphError only for ``mode="torchscript"``; ``auto`` falls back to the eager model.
    """
    if mode not in GRAPH_MODES:
        raise ValueError(f"graph_mode must be one of {list(GRAPH_MODES)}, not {mode!r}")
    if mode == "eager":
        return model, "eager"
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")  # deprecation and tracer warnings; checked below instead
            traced = torch.jit.freeze(torch.jit.trace(
                model.eval(), _probe(2, input_shape, input_dtype, device, 0), check_trace=False))
            for seed, n in enumerate(_CHECK_BATCHES, start=1):
                x = _probe(n, input_shape, input_dtype, device, seed)
                if not _close(traced(x), model(x)):
                    raise ValueError(f"the traced graph's outputs differ from the model's on a batch of {n}")
    except Exception as e:  # noqa: BLE001 - any failure to trace means: serve it eagerly
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if mode == "torchscript":
            raise GraphError(f"graph_mode torchscript: {what} cannot run as a TorchScript graph ({reason}); "
                             "use graph_mode auto or eager") from e
        logger.warning("serving %s eagerly: it does not run as a TorchScript graph (%s)", what, reason)
        return model, "eager"
    return traced, "torchscript"
