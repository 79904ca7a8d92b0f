"""``python -m jobs.train SPEC.yaml``: run a train spec as an elastic Ray Train job.

Works in-process on local Ray (starts one if none is running) and under
``ray job submit --working-dir . -- python -m jobs.train SPEC.yaml`` against a cluster. The spec is
validated before Ray is touched: a bad spec exits 2 and takes no resources.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from orchestrator.outcome import EXIT_INVALID_SPEC, EXIT_NOT_RETRYABLE
from orchestrator.spec import SpecError, TrainSpec, load_spec, parse_assignments


TRAIN_OPTIONS_HELP = (
    "a hook for demos and tests (value parsed as YAML; actors/trainer/hooks.py:TrainHooks): "
    "min_step_time_s=S stretches every step to S seconds (pacing; default: the "
    "ORCHESTRATOR_MIN_STEP_TIME_S environment variable); fail_at_step=N makes the last rank's process "
    "exit at step N, once (chaos); hold_file=PATH holds every rank before the step number written in "
    "PATH while the file exists (rank 0 writes PATH.held as 'step world_size'); pid_dir=DIR has each "
    "rank write its pid and its loader actor's (rank-R.pid, loader-R.pid); control_poll_s=S is how "
    "often rank 0 reads the scheduler's requests (default 1). An unknown KEY is an error")


def connect_ray(address: str | None = None):
    """Join the cluster named by ``address`` / ``RAY_ADDRESS``, else start local Ray."""
    import os

    import ray
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        # Workers import the project from this checkout unless `ray job submit --working-dir` did it.
        # (the Jobs API's supervisor sets RAY_JOB_CONFIG_JSON_ENV_VAR with the job's runtime_env,
        # which a driver-side runtime_env would conflict with).
        under_ray_job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or os.environ.get("RAY_JOB_ID")
        runtime_env = None if under_ray_job else {"env_vars": {"PYTHONPATH": root}}
        ray.init(address=addr, runtime_env=runtime_env, log_to_driver=True)
    from orchestrator.dashboards import install_for_ray
    install_for_ray()
    return ray


def parse_job_cli(argv: list[str] | None, module: str, doc: str, spec_type: type,
                  set_example: str, option_help: str):
    """The command line every job entrypoint shares: ``SPEC [--set F=V] [--address A] [--option K=V]``.

    Returns ``(args, spec, hooks)``, ``hooks`` the train loop's
    :class:`~actors.trainer.hooks.TrainHooks` built from the ``--option`` flags; raises SpecError
    (naming the field or flag) for a bad spec, bad assignments, an unknown or mistyped option, or
    a spec of another kind, before Ray is touched.
    """
    from actors.trainer.hooks import TrainHooks
    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc.split("\n")[0])
    p.add_argument("spec", help=f"{spec_type.model_fields['kind'].default} spec YAML (path or URL)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help=f"override a spec field, e.g. --set {set_example} (value parsed as YAML)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help=option_help)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    spec = load_spec(args.spec, parse_assignments(args.set, "--set", args.spec))
    options = parse_assignments(args.option, "--option", args.spec)
    try:
        hooks = TrainHooks.from_options(options)
    except ValueError as e:
        raise SpecError([("--option", str(e))], args.spec) from None
    kind = spec_type.model_fields["kind"].default
    if not isinstance(spec, spec_type):
        raise SpecError([("kind", f"{module} runs {kind} specs, got {spec.kind!r}")], args.spec)
    return args, spec, hooks


def main(argv: list[str] | None = None) -> int:
    try:
        args, spec, hooks = parse_job_cli(
            argv, "jobs.train", __doc__, TrainSpec, "max_steps=20", TRAIN_OPTIONS_HELP)
        from jobs.preflight import preflight
        preflight(spec, args.spec)
    except SpecError as e:
        print(e, file=sys.stderr)
        return EXIT_INVALID_SPEC
    connect_ray(args.address)
    from actors.trainer.failures import setup_failure
    from actors.trainer.trainer import run_train
    try:
        result = run_train(spec, hooks)
    except Exception as e:  # noqa: BLE001 - told apart below, re-raised unless deterministic
        setup = setup_failure(e)
        if setup is None:
            raise
        print(f"error: {setup} (not retried: it would fail the same way)", file=sys.stderr)
        return EXIT_NOT_RETRYABLE
    print(json.dumps({"name": result.name, "final_step": result.final_step,
                      "final_loss": result.losses[-1] if result.losses else None,
                      "world_sizes": result.world_sizes, "checkpoint": result.checkpoint_url}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
