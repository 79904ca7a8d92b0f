"""``python -m bench.scheduler``: the policy and a FIFO gang baseline on one synthetic trace.

Prints decisions/s, utilization and mean/p95 wait per priority class for both, and the ratios the
issue sets targets for; writes ``bench_out/scheduler.json`` and ``bench_out/scheduler.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from bench.scheduler.sim import CLASSES, SimConfig, cohort_quotas, fifo_decide, simulate, synthetic_trace
from orchestrator.policy import PolicyConfig, decide


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__)
    ap.add_argument("--jobs", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=1_000)
    ap.add_argument("--load", type=float, default=1.05, help="offered load on the busier resource")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tick", type=float, default=30.0, help="simulated seconds between cycles")
    ap.add_argument("--aging-per-hour", type=float, default=PolicyConfig.aging_per_hour)
    ap.add_argument("--min-run", type=float, default=PolicyConfig.min_run_before_preempt_s,
                    help="seconds a job runs before it may be shrunk or preempted")
    ap.add_argument("--cohorts", type=int, default=0, metavar="N",
                    help="give the trace's 8 teams equal guaranteed shares in N cohorts (guarantees, "
                         "borrowing, reclaim, fair share); 0: no quotas (default)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)

    def progress(line: str) -> None:
        print("\r" + line[:150].ljust(150), end="", file=sys.stderr, flush=True)

    trace = synthetic_trace(args.jobs, args.nodes, args.load, args.seed)
    sim = SimConfig(tick_s=args.tick)
    cfg = PolicyConfig(aging_per_hour=args.aging_per_hour, min_run_before_preempt_s=args.min_run)
    quotas = cohort_quotas(trace, args.cohorts) if args.cohorts > 0 else None
    print(f"trace: {len(trace.jobs)} jobs, {len(trace.nodes)} nodes, offered load {args.load}, "
          f"seed {args.seed}, cycle every {args.tick:g} s simulated"
          + (f"; {len(quotas)} teams with equal guarantees in {args.cohorts} cohort(s)" if quotas else ""))
    results = []
    for name, fn in (("policy", decide), ("fifo", fifo_decide)):
        t0 = time.perf_counter()
        r = simulate(trace, fn, name, cfg, sim, progress, quotas)
        print("\r" + " " * 150 + "\r", end="", file=sys.stderr)
        r.wall_s = time.perf_counter() - t0
        results.append(r)
    pol, fifo = results

    rows = []
    hdr = f"{'':10}{'policy':>14}{'fifo':>14}{'policy/fifo':>14}"
    print(hdr)

    def line(label, a, b, fmt="{:.1f}", ratio=True):
        rat = f"{a / b:.3f}" if ratio and b else "-"
        print(f"{label:10}{fmt.format(a):>14}{fmt.format(b):>14}{rat:>14}")
        rows.append((label, a, b))

    line("dec/s", pol.decisions / max(pol.decide_s, 1e-9), fifo.decisions / max(fifo.decide_s, 1e-9), "{:.0f}", False)
    line("cycles/s", pol.cycles / max(pol.decide_s, 1e-9), fifo.cycles / max(fifo.decide_s, 1e-9), "{:.0f}", False)
    line("util", pol.utilization, fifo.utilization, "{:.3f}")
    line("util arr.", pol.util_window, fifo.util_window, "{:.3f}")
    line("util cpu", pol.util_cpu, fifo.util_cpu, "{:.3f}")
    line("util gpu", pol.util_gpu, fifo.util_gpu, "{:.3f}")
    line("goodput", pol.goodput, fifo.goodput, "{:.3f}")
    line("makespan h", pol.makespan / 3600, fifo.makespan / 3600, "{:.1f}")
    for cls in reversed(CLASSES):
        pm, pp = pol.wait_stats(cls)
        fm, fp = fifo.wait_stats(cls)
        line(f"{cls} mean", pm / 60, fm / 60, "{:.1f}m")
        line(f"{cls} p95", pp / 60, fp / 60, "{:.1f}m")
    print(f"preemptions {pol.preemptions}, shrinks {pol.shrinks}, rejected {pol.rejected}/{fifo.rejected}, "
          f"unfinished {pol.unfinished}/{fifo.unfinished}; wall {pol.wall_s:.0f}s + {fifo.wall_s:.0f}s")
    top = CLASSES[-1]
    ratio = pol.wait_stats(top)[1] / max(fifo.wait_stats(top)[1], 1e-9)
    ok_wait, ok_util = ratio < 0.10, pol.utilization >= fifo.utilization
    print(f"target: {top} p95 wait < 10% of FIFO's: {ratio:.1%} {'PASS' if ok_wait else 'FAIL'}; "
          f"utilization >= FIFO's: {pol.utilization:.3f} vs {fifo.utilization:.3f} "
          f"{'PASS' if ok_util else 'FAIL'}")

    os.makedirs(args.out, exist_ok=True)
    summary = {"args": vars(args), "targets": {"top_p95_ratio": ratio, "wait_ok": ok_wait, "util_ok": ok_util}}
    for r in results:
        summary[r.name] = {
            "decisions": r.decisions, "decide_s": r.decide_s, "cycles": r.cycles, "wall_s": r.wall_s,
            "utilization": r.utilization, "util_arrival_window": r.util_window, "util_cpu": r.util_cpu, "util_gpu": r.util_gpu,
            "goodput": r.goodput, "makespan_s": r.makespan, "preemptions": r.preemptions,
            "shrinks": r.shrinks, "rejected": r.rejected, "unfinished": r.unfinished,
            "wait_s": {c: dict(zip(("mean", "p95"), r.wait_stats(c))) for c in CLASSES}}
    with open(os.path.join(args.out, "scheduler.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _plot(results, os.path.join(args.out, "scheduler.png"))
    print(f"wrote {args.out}/scheduler.json and {args.out}/scheduler.png")
    return 0


def _plot(results, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(CLASSES))
    for i, r in enumerate(results):
        p95 = [r.wait_stats(c)[1] / 60 for c in CLASSES]
        mean = [r.wait_stats(c)[0] / 60 for c in CLASSES]
        a.bar(x + i * 0.4 - 0.2, p95, 0.4, label=f"{r.name} p95", alpha=0.8)
        a.scatter(x + i * 0.4 - 0.2, mean, marker="_", s=200, color="k")
        ts = np.array(r.util_series)
        if len(ts):
            b.plot(ts[:, 0] / 3600, (ts[:, 1] + ts[:, 2]) / 2, label=f"{r.name} ({r.utilization:.3f})")
    a.set_xticks(x, CLASSES)
    a.set_ylabel("wait (minutes; bar p95, tick mean)")
    a.set_yscale("symlog")
    a.legend()
    b.set_xlabel("simulated hours")
    b.set_ylabel("allocated share (CPU+GPU)/2")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
