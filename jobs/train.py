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

from orchestrator.spec import SpecError, TrainSpec, load_spec, parse_assignments


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
    return ray


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="train spec YAML (path or URL)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a spec field, e.g. --set max_steps=20 (value parsed as YAML)")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="a train-loop option, e.g. --option min_step_time_s=0.05 (pacing for demos "
                        "and tests; value parsed as YAML)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        spec = load_spec(args.spec, parse_assignments(args.set, "--set", args.spec))
        options = parse_assignments(args.option, "--option", args.spec)
        if not isinstance(spec, TrainSpec):
            raise SpecError([("kind", f"jobs.train runs train specs, got {spec.kind!r}")], args.spec)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    connect_ray(args.address)
    from actors.trainer.trainer import run_train
    result = run_train(spec, options)
    print(json.dumps({"name": result.name, "final_step": result.final_step,
                      "final_loss": result.losses[-1] if result.losses else None,
                      "world_sizes": result.world_sizes, "checkpoint": result.checkpoint_url}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
