"""``python -m jobs.tune SPEC.yaml``: a Ray Tune search over elastic DeepSpeed ZeRO trainers.

Every trial is a whole train job (:mod:`actors.tune.trial`): the spec's ``trial`` with the sampled
fields set, training with the same loop, data loader and checkpoint format as ``jobs.train``. ASHA
stops weak trials early; PBT copies a strong trial's checkpoint into a weak one and perturbs its
hyperparameters. Scheduler times (``grace_period``, ``perturbation_interval``) count global steps.
As many trials run at once as the cluster's free CPUs (and GPUs) hold, one trial needing
``max workers x cpus_per_worker``; ``max_concurrent_trials`` caps it.

Running the same command again after the driver died resumes the search (``Tuner.restore``):
finished trials are kept as they are, unfinished ones continue from their newest committed
checkpoint. At the end the best trial's checkpoint is consolidated into a served checkpoint
(``jobs.serve`` deploys it), next to a results table and every trial's learning curve.

Layout under ``results_url``::

    spec.json                      the resolved tune spec (a rerun must match it)
    tune/                          the Ray Tune experiment (trial states, progress, pointer checkpoints)
    trials/<trial_id>/checkpoints/ each trial's checkpoints, in the train job's format
    trials/<trial_id>/attempts/    one record per start: fresh, resume, or PBT exploit (donor, step)
    results.csv                    one row per trial: sampled values, status, step, loss, best loss
    learning_curves.png            every trial's loss against global step
    best/                          the best trial's consolidated fp32 weights (model.pt, model.json)
    best.json                      which trial, step and checkpoint ``best/`` came from
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

from actors.trainer.hooks import TrainHooks
from orchestrator.batch import BatchPlan
from orchestrator.spec import Domain, SpecError, TuneSpec, with_overrides
from orchestrator.storage import Storage, resolve

log = logging.getLogger("jobs.tune")

# Set per trial by the tune job, so not searchable.
RESERVED_PATHS = ("kind", "name", "checkpoint.url")
# What every trial reports to Tune (the train loop's logged metrics plus the attempt's start step).
REPORTED_METRICS = ("loss", "step", "epoch", "world_size", "samples_per_s", "start_step")
# PBT moves checkpoints between trials: these must be the same in every trial.
PBT_FIXED_SECTIONS = ("model", "dataset", "loss")
_MAX_COMBINATIONS_CHECKED = 512
TRIAL_DRIVER_MEMORY = 256 * 2**20
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(_|$)")


# ---------------------------------------------------------------------------------------------
# checks (before Ray starts)
# ---------------------------------------------------------------------------------------------
def _probe_values(d: Domain) -> list[Any]:
    """Values that bound what a domain can produce: all of a discrete one, the ends of a range."""
    if d.type in ("choice", "grid"):
        return list(d.values)
    if d.type == "randint":
        return [int(d.low), int(d.high) - 1]   # tune.randint excludes high
    return [d.low, d.high]


def _trial_problem(spec: TuneSpec, values: dict[str, Any]) -> str | None:
    try:
        with_overrides(spec.trial, values)
    except SpecError as e:
        return "; ".join(f"trial.{p}: {r}" if p else r for p, r in e.errors)
    return None


def check_tune_spec(spec: TuneSpec) -> None:
    """Check what the spec model cannot: every value the search can produce makes a valid trial
    spec, searched fields may be searched (PBT: not the model or data), the metric is reported.

    Raises SpecError listing ``(field path, reason)`` for every problem.
    """
    errors: list[tuple[str, str]] = []
    pbt = spec.scheduler.type == "pbt"
    ok_paths = []
    for path, d in spec.search_space.items():
        where = f"search_space.{path}"
        if any(path == r or r.startswith(path + ".") for r in RESERVED_PATHS):
            errors.append((where, "set per trial by the tune job; it cannot be searched"))
            continue
        if pbt and path.split(".")[0] in PBT_FIXED_SECTIONS:
            errors.append((where, "PBT copies checkpoints between trials, so every trial must train "
                                  "the same model on the same data; search this with asha or fifo"))
            continue
        if d.type == "randint" and not (float(d.low).is_integer() and float(d.high).is_integer()):
            errors.append((where, f"randint needs integer low and high, got {d.low} and {d.high}"))
            continue
        bad = [(v, p) for v in _probe_values(d) if (p := _trial_problem(spec, {path: v}))]
        if bad:
            v, problem = bad[0]
            errors.append((where, f"value {v!r} makes an invalid trial: {problem}"))
            continue
        ok_paths.append(path)
    if len(ok_paths) > 1:
        choices = [[(p, v) for v in _probe_values(spec.search_space[p])] for p in ok_paths]
        if math.prod(len(c) for c in choices) <= _MAX_COMBINATIONS_CHECKED:
            for combo in itertools.product(*choices):
                problem = _trial_problem(spec, dict(combo))
                if problem:
                    errors.append(("search_space", f"the combination {dict(combo)} makes an invalid "
                                                   f"trial: {problem}"))
                    break
    if spec.scheduler.metric not in REPORTED_METRICS:
        errors.append(("scheduler.metric", f"trials report {', '.join(REPORTED_METRICS)}; "
                                           f"got {spec.scheduler.metric!r}"))
    if errors:
        raise SpecError(errors)


# ---------------------------------------------------------------------------------------------
# search space, scheduler, concurrency
# ---------------------------------------------------------------------------------------------
def tune_domain(d: Domain):
    """The Ray Tune sampler for a spec domain."""
    from ray import tune
    if d.type == "choice":
        return tune.choice(list(d.values))
    if d.type == "grid":
        return tune.grid_search(list(d.values))
    if d.type == "uniform":
        return tune.uniform(d.low, d.high)
    if d.type == "loguniform":
        return tune.loguniform(d.low, d.high)
    return tune.randint(int(d.low), int(d.high))


def build_scheduler(spec: TuneSpec):
    """ASHA, synchronous PBT (mutating every searched field) or None for FIFO; time is the global
    ``step``."""
    from ray.tune.schedulers import ASHAScheduler, PopulationBasedTraining
    s = spec.scheduler
    if s.type == "asha":
        return ASHAScheduler(time_attr="step", max_t=max_trial_steps(spec) or 10**9,
                             grace_period=s.grace_period, reduction_factor=s.reduction_factor)
    if s.type == "pbt":
        mutations = {p: list(d.values) if d.type in ("choice", "grid") else tune_domain(d)
                     for p, d in spec.search_space.items()}
        # Synchronous: elastic trials run at different speeds, so compare them at the same step.
        return PopulationBasedTraining(time_attr="step", perturbation_interval=s.perturbation_interval,
                                       hyperparam_mutations=mutations, synch=True)
    return None


def max_trial_steps(spec: TuneSpec) -> int | None:
    """The most steps any trial trains (``max_steps`` may be searched); None for epoch budgets."""
    steps = [spec.trial.max_steps]
    if "max_steps" in spec.search_space:
        steps = [int(v) for v in _probe_values(spec.search_space["max_steps"])]
    return None if None in steps else max(steps)


def trial_concurrency(spec: TuneSpec, free: dict[str, float]) -> int:
    """Trials that fit at once in ``free`` resources (``ray.available_resources()``): free CPUs
    (and GPUs) over one trial's gang at its largest size; at least 1, at most max_concurrent_trials."""
    r = spec.trial.resources
    workers = BatchPlan.of(spec.trial).max_allowed
    n = int((free.get("CPU", 0.0) + 1e-6) // (workers * r.cpus_per_worker))
    if r.gpus_per_worker:
        n = min(n, int((free.get("GPU", 0.0) + 1e-6) // (workers * r.gpus_per_worker)))
    n = max(1, n)
    return min(n, spec.max_concurrent_trials) if spec.max_concurrent_trials else n


def trial_base(spec: TuneSpec) -> dict:
    """The mapping every trial spec starts from: the spec's trial, named after the search, with local
    paths absolute and the search's storage options where the trial has none. The storage URLs are
    absolute already (resolved when the spec was validated); the node-local ``cache_dir`` is made so
    here, as trials and Train workers run in other working directories."""
    base = spec.trial.model_dump(mode="json")
    base["name"] = spec.name
    storage = spec.trial.storage if spec.trial.storage.as_options() else spec.storage
    base["storage"] = storage.model_dump(mode="json")
    if base["dataset"]["cache_dir"] is not None:
        base["dataset"]["cache_dir"] = resolve(base["dataset"]["cache_dir"])
    return base


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------
@dataclass
class TrialSummary:
    """One trial's outcome. ``status``: done (reached the end), stopped (by the scheduler), error."""
    trial_id: str
    status: str
    values: dict[str, Any]
    step: int | None
    loss: float | None
    best_loss: float | None
    checkpoint_url: str | None            # the trial's newest committed checkpoint
    metrics: dict[str, float] = field(default_factory=dict)          # its last report
    history: list[tuple[int, float]] = field(default_factory=list)   # (step, loss)
    error: str | None = None


@dataclass
class TuneResult:
    name: str
    results_url: str
    experiment_url: str
    resumed: bool
    trials: list[TrialSummary]
    best: TrialSummary | None
    served_url: str | None                # the best trial's served checkpoint (jobs.serve loads it)
    table_url: str
    plot_url: str
    table: str = ""

    def summary(self) -> dict[str, Any]:
        best = asdict(self.best) if self.best else None
        if best:
            best.pop("history")
        return {"name": self.name, "resumed": self.resumed, "trials": len(self.trials),
                "best": best, "served": self.served_url, "table": self.table_url, "plot": self.plot_url}


def _summaries(spec: TuneSpec, grid, results: Storage) -> list[TrialSummary]:
    from actors.trainer.checkpoint import CheckpointStore
    from actors.tune.trial import trial_checkpoint_url
    out = []
    for r in grid:
        last = r.metrics or {}
        trial_id = last.get("trial_id") or _TRIAL_ID.search(os.path.basename(r.path)).group(1)
        store = CheckpointStore(trial_checkpoint_url(results.root, trial_id), results.options)
        newest = store.latest_valid(deep=False)
        # The curve: every step in the newest checkpoint (it spans restarts and PBT exploits), then
        # the steps reported after it.
        hist = []
        if newest is not None:
            hist = [(int(h["step"]), float(h["loss"])) for h in store.load_state(newest).get("history", [])]
        df = r.metrics_dataframe
        if df is not None and len(df) and {"step", "loss"} <= set(df.columns):
            after = hist[-1][0] if hist else 0
            hist += [(int(s), float(v)) for s, v in zip(df["step"], df["loss"]) if v == v and s > after]
        step = last.get("step")
        values = {p: r.config.get(p) for p in spec.search_space}
        try:
            budget = with_overrides(spec.trial, values).max_steps
        except SpecError:   # an errored trial may lack its values
            budget = spec.trial.max_steps
        if r.error is not None:
            status = "error"
        elif step is not None and budget is not None and step < budget:
            status = "stopped"
        else:
            status = "done"
        out.append(TrialSummary(
            trial_id=trial_id, status=status, values=values,
            step=step, loss=last.get("loss"), best_loss=min((v for _, v in hist), default=None),
            checkpoint_url=store.storage.url(f"step-{newest:08d}") if newest is not None else None,
            metrics={k: last[k] for k in REPORTED_METRICS if k in last},
            history=hist, error=None if r.error is None else str(r.error).splitlines()[0][:300]))
    return sorted(out, key=lambda t: t.trial_id)


def _pick_best(spec: TuneSpec, trials: list[TrialSummary]) -> TrialSummary | None:
    """The trial with the best last reported metric among those with a committed checkpoint."""
    metric, sign = spec.scheduler.metric, 1 if spec.scheduler.mode == "min" else -1
    scored = []
    for t in trials:
        v = t.metrics.get(metric)
        if v is not None and t.checkpoint_url and v == v:
            scored.append((sign * v, t.trial_id, t))
    return min(scored)[2] if scored else None


def results_table(spec: TuneSpec, trials: list[TrialSummary], best: TrialSummary | None):
    """A DataFrame: one row per trial, the best one marked ``*``."""
    import pandas as pd
    rows = []
    for t in trials:
        row = {"best": "*" if best is not None and t.trial_id == best.trial_id else "",
               "trial_id": t.trial_id, "status": t.status}
        row.update(t.values)
        row.update({"step": t.step, "loss": t.loss, "best_loss": t.best_loss,
                    "checkpoint": t.checkpoint_url or ""})
        rows.append(row)
    return pd.DataFrame(rows)


def plot_learning_curves(trials: list[TrialSummary], best: TrialSummary | None, path: str,
                         title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for t in trials:
        if not t.history:
            continue
        is_best = best is not None and t.trial_id == best.trial_id
        label = t.trial_id + " " + ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float)
                                             else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in t.values.items())
        ax.plot([s for s, _ in t.history], [v for _, v in t.history], marker=".", ms=3,
                lw=2.2 if is_best else 1.0, label=label + (" (best)" if is_best else ""))
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    if any(t.history for t in trials):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _publish(spec: TuneSpec, results: Storage, trials: list[TrialSummary], best: TrialSummary | None
             ) -> tuple[str | None, str]:
    """Export the best checkpoint for serving; write results.csv, best.json, learning_curves.png."""
    from actors.trainer.export import export
    served = None
    if best is not None:
        report = export(best.checkpoint_url, results.url("best"), results.options)
        served = results.url("best")
        results.write_text("best.json", json.dumps(
            {"trial_id": best.trial_id, "values": best.values, "loss": best.loss, "step": best.step,
             "checkpoint": best.checkpoint_url, "served": served, "export": report}, indent=1))
    df = results_table(spec, trials, best)
    results.write_text("results.csv", df.to_csv(index=False))
    with tempfile.TemporaryDirectory() as tmp:
        png = os.path.join(tmp, "learning_curves.png")
        plot_learning_curves(trials, best, png, f"{spec.name}: {spec.scheduler.type} over "
                                                f"{', '.join(spec.search_space)}")
        results.write_from_file("learning_curves.png", png)
    return served, df.to_string(index=False, max_colwidth=60)


# ---------------------------------------------------------------------------------------------
# the search
# ---------------------------------------------------------------------------------------------
def _check_same_search(spec: TuneSpec, results: Storage) -> None:
    """A rerun resumes the search stored at results_url only if it is the same search."""
    mine = spec.model_dump(mode="json")
    mine.pop("max_concurrent_trials", None)
    if results.exists("spec.json"):
        stored = json.loads(results.read_text("spec.json"))
        stored.pop("max_concurrent_trials", None)
        if stored != mine:
            diff = sorted(k for k in set(stored) | set(mine) if stored.get(k) != mine.get(k))
            raise SpecError([("results_url", f"{results.root} holds a different search (differs in "
                                             f"{', '.join(diff)}); use another results_url")])
    else:
        results.write_text("spec.json", json.dumps(spec.model_dump(mode="json"), indent=1))


def run_tune(spec: TuneSpec, hooks: TrainHooks | None = None,
             address: str | None = None) -> TuneResult:
    """Run (or resume) ``spec``'s search and publish its results; returns them.

    Uses the connected Ray cluster, else joins ``address`` / ``RAY_ADDRESS``, else starts local Ray.
    ``hooks`` go to every trial's train loop (as ``run_train``'s do). Raises SpecError before
    Ray is touched when the spec cannot run, or when results_url holds a different search.
    """
    check_tune_spec(spec)
    results = Storage(spec.results_url, spec.storage.as_options())
    _check_same_search(spec, results)

    import ray
    from ray import tune

    from actors.tune.trial import TrainRunTrial
    from jobs.train import connect_ray
    if not ray.is_initialized():
        connect_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(TrainRunTrial, base=trial_base(spec), paths=list(spec.search_space),
                             results_url=results.root, hooks=hooks),
        # The trial only drives its Train run: the workers hold the CPUs. Tune needs some
        # resource to place it by, so it reserves memory.
        {"memory": TRIAL_DRIVER_MEMORY})
    fs, exp_path = results.pyarrow_filesystem(), results.pyarrow_path("tune")
    resumed = tune.Tuner.can_restore(exp_path, storage_filesystem=fs)
    if resumed:
        log.warning("[%s] resuming the search at %s", spec.name, results.url("tune"))
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        concurrency = trial_concurrency(spec, ray.available_resources())
        log.warning("[%s] %s search over %s: up to %d trials at once", spec.name,
                    spec.scheduler.type, ", ".join(spec.search_space), concurrency)
        tuner = tune.Tuner(
            trainable,
            param_space={p: tune_domain(d) for p, d in spec.search_space.items()},
            tune_config=tune.TuneConfig(
                metric=spec.scheduler.metric, mode=spec.scheduler.mode,
                scheduler=build_scheduler(spec), num_samples=spec.num_samples,
                max_concurrent_trials=concurrency, reuse_actors=False),
            run_config=tune.RunConfig(
                name="tune", storage_path=results.pyarrow_path(), storage_filesystem=fs,
                # Tune checkpoints are pointers (taken when PBT asks): cheap, so all are kept.
                checkpoint_config=tune.CheckpointConfig(num_to_keep=None)))
    grid = tuner.fit()
    trials = _summaries(spec, grid, results)
    best = _pick_best(spec, trials)
    served, table = _publish(spec, results, trials, best)
    return TuneResult(name=spec.name, results_url=results.root, experiment_url=results.url("tune"),
                      resumed=resumed, trials=trials, best=best, served_url=served,
                      table_url=results.url("results.csv"), plot_url=results.url("learning_curves.png"),
                      table=table)


def main(argv: list[str] | None = None) -> int:
    from jobs.train import TRAIN_OPTIONS_HELP, parse_job_cli
    try:
        args, spec, hooks = parse_job_cli(
            argv, "jobs.tune", __doc__, TuneSpec, "num_samples=8", "every trial's: " + TRAIN_OPTIONS_HELP)
        from jobs.preflight import preflight
        preflight(spec, args.spec)
        result = run_tune(spec, hooks, address=args.address)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    print(result.table)
    print(json.dumps(result.summary(), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
