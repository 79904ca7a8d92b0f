"""Every private DeepSpeed internal this project touches (DeepSpeed pinned to 0.19.x in pyproject.toml).

Why any at all: a checkpoint that resumes on another world size or ZeRO stage needs each rank's
slice of the fp32 master weights and Adam moments, read and set in place. DeepSpeed's public
``deepspeed.utils.safe_{get,set}_local_*`` reach ZeRO-3's partitions but not ZeRO 1-2's or the bf16
optimizer's (those go through each parameter's tensor-fragment mapping), and nothing public creates
optimizer state in a fresh engine or copies restored masters back into the working weights. Public
API to move to: ``safe_set_local_*`` for every stage, or universal checkpoints loadable in place.

torch and DeepSpeed are imported inside the functions: the control-plane core imports this package
(``orchestrator.compat``) without either. :func:`verify` checks every class-level internal below;
the instance-level ones are checked where they are read, with a :class:`CompatError`, and by the
ZeRO tests (tests/test_zero_reshard.py) on engines of every stage.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import threading
from typing import Literal

from orchestrator.compat import CompatError

ENGINE = "DeepSpeed"
log = logging.getLogger(__name__)
Kind = Literal["zero3", "fragment", "plain"]
OptimizerKind = Literal["zero3", "fragments", "torch"]


def _fail(what: str, detail: str) -> CompatError:
    return CompatError(ENGINE, what, detail)


# ------------------------------------------------------------------------- parameters
# ZeRO-3 marks a partitioned parameter with ``ds_id`` (and ``ds_numel``/``ds_shape`` for its full
# size, ``ds_process_group`` for its partition group); ZeRO 1-2 and the bf16 optimizer link each
# working parameter to its fp32 fragment as ``_hp_mapping`` (None where this rank holds none of it).
def param_kind(p) -> Kind:
    if hasattr(p, "ds_id"):
        return "zero3"
    if hasattr(p, "_hp_mapping"):
        return "fragment"
    return "plain"


def full_shape(p) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def full_numel(p) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def zero3_partition(p):
    """``(start, valid elements, partition tensor)`` of this rank's ZeRO-3 partition of ``p``."""
    import torch.distributed as dist
    from deepspeed.utils import safe_get_local_fp32_param
    if not hasattr(p, "ds_process_group") or not hasattr(p, "ds_numel"):
        raise _fail("ZeRO-3 parameter ds_process_group/ds_numel", "missing on a parameter with ds_id")
    local = safe_get_local_fp32_param(p).reshape(-1)
    start = dist.get_rank(group=p.ds_process_group) * local.numel()
    return start, min(local.numel(), p.ds_numel - start), local


def _mapping(p):
    m = p._hp_mapping
    if m is not None and not (hasattr(m, "lp_fragment_address") and hasattr(m, "get_hp_fragment")):
        raise _fail("tensor_fragment", f"{type(m).__name__} lacks lp_fragment_address or get_hp_fragment")
    return m


def fragment_range(p) -> tuple[int, int]:
    """``(start, n)``: the elements of ``p`` (flattened) this rank's fragment holds; ``(0, 0)``: none."""
    m = _mapping(p)
    return (m.lp_fragment_address.start, m.lp_fragment_address.numel) if m is not None else (0, 0)


def fragment_tensors(p, state_keys: tuple[str, ...]):
    """``(start, {"fp32": master, key: moment, ...})`` of this rank's fragment of ``p``, views not
    copies; moments only once the optimizer has stepped. None where this rank holds none."""
    m = _mapping(p)
    if m is None:
        return None
    parts = {"fp32": m.get_hp_fragment()}
    for k in state_keys:
        if m.optim_fragment and k in m.optim_fragment:  # created by the optimizer's first step
            parts[k] = m.get_hp_fragment(k)
    return m.lp_fragment_address.start, parts


