"""One Tune trial: a Tune trainable that runs a whole elastic DeepSpeed train job (Ray Train v2).

As in Ray Train v2's Tune integration, the trial launches a ``TorchTrainer`` and calls ``fit()``;
the trial actor itself reserves no CPU (the Train workers do).

* The trial's spec is the tune spec's ``trial`` with the sampled fields set, its own name and its own
  checkpoint URL (``<results_url>/trials/<trial_id>/checkpoints``), so it trains with the same loop,
  data loader and checkpoint format as a train job.
* A Train callback (:class:`ForwardReports`) hands rank 0's metrics and each newly committed
  checkpoint from the Train controller to the trial; every ``step()`` returns the next report.
* A Tune checkpoint is a small pointer (trial id, checkpoint root, newest committed step), never a
  second copy of the weights. On restore the trial reads it: its own pointer (or none) means resume
  from its own newest verified checkpoint (the train loop does that); another trial's pointer is a
  PBT exploit, and that trial's committed checkpoint (weights, ZeRO optimizer moments, data cursor,
  RNG) is copied in first, then training continues from it with this trial's perturbed values.
* ``cleanup()`` (Tune stopping or pausing the trial) aborts the Train run and waits for it, so its
  placement group is released before the next trial needs the CPUs. (A function trainable cannot:
  Tune drops its actor without waiting, and the run's placement group outlives it.)
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any

import ray
from ray import tune
from ray.train import UserCallback

from actors.trainer.checkpoint import CheckpointError, CheckpointStore
from actors.trainer.hooks import TrainHooks
from orchestrator.compat import ray_internals
from orchestrator.spec import TrainSpec, apply_overrides, parse_spec
from orchestrator.storage import Storage, StorageError, join

log = logging.getLogger("actors.tune")

POINTER = "pointer.json"
_END = "end"
_ABORT_TIMEOUT_S = 120.0


def trial_root(results_url: str, trial_id: str) -> str:
    return join(results_url, "trials", trial_id)


def trial_checkpoint_url(results_url: str, trial_id: str) -> str:
    return join(trial_root(results_url, trial_id), "checkpoints")


def trial_spec(base: dict, values: dict[str, Any], trial_id: str, results_url: str) -> TrainSpec:
    """The train spec one trial runs: ``base`` (a train spec mapping whose ``name`` is the search's)
    with the sampled ``values`` at their dotted paths, its own name and its own checkpoint URL."""
    fixed = {"name": f"{base['name'][:51]}-{trial_id}",
             "checkpoint.url": trial_checkpoint_url(results_url, trial_id)}
    return parse_spec(apply_overrides(base, {**values, **fixed}))


class ForwardReports(UserCallback):
    """Runs in the Train controller: after every ``ray.train.report`` puts
    ``(rank-0 metrics, newly committed step or None, controller handle on the first call)`` on the
    trial's queue."""

    def __init__(self, queue):
        self.queue = queue
        self.sent_handle = False

    def after_report(self, run_context, metrics, checkpoint):
        step = None
        if checkpoint is not None:  # the train loop's pointer to a committed checkpoint
            with checkpoint.as_directory() as d, open(os.path.join(d, POINTER)) as f:
                step = int(json.load(f)["step"])
        handle = None if self.sent_handle else ray.get_runtime_context().current_actor
        self.sent_handle = True
        self.queue.put((dict(metrics[0]) if metrics else {}, step, handle))


def restore_origin(store: CheckpointStore, pointer: dict | None, trial_id: str) -> dict[str, Any]:
    """Prepare ``store`` for this attempt from the Tune checkpoint's ``pointer``.

    Returns ``{"source": "fresh" | "resume" | "exploit", ...}``; an exploit names the donor trial
    and the step copied. A donor with no committed checkpoint is not cloned (the trial resumes its
    own state with the new values).
    """
    own = {"source": "resume" if store.steps() else "fresh"}
    if pointer is None or pointer["trial_id"] == trial_id:
        return own
    donor = CheckpointStore(pointer["root"], store.storage.options)
    step = pointer.get("step")
    try:
        if step is None:
            raise CheckpointError(f"{pointer['root']}: no committed step when the pointer was taken")
        store.import_step(donor, int(step))
    except (CheckpointError, StorageError) as e:
        # The donor kept training and its retention removed that step: clone its newest one.
        newest = donor.latest_valid(deep=False)
        if newest is None:
            log.warning("[%s] PBT exploit of trial %s skipped: %s", trial_id, pointer["trial_id"], e)
            return own
        log.warning("[%s] donor step %s unusable (%s); cloning its step %d", trial_id, step, e, newest)
        step = newest
        store.import_step(donor, step)
    log.warning("[%s] PBT exploit: continuing from trial %s's checkpoint at step %d",
                trial_id, pointer["trial_id"], step)
    return {"source": "exploit", "donor": pointer["trial_id"], "donor_step": int(step)}


class TrainRunTrial(tune.Trainable):
    """The Tune trainable (bind ``base``, ``paths``, ``results_url``, ``hooks`` (a
    :class:`~actors.trainer.hooks.TrainHooks` for every trial's train loop) with
    ``tune.with_parameters``). ``config`` holds one sampled value per dotted path in ``paths``.

    Each ``step()`` returns one logged report of the train loop (``step``, ``loss``, ``epoch``,
    ``world_size``, ``samples_per_s``, plus ``start_step``: where this attempt started). Raises
    whatever the train run raised.
    """

    def setup(self, config: dict[str, Any], base: dict | None = None, paths: list[str] | None = None,
              results_url: str = "", hooks: TrainHooks | None = None) -> None:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        self.paths = list(paths or [])
        self.values = {p: config[p] for p in self.paths}
        self.results_url = results_url
        self.hooks = hooks
        self.spec = trial_spec(base, self.values, self.trial_id, results_url)
        self.store = CheckpointStore(self.spec.checkpoint.url, self.spec.storage.as_options())
        self.pointer: dict | None = None       # from load_checkpoint (a restore or a PBT exploit)
        self.committed: int | None = None      # newest committed step of this trial's run
        self.start_step = 0
        self.controller = None
        self.thread: threading.Thread | None = None
        self.failure: list[BaseException] = []
        self.last: dict[str, Any] = {}
        self.last_done = False

    def load_checkpoint(self, checkpoint_dir: str) -> None:
        with open(os.path.join(checkpoint_dir, POINTER)) as f:
            self.pointer = json.load(f)

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        with open(os.path.join(checkpoint_dir, POINTER), "w") as f:
            json.dump({"trial_id": self.trial_id, "root": self.store.url, "step": self.committed}, f)

    def _start(self) -> dict[str, Any] | None:
        """Prepare the checkpoint to start from, record the attempt, launch ``fit()``.

        Returns the final result instead when the checkpoint already holds the whole run (it
        finished after Tune stopped listening): nothing is trained again.
        """
        from ray.util.queue import Queue

        from actors.trainer.trainer import build_trainer, finish_run
        origin = restore_origin(self.store, self.pointer, self.trial_id)
        self.committed = self.store.latest_valid(deep=False)
        self.start_step = self.committed or 0
        Storage(trial_root(self.results_url, self.trial_id), self.store.storage.options).write_text(
            f"attempts/{time.time_ns()}.json",
            json.dumps({**origin, "trial_id": self.trial_id, "start_step": self.start_step,
                        "at": time.time(), "values": self.values}))
        if self.spec.max_steps is not None and self.start_step >= self.spec.max_steps:
            state = self.store.load_state(self.committed)
            hist = state.get("history") or [{}]
            self.last_done = True
            st = self.store.storage
            if st.exists("summary.json") and not st.exists("loss.png"):
                finish_run(self.spec)  # the trial that ran it ended before it drew the plot
            return {"step": state["step"], "loss": hist[-1].get("loss", float("nan")),
                    "world_size": state["world_size"], "epoch": state["data"].get("epoch", 0),
                    "start_step": self.start_step, "done": True}
        self.queue = Queue(actor_options={"num_cpus": 0})
        trainer = build_trainer(self.spec, self.hooks,
                                run_name=f"{self.trial_id}-{uuid.uuid4().hex[:6]}",
                                callbacks=[ForwardReports(self.queue)])

        def fit():
            try:
                trainer.fit()
                if self.store.storage.exists("summary.json"):  # the run ended (not aborted):
                    finish_run(self.spec)                      # its loss.png, drawn here
            except BaseException as e:  # noqa: BLE001 - raised from step()
                self.failure.append(e)
            finally:
                self.queue.put(_END)

        self.thread = threading.Thread(target=fit, name=f"fit-{self.trial_id}", daemon=True)
        self.thread.start()
        return None

    def step(self) -> dict[str, Any]:
        if self.thread is None and (finished := self._start()) is not None:
            return finished
        item = self.queue.get()
        if item == _END:
            if self.failure:
                raise self.failure[0]
            self.last_done = True
            return {**self.last, "done": True}
        metrics, committed, handle = item
        self.controller = handle or self.controller
        self.committed = committed if committed is not None else self.committed
        # The report at max_steps is the last logged one: finishing there (not at the loop's
        # closing report) spares schedulers a decision on a trial that has nothing left to do.
        at_end = self.spec.max_steps is not None and metrics.get("step", 0) >= self.spec.max_steps
        done = bool(metrics.pop("done", 0)) or at_end
        self.last_done = done
        self.last = {**metrics, "start_step": self.start_step}
        return {**self.last, "done": True} if done else dict(self.last)

    def cleanup(self) -> None:
        """Stop the Train run and wait for it, so its workers' resources are free on return.

        A run that sent its closing report is let finish (it still writes its summary); one that
        the scheduler stopped early is aborted.
        """
        if self.thread is None:
            return
        if self.last_done:
            self.thread.join(_ABORT_TIMEOUT_S)
        if self.thread.is_alive() and self.controller is not None:
            try:
                ray_internals.abort_train_run(self.controller, _ABORT_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - abort ends the controller actor, failing the call
                pass
        self.thread.join(_ABORT_TIMEOUT_S)
