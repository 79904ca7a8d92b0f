"""Test and demo hooks of the train loop, as one object the driver builds and the loop calls.

The driver builds a :class:`TrainHooks` once (from ``--option KEY=VALUE`` flags, a test, a bench
run, the demo's ``ORCHESTRATOR_MIN_STEP_TIME_S``) and hands it to every Ray Train worker in the train
loop config (it is a plain dataclass, so it pickles). ``Worker`` calls it at fixed points of the loop:

``on_start(rank, loader_pid)``      before the first step of each attempt: the ``pid_dir`` files
``before_step(step, world, rank)``  before each step: the ``hold_file`` wait
``after_compute(t_step)``           after a step's forward/backward/optimizer work: the pacing
``after_step(step, rank, world, resumed)``  after a step is counted: the ``fail_at_step`` kill

``TrainHooks()`` (every field unset) does nothing at any of them. ``control_poll_s`` is no hook:
it is how often rank 0 reads the scheduler's requests, carried here because the same ``--option``
flag sets it; the polling itself stays in the loop.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

MIN_STEP_TIME_ENV = "ORCHESTRATOR_MIN_STEP_TIME_S"


@dataclass(frozen=True)
class TrainHooks:
    """What a demo or test asks of the train loop; every field unset means nothing happens.

    - ``min_step_time_s``: stretch every step to at least this many seconds (pacing, as if the
      model were bigger). ``None``: the driver's ``ORCHESTRATOR_MIN_STEP_TIME_S`` (see
      :meth:`with_environment`), else no pacing.
    - ``fail_at_step``: the last rank's process exits (``os._exit(1)``) right after this step, on
      an attempt that did not resume from a checkpoint: once per run (chaos).
    - ``hold_file``: before each step, every rank waits while this file exists and holds a step
      number <= the step about to run; rank 0 writes ``<hold_file>.held`` as ``"<step> <world>"``
      while waiting (see :func:`hold`).
    - ``pid_dir``: each rank writes ``rank-R.pid`` (its process) and ``loader-R.pid`` (its loader
      actor's process) there at the start of each attempt.
    - ``control_poll_s``: how often rank 0 reads the scheduler's requests (not a hook; default 1).
    """

    min_step_time_s: float | None = None
    fail_at_step: int | None = None
    hold_file: str | None = None
    pid_dir: str | None = None
    control_poll_s: float = 1.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None) -> "TrainHooks":
        """Hooks from ``KEY=VALUE`` options (``--option``). Raises ValueError naming an unknown key
        or a value of the wrong type."""
        options = dict(options or {})
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"unknown train option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        kinds: dict[str, Callable[[Any], Any]] = {
            "min_step_time_s": float, "control_poll_s": float, "fail_at_step": int,
            "hold_file": str, "pid_dir": str}
        out: dict[str, Any] = {}
        for k, v in options.items():
            if v is None:
                continue
            if kinds[k] is int and (isinstance(v, bool) or not isinstance(v, int)):
                raise ValueError(f"train option {k} takes an integer, got {v!r}")
            try:
                out[k] = kinds[k](v)
            except (TypeError, ValueError):
                raise ValueError(f"train option {k} takes a {kinds[k].__name__}, got {v!r}") from None
        return cls(**out)

    def with_environment(self, environ: Mapping[str, str] | None = None) -> "TrainHooks":
        """These hooks with ``min_step_time_s`` taken from ``ORCHESTRATOR_MIN_STEP_TIME_S`` when unset
        (the driver calls this once; workers never read the variable)."""
        env = os.environ if environ is None else environ
        if self.min_step_time_s is not None or not env.get(MIN_STEP_TIME_ENV):
            return self
        return dataclasses.replace(self, min_step_time_s=float(env[MIN_STEP_TIME_ENV]))

    # ------------------------------------------------------------------ called by the loop
    def on_start(self, rank: int, loader_pid: Callable[[], int]) -> None:
        """Before the first step of an attempt: write this rank's pid files (``pid_dir``)."""
        if not self.pid_dir:
            return
        os.makedirs(self.pid_dir, exist_ok=True)
        with open(os.path.join(self.pid_dir, f"rank-{rank}.pid"), "w") as f:
            f.write(str(os.getpid()))
        with open(os.path.join(self.pid_dir, f"loader-{rank}.pid"), "w") as f:
            f.write(str(loader_pid()))

    def before_step(self, step: int, world: int, rank: int) -> None:
        """Before step ``step`` (0-based count of steps done): wait on ``hold_file``."""
        if self.hold_file:
            hold(self.hold_file, step, world, rank)

    def after_compute(self, t_step: float) -> None:
        """After a step's compute, begun at ``time.monotonic() == t_step``: pace it to
        ``min_step_time_s``."""
        if self.min_step_time_s:
            time.sleep(max(0.0, self.min_step_time_s - (time.monotonic() - t_step)))

    def after_step(self, step: int, rank: int, world: int, resumed: bool) -> None:
        """After step ``step`` (1-based) is counted, saved and reported: the ``fail_at_step`` kill
        (the last rank, on an attempt that started from scratch)."""
        if self.fail_at_step is not None and step == self.fail_at_step and rank == world - 1 \
                and not resumed:
            os._exit(1)  # a worker process dies mid-run


def hold(path: str, step: int, world: int, rank: int, poll_s: float = 0.1) -> None:
    """While ``path`` exists and holds a step number <= ``step``, wait here.

    Rank 0 writes ``<path>.held`` (``"<step> <world size>"``) while waiting, so a chaos test can
    pin the run at a known step until the cluster change it waits for has taken effect, instead
    of racing the trainer with sleeps.
    """
    announced = False
    while True:
        try:
            with open(path) as f:
                at = int(f.read().strip() or 0)
        except (FileNotFoundError, ValueError):
            return
        if step < at:
            return
        if rank == 0 and not announced:
            with open(path + ".held.tmp", "w") as f:
                f.write(f"{step} {world}")
            os.replace(path + ".held.tmp", path + ".held")
            announced = True
        time.sleep(poll_s)