def set_fragment(p, tensors: dict, state_keys: tuple[str, ...]) -> None:
    """Copy ``tensors`` (``fp32`` and ``state_keys``, this rank's fragment) into ``p``'s fragment."""
    import torch
    m = _mapping(p)
    if m is None:
        return
    with torch.no_grad():
        m.get_hp_fragment().copy_(tensors["fp32"])
        for k in state_keys:
            m.get_hp_fragment(k).copy_(tensors[k])


# ------------------------------------------------------------------------- optimizers
def base_optimizer(engine):
    """The torch optimizer under DeepSpeed's wrapper (or the engine's optimizer when unwrapped)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


@functools.cache
def _optimizer_classes():
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
    return DeepSpeedZeroOptimizer_Stage3, (DeepSpeedZeroOptimizer, BF16_Optimizer)


def optimizer_kind(engine) -> OptimizerKind:
    """Which restore path the engine's optimizer takes; a wrapper this module does not know is an
    error (a silent fallback would restore weights without optimizer state)."""
    import torch
    stage3, fragments = _optimizer_classes()
    opt = engine.optimizer
    if isinstance(opt, stage3):
        return "zero3"
    if isinstance(opt, fragments):
        return "fragments"
    if isinstance(opt, torch.optim.Optimizer):
        return "torch"
    raise _fail(f"optimizer {type(opt).__module__}.{type(opt).__name__}",
                "no known way to read or restore its state")


def ensure_optimizer_state(engine, state_keys: tuple[str, ...]) -> None:
    """A fresh engine has no optimizer state until its first step: create zeroed Adam state so the
    fragment setters have somewhere to write, then have ZeRO link it to the parameters."""
    import torch
    if not state_keys:
        return
    kind = optimizer_kind(engine)
    base = base_optimizer(engine)
    flat = [p for g in base.param_groups for p in g["params"]]
    if kind == "zero3":  # ZeRO-3 keeps its fp32 partitions outside param_groups between steps
        flat += list(_need_attr(engine.optimizer, "fp32_partitioned_groups_flat"))
    for p in flat:
        st = base.state[p]
        if not all(k in st for k in state_keys):
            st.setdefault("step", torch.tensor(0.0))
            for k in state_keys:
                st.setdefault(k, torch.zeros_like(p, memory_format=torch.preserve_format))
    if kind == "fragments":
        _need_attr(engine.optimizer, "_lazy_init_hp_params_optimizer_state")()


def refresh_low_precision(engine) -> None:
    """Copy restored fp32 master partitions into the model's working weights (ZeRO 1-2 and bf16:
    an all-gather, so every rank calls it)."""
    kind = optimizer_kind(engine)
    opt = engine.optimizer
    if kind == "fragments":
        _need_attr(opt, "update_lp_params")()
    elif kind == "zero3":
        swap = _need_attr(opt, "_reassign_or_swap_out_partitioned_parameters")
        for sub_group_id in range(len(_need_attr(opt, "fp16_groups"))):
            swap(sub_group_id)


def _need_attr(obj, name: str):
    if not hasattr(obj, name):
        raise _fail(f"{type(obj).__name__}.{name}", "is gone")
    return getattr(obj, name)


# ------------------------------------------------------------------------- compile
# Why: ``deepspeed.initialize`` and every ZeRO step import DeepSpeed's Muon optimizer module, whose
# kernels are wrapped in ``torch.compile`` at import (``@compiler.compile()``); that loads
# TorchInductor: 1.5 s of every worker (re)start on a 2-core machine, 2-3 s with two workers
# starting at once, for kernels only Muon runs (a spec cannot name Muon). No option defers it.
# Public API to move to: a lazy ``compiler.compile`` in DeepSpeed.
def defer_compile() -> None:
    """Make DeepSpeed's ``@compiler.compile()`` kernels compile on first call, not at import. Call
    after ``import deepspeed`` and before ``deepspeed.initialize``."""
    import torch
    from deepspeed.runtime import compiler
    if getattr(compiler.compile, "deferred", False):
        return

    def compile():
        def decorate(fn):
            compiled = None

            @functools.wraps(fn)
            def call(*args, **kwargs):
                nonlocal compiled
                if compiled is None:
                    compiled = torch.compile(fn)
                return compiled(*args, **kwargs)
            return call
        return decorate

    compile.deferred = True
    compiler.compile = compile


# ------------------------------------------------------------------------- JIT-built ops
# Why: on CPU, ``deepspeed.comm`` builds its shared-memory communication op at init with torch's
# JIT extension loader, which serialises every build and load of an op with a lock file
# (``torch.utils.file_baton.FileBaton``: ``<build dir>/lock``, made with O_EXCL) that has no owner.
# A process killed while it builds (a preempted job's worker, a warm spare) leaves the file, and
# every later start of the op on the machine waits for it forever. No option bounds the wait. A
# live builder keeps the file open (its descriptor is only closed at release), so a lock no process
# on the machine has open is stale. Public API to move to: a lock that dies with its owner.
SHM_OP = "deepspeed_shm_comm"  # ShareMemCommBuilder.NAME: the op's name and build directory
STALE_CHECK_S = 0.5            # how often a wait looks at the lock; stale = unowned on two looks


def shm_op_build_dir() -> str:
    """Where torch's JIT loader builds DeepSpeed's shared-memory op (it creates the folder)."""
    from torch.utils import cpp_extension
    return cpp_extension._get_build_directory(SHM_OP, verbose=False)


def file_holders(path: str) -> set[int] | None:
    """The processes on this machine that hold ``path`` open (Linux ``/proc``; processes this user
    cannot inspect are not seen): empty if none or ``path`` is gone, None where that cannot be told."""
    try:
        target = os.stat(path)
    except FileNotFoundError:
        return set()
    if not os.path.isdir("/proc/self/fd"):
        return None
    holders = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if st.st_ino == target.st_ino and st.st_dev == target.st_dev:
                holders.add(int(pid))
                break
    return holders


class StaleLockBreaker:
    """While a build runs, removes its lock file once no process has held it open for two looks
    (``STALE_CHECK_S`` apart, the same file both times), so a waiting build goes on; ``broken``
    counts the removals. A context manager; its thread ends with the block."""

    def __init__(self, path: str, period_s: float = STALE_CHECK_S):
        self.path, self.period_s = path, period_s
        self.broken = 0
        self.waited_on_live = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reo-stale-lock", daemon=True)

    def __enter__(self) -> "StaleLockBreaker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def check(self, seen: tuple | None) -> tuple | None:
        """One look; returns what to compare the next look with."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        holders = file_holders(self.path)
        if holders is None:  # cannot tell here: leave torch's wait as it is
            self._stop.set()
            return None
        if holders:
            others = holders - {os.getpid()}
            if others and not self.waited_on_live:
                self.waited_on_live = True
                log.info("waiting for a running build of %s by pid %s (lock %s)", SHM_OP, min(others), self.path)
            return None
        key = (st.st_ino, st.st_mtime_ns)
        if seen != key:
            return key
        try:
            os.remove(self.path)
        except FileNotFoundError:
            return None
        self.broken += 1
        log.warning(
            "removed a stale build lock %s: no process holds it (its builder died while building "
            "%s); building again", self.path, SHM_OP)
        return None

    def _run(self) -> None:
        seen = None
        while not self._stop.wait(self.period_s):
            seen = self.check(seen)


