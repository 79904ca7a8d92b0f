"""A stand-in job entrypoint for the scheduler tests: ``python tests/fake_job.py SPEC.json``.

Starts in a fraction of a second (no torch, no Ray), so the tests exercise the scheduler and the
Jobs API rather than training. What it does comes from the spec's ``model.kwargs``:

``log``            file to append ``<name> <submission id> start|end|<event>`` lines to
``wait_for``       run until this file exists
``fail_attempts``  exit ``fail_code`` (default 1) while the attempt number (from the submission id)
                   is below this
``checkpoint``     print ``{"checkpoint": ...}`` last, as real entrypoints do
``honor_control``  for a train spec: answer the scheduler's checkpoint requests (the protocol of
                   ``orchestrator.control``) by writing a step directory and the done record

The submission id is the spec file's name (the scheduler writes ``<spec dir>/<submission id>.json``).
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    path = sys.argv[1]
    sid = os.path.basename(path).removesuffix(".json")
    attempt = int(sid.rsplit("-a", 1)[1]) if "-a" in sid else 0
    with open(path) as f:
        spec = json.load(f)
    kw = spec.get("model", {}).get("kwargs", {}) if "model" in spec else {}
    log = kw.get("log")

    def note(what: str) -> None:
        if log:
            with open(log, "a") as f:
                f.write(f"{spec['name']} {sid} {what}\n")

    note("start")
    up = os.environ.get("ORCHESTRATOR_UPSTREAM_CHECKPOINTS")
    if up:
        note("upstream " + up)
    if attempt < int(kw.get("fail_attempts", 0)):
        note("fail")
        print(f"failing attempt {attempt} on purpose", flush=True)
        return int(kw.get("fail_code", 1))
    ckpt_dir = spec.get("checkpoint", {}).get("url") if kw.get("honor_control") else None
    served = set()
    while kw.get("wait_for") and not os.path.exists(kw["wait_for"]):
        if ckpt_dir:
            req = os.path.join(ckpt_dir, "_control", "checkpoint-request.json")
            if os.path.exists(req):
                with open(req) as f:
                    rid = json.load(f)["id"]
                if rid not in served:
                    served.add(rid)
                    step = 7
                    os.makedirs(os.path.join(ckpt_dir, f"step-{step:08d}"), exist_ok=True)
                    with open(os.path.join(ckpt_dir, f"step-{step:08d}", "MANIFEST.json"), "w") as f:
                        json.dump({"step": step, "committed_at": time.time()}, f)
                    with open(os.path.join(ckpt_dir, "_control", "checkpoint-done.json"), "w") as f:
                        json.dump({"id": rid, "step": step, "at": time.time()}, f)
                    note(f"checkpointed {rid}")
        time.sleep(0.1)
    note("end")
    if kw.get("checkpoint"):
        print(json.dumps({"checkpoint": kw["checkpoint"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
