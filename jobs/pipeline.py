"""``python -m jobs.pipeline SPEC.yaml``: run a pipeline's stages in dependency order, in one job.

Each stage runs as ``python -m jobs.<kind>`` on its own spec (a child process joining the same
Ray cluster), handed its upstream stages' checkpoints (see :mod:`orchestrator.pipeline`: a serve
stage serves the checkpoint before it, exported for serving first if it is a training one). A
stage that fails stops every stage downstream of it ("not run: upstream stage 'x' failed"); other
branches go on. Prints one JSON line per stage and a summary; exits 1 if any stage did not succeed.

Stopped by SIGTERM (``ray job stop``) or SIGINT, it passes the signal on to the running stage (a
serve stage deletes its Serve application, see :mod:`jobs.serve`), waits for that stage to end,
starts no other, and exits :func:`orchestrator.outcome.stopped_exit_code`. Ray's job stop signals
every process of the job at once and SIGKILLs them after ``RAY_JOB_STOP_WAIT_TIME_S`` (default
3 s): give a pipeline with a serve stage more, e.g. ``ray job submit --runtime-env-json
'{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "30"}}'``.

Under the scheduler (``orchestrator submit`` of a pipeline spec) each stage is instead queued and
gang-scheduled as a job of its own; this entrypoint is for ``ray job submit`` without it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading

from orchestrator import pipeline as pipemod
from orchestrator.outcome import stopped_exit_code
from orchestrator.spec import PipelineSpec, SpecError, load_spec, topo_order

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = "{python} -m jobs.{kind} {spec}"


class PipelineStop:
    """While entered, SIGINT and SIGTERM stop the pipeline: the first is passed on to the running
    stage's process (once: a stage that Ray signalled too sees it twice at most) and ``signum``
    is set, so no further command starts. The previous handlers come back on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._child: subprocess.Popen | None = None
        self._saved: dict = {}

    def __enter__(self) -> PipelineStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._saved[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._saved.items():
            signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._forward()

    def attach(self, child: subprocess.Popen | None) -> None:
        """The stage process now running (None: none); one started after the signal gets it."""
        self._child = child
        if child is not None and self.signum is not None:
            self._forward()

    def _forward(self) -> None:
        child = self._child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(self.signum)
            except ProcessLookupError:
                pass


def run_stage(name: str, run: pipemod.StageRun, workdir: str, python: str,
              entrypoint: str = ENTRYPOINT, stop: PipelineStop | None = None) -> tuple[int, str]:
    """Run one stage's commands; returns (exit code, its output) and echoes the output. After a
    stop signal (``stop.signum``) no further command starts."""
    env = {**os.environ, **run.env}
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    spec_path = os.path.join(workdir, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(run.spec.model_dump(mode="json"), f, indent=1)
    cmds = [[python, *argv[1:]] if argv[0] == "python" else argv for argv in run.before]
    cmds.append(shlex.split(entrypoint.format(python=shlex.quote(python), kind=run.spec.kind,
                                              spec=shlex.quote(spec_path))))
    out: list[str] = []
    stop = stop or PipelineStop()
    for cmd in cmds:
        if stop.signum is not None:
            return stopped_exit_code(stop.signum), "".join(out)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
        stop.attach(proc)
        try:
            for line in proc.stdout:
                sys.stdout.write(f"[{name}] {line}")
                out.append(line)
            code = proc.wait()
        finally:
            stop.attach(None)
        if code:
            return code, "".join(out)
    return 0, "".join(out)


def run_pipeline(spec: PipelineSpec, python: str = sys.executable, entrypoint: str = ENTRYPOINT,
                 stop: PipelineStop | None = None) -> dict[str, dict]:
    """Run every stage (dependency order); returns stage name -> {state, reason, checkpoint}.
    After a stop signal (``stop``) the running stage and those not started are ``cancelled``."""
    stop = stop or PipelineStop()
    stages = {s.name: s for s in spec.stages}
    state: dict[str, str] = {}
    reason: dict[str, str] = {}
    ckpt: dict[str, str | None] = {}
    with tempfile.TemporaryDirectory(prefix=f"{spec.name}-") as tmp:
        for name in topo_order(spec):
            st = stages[name]
            status, why = pipemod.stage_status(st.depends_on, state, reason)
            if stop.signum is not None:
                state[name], reason[name] = "cancelled", f"not run: pipeline stopped by {_name(stop.signum)}"
            elif status != "ready":
                state[name], reason[name] = "failed", why
            else:
                run = pipemod.prepare_stage(st.spec, {d: ckpt.get(d) for d in st.depends_on},
                                            python=python)
                code, logs = run_stage(name, run, tmp, python, entrypoint, stop)
                if code and stop.signum is not None:
                    state[name], reason[name] = "cancelled", (f"stopped by {_name(stop.signum)} "
                                                              f"(exit code {code})")
                elif code:
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
    with PipelineStop() as stop:
        result = run_pipeline(spec, args.python, stop=stop)
        outcome = pipemod.pipeline_outcome({n: (r["state"], r["reason"]) for n, r in result.items()})
        try:
            print(json.dumps({"pipeline": spec.name, "state": outcome[0], "reason": outcome[1],
                              "stages": result}), flush=True)
        except OSError:  # stopped: whoever read the output may be gone
            pass
    if stop.signum is not None:
        return stopped_exit_code(stop.signum)
    return 0 if outcome[0] == "succeeded" else 1


def _name(signum: int) -> str:
    return signal.Signals(signum).name


if __name__ == "__main__":
    sys.exit(main())
