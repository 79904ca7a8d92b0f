"""``python -m jobs.pipeline SPEC.yaml``: run a pipeline's stages in dependency order, in one job.

Each stage runs as ``python -m jobs.<kind>`` on its own spec (a child process joining the same
Ray cluster), handed its upstream stages' checkpoints (see :mod:`orchestrator.pipeline`: a serve
stage serves the checkpoint before it, exported for serving first if it is a training one). A
stage that fails stops every stage downstream of it ("not run: upstream stage 'x' failed"); other
branches go on. Prints one JSON line per stage and a summary; exits 1 if any stage did not succeed.

Under the scheduler (``orchestrator submit`` of a pipeline spec) each stage is instead queued and
gang-scheduled as a job of its own; this entrypoint is for ``ray job submit`` without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile

from orchestrator import pipeline as pipemod
from orchestrator.spec import PipelineSpec, SpecError, load_spec, topo_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = "{python} -m jobs.{kind} {spec}"


def run_stage(name: str, run: pipemod.StageRun, workdir: str, python: str,
              entrypoint: str = ENTRYPOINT) -> tuple[int, str]:
    """Run one stage's commands; returns (exit code, its output) and echoes the output."""
    env = {**os.environ, **run.env}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec_path = os.path.join(workdir, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(run.spec.model_dump(mode="json"), f, indent=1)
    cmds = [[python, *argv[1:]] if argv[0] == "python" else argv for argv in run.before]
    cmds.append(shlex.split(entrypoint.format(python=shlex.quote(python), kind=run.spec.kind,
                                              spec=shlex.quote(spec_path))))
    out: list[str] = []
    for cmd in cmds:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        for line in proc.stdout:
            sys.stdout.write(f"[{name}] {line}")
            out.append(line)
        if proc.wait():
            return proc.returncode, "".join(out)
    return 0, "".join(out)


def run_pipeline(spec: PipelineSpec, python: str = sys.executable,
                 entrypoint: str = ENTRYPOINT) -> dict[str, dict]:
    """Run every stage (dependency order); returns stage name -> {state, reason, checkpoint}."""
    stages = {s.name: s for s in spec.stages}
    state: dict[str, str] = {}
    reason: dict[str, str] = {}
    ckpt: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix=f"{spec.name}-") as tmp:
        for name in topo_order(spec):
            st = stages[name]
            status, why = pipemod.stage_status(st.depends_on, state, reason)
            if status != "ready":
                state[name], reason[name] = "failed", why
            else:
                run = pipemod.prepare_stage(st.spec, {d: ckpt.get(d) for d in st.depends_on},
                                            python=python)
                code, logs = run_stage(name, run, tmp, python, entrypoint)
                if code:
                    state[name], reason[name] = "failed", f"exit code {code}"
                else:
                    state[name], reason[name] = "succeeded", "ok"
                    ckpt[name] = pipemod.stage_checkpoint(run.spec, logs)[0]
            print(json.dumps({"stage": name, "state": state[name], "reason": reason[name],
                              "checkpoint": ckpt.get(name)}), flush=True)
    return {n: {"state": state[n], "reason": reason[n], "checkpoint": ckpt.get(n)} for n in state}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.pipeline", description=__doc__.split("\n")[0])
    p.add_argument("spec", help="pipeline spec YAML (path or URL)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the stages")
    args = p.parse_args(argv)
    try:
        spec = load_spec(args.spec)
        if not isinstance(spec, PipelineSpec):
            raise SpecError([("kind", f"jobs.pipeline runs pipeline specs, got {spec.kind!r}")], args.spec)
        from jobs.preflight import preflight
        preflight(spec, args.spec)
    except SpecError as e:
        print(e, file=sys.stderr)
        return 2
    result = run_pipeline(spec, args.python)
    outcome = pipemod.pipeline_outcome({n: (r["state"], r["reason"]) for n, r in result.items()})
    print(json.dumps({"pipeline": spec.name, "state": outcome[0], "reason": outcome[1],
                      "stages": result}))
    return 0 if outcome[0] == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main())