def build_shm_op(only_if_built: bool = False):
    """DeepSpeed's CPU shared-memory op, built (or loaded) as ``deepspeed.comm`` does at init, but
    without waiting forever on a lock its builder died holding (see above). DeepSpeed keeps the
    loaded op per process, so its own init then uses this one. ``only_if_built``: load only an op
    built before (a warm spare's preload must not compile it). Returns DeepSpeed's answer (None
    where the op does not apply), or None when ``only_if_built`` and it is not built."""
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm's torch
    build_dir = shm_op_build_dir()
    if only_if_built and not os.path.exists(os.path.join(build_dir, SHM_OP + ".so")):
        return None
    with StaleLockBreaker(os.path.join(build_dir, "lock")) as breaker:
        try:
            return ds_comm_torch.build_shm_op()
        except (ImportError, OSError) as e:
            if not breaker.broken:
                raise
            # the dead builder left no library to load: this process builds it now. torch skips
            # the build of an op this process already tried (its per-process versioner has the
            # entry), so the entry goes first
            log.warning("%s not loadable after a stale lock (%s); building it", SHM_OP, e)
            from torch.utils import cpp_extension
            cpp_extension.JIT_EXTENSION_VERSIONER.entries.pop(SHM_OP, None)
            return ds_comm_torch.build_shm_op()


# ------------------------------------------------------------------------- verify
def verify() -> None:
    """Check the class-level internals above are where this module expects them. Raises
    :class:`~orchestrator.compat.CompatError` naming the first that is not."""
    import dataclasses
    import importlib
    import inspect

    from deepspeed.runtime import compiler
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")  # the module, not
    # the class deepspeed.utils re-exports under the same name
    if not callable(getattr(compiler, "compile", None)):
        raise _fail("deepspeed.runtime.compiler.compile", "is gone")
    if not getattr(compiler.compile, "deferred", False) and inspect.signature(compiler.compile).parameters:
        raise _fail("deepspeed.runtime.compiler.compile", "now takes arguments; the deferred stand-in takes none")
    defer_compile()
    fields = {f.name for f in dataclasses.fields(tensor_fragment.tensor_fragment)}
    if not {"lp_fragment_address", "optim_fragment"} <= fields:
        raise _fail("tensor_fragment", f"fields are now {sorted(fields)}")
    _need_attr(tensor_fragment.tensor_fragment, "get_hp_fragment")
    if not {"start", "numel"} <= {f.name for f in dataclasses.fields(tensor_fragment.fragment_address)}:
        raise _fail("fragment_address", "lacks start or numel")
    stage3, fragments = _optimizer_classes()
    for cls in fragments:
        for name in ("_lazy_init_hp_params_optimizer_state", "update_lp_params"):
            if not hasattr(cls, name):
                raise _fail(f"{cls.__name__}.{name}", "is gone")
    if not hasattr(stage3, "_reassign_or_swap_out_partitioned_parameters"):
        raise _fail("DeepSpeedZeroOptimizer_Stage3._reassign_or_swap_out_partitioned_parameters", "is gone")
    init = inspect.getsource(stage3.__init__) + inspect.getsource(stage3)
    for name in ("fp32_partitioned_groups_flat", "fp16_groups"):
        if f"self.{name}" not in init:
            raise _fail(f"DeepSpeedZeroOptimizer_Stage3.{name}", "is no longer set")
    import torch.utils.cpp_extension as cpp_extension
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not the torch
    # package deepspeed.comm re-exports under that name
    from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
    if not callable(getattr(cpp_extension, "_get_build_directory", None)):
        raise _fail("torch.utils.cpp_extension._get_build_directory", "is gone")
    if "FileBaton(os.path.join(build_directory, 'lock'))" not in inspect.getsource(cpp_extension._jit_compile):
        raise _fail("torch.utils.cpp_extension._jit_compile", "no longer locks <build dir>/lock with FileBaton")
    if not isinstance(getattr(getattr(cpp_extension, "JIT_EXTENSION_VERSIONER", None), "entries", None), dict):
        raise _fail("torch.utils.cpp_extension.JIT_EXTENSION_VERSIONER.entries", "is gone or not a dict")
    if not callable(getattr(ds_comm_torch, "build_shm_op", None)):
        raise _fail("deepspeed.comm.torch.build_shm_op", "is gone")
    if ShareMemCommBuilder.NAME != SHM_OP:
        raise _fail("ShareMemCommBuilder.NAME", f"is now {ShareMemCommBuilder.NAME!r}, not {SHM_OP!r}")
    import deepspeed.utils as ds_utils
    for name in ("safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_optimizer_state",
                 "safe_set_local_optimizer_state", "safe_get_full_fp32_param", "safe_get_full_optimizer_state"):
        if not hasattr(ds_utils, name):
            raise _fail(f"deepspeed.utils.{name}", "is gone")
