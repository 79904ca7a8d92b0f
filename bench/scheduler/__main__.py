"""``python -m bench.scheduler``: the policy and a FIFO gang baseline on one synthetic trace.

Prints decisions/s, utilization and mean/p95 wait per priority class for both, and the ratios the
issue sets targets for; writes ``bench_out/scheduler.json`` and ``bench_out/scheduler.png``.
``--ablation`` also runs the policy with each of its parts switched off in turn on the same trace
and prints (and writes to the JSON) one row per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
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
    ap.add_argument("--limit-error", type=float, nargs=2, default=(1.7, 0.5), metavar=("MEDIAN", "SIGMA"),
                    help="time limits: true run time x log-normal(median, sigma), at least 1x")
    ap.add_argument("--no-limits", action="store_true", help="jobs give no time limits")
    ap.add_argument("--ablation", action="store_true",
                    help="also run the policy with each part switched off in turn")
    ap.add_argument("--probe", action="store_true",
                    help="also sample, while jobs arrive, where capacity goes (bench/scheduler/probe.py)")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args(argv)

    def progress(line: str) -> None:
        print("\r" + line[:150].ljust(150), end="", file=sys.stderr, flush=True)

    trace = synthetic_trace(args.jobs, args.nodes, args.load, args.seed,
                            None if args.no_limits else tuple(args.limit_error))
    sim = SimConfig(tick_s=args.tick)
    cfg = PolicyConfig(aging_per_hour=args.aging_per_hour, min_run_before_preempt_s=args.min_run)
    quotas = cohort_quotas(trace, args.cohorts) if args.cohorts > 0 else None
    print(f"trace: {len(trace.jobs)} jobs, {len(trace.nodes)} nodes, offered load {args.load}, "
          f"seed {args.seed}, cycle every {args.tick:g} s simulated, "
          + ("no time limits" if args.no_limits else
             "time limits = run time x lognormal(median %g, sigma %g), >= 1x" % tuple(args.limit_error))
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
          f"timed out {pol.timeouts}/{fifo.timeouts}, unfinished {pol.unfinished}/{fifo.unfinished}; "
          f"wall {pol.wall_s:.0f}s + {fifo.wall_s:.0f}s")
    targets = _targets(pol, fifo)
    for name, (value, bound, ok) in targets.items():
        print(f"target: {name}: {value:.3f} (bound {bound:g}) {'PASS' if ok else 'FAIL'}")

    os.makedirs(args.out, exist_ok=True)
    summary = {"args": vars(args), "targets": {k: {"value": v, "bound": b, "ok": ok}
                                               for k, (v, b, ok) in targets.items()}}
    for r in results:
        summary[r.name] = _summary(r)
    if args.ablation:
        summary["ablation"] = _ablation(trace, cfg, sim, quotas, fifo, progress)
    if args.probe:
        summary["probe"] = _probe(trace, cfg, sim, quotas)
    with open(os.path.join(args.out, "scheduler.json"), "w") as f:
        json.dump(summary, f, indent=2)
    _plot(results, os.path.join(args.out, "scheduler.png"))
    print(f"wrote {args.out}/scheduler.json and {args.out}/scheduler.png")
    return 0


def _summary(r) -> dict:
    return {"decisions": r.decisions, "decide_s": r.decide_s, "cycles": r.cycles, "wall_s": r.wall_s,
            "utilization": r.utilization, "util_arrival_window": r.util_window, "util_cpu": r.util_cpu,
            "util_gpu": r.util_gpu, "goodput": r.goodput, "makespan_s": r.makespan,
            "preemptions": r.preemptions, "shrinks": r.shrinks, "rejected": r.rejected,
            "timeouts": r.timeouts, "unfinished": r.unfinished,
            "wait_s": {c: dict(zip(("mean", "p95"), r.wait_stats(c))) for c in CLASSES}}


def _targets(pol, fifo) -> dict[str, tuple[float, float, bool]]:
    """The issue's targets: name -> (policy / FIFO ratio, bound, met)."""
    util = pol.util_window / max(fifo.util_window, 1e-9)
    crit = pol.wait_stats("critical")[1] / max(fifo.wait_stats("critical")[1], 1e-9)
    low = pol.wait_stats("low")[1] / max(fifo.wait_stats("low")[1], 1e-9)
    return {"utilization while jobs arrive / FIFO's >= 1.05": (util, 1.05, util >= 1.05),
            "critical p95 wait / FIFO's < 0.10": (crit, 0.10, crit < 0.10),
            "low p95 wait / FIFO's <= 2": (low, 2.0, low <= 2.0)}


# Each part of the policy switched off in turn (PolicyConfig fields; "time limits": jobs give none).
ABLATION = (
    ("all parts", {}),
    ("no preemption", {"preemption": False}),
    ("no head reservation", {"reservation": False}),
    ("whole-node reservation", {"slot_reservation": False}),
    ("no time-limit backfill", {"estimate_start": False}),
    ("no time limits given", None),
    ("GPU nodes not spared", {"spare_gpu_nodes": False}),
    ("no growth", {"grow": False}),
    ("no growth past the head", {"grow_past_head": False}),
    ("elastic jobs start at their largest", {"start_small": False}),
    ("aging 300/h (the previous default)", {"aging_per_hour": 300.0}),
    ("aging 200/h", {"aging_per_hour": 200.0}),
    ("no aging", {"aging_per_hour": 0.0}),
    ("no backfill", {"backfill": False}),
)


def _ablation(trace, cfg, sim, quotas, fifo, progress) -> list[dict]:
    from orchestrator.policy import decide
    rows = []
    print(f"\nablation (policy / FIFO; FIFO: util arr. {fifo.util_window:.3f}, critical p95 "
          f"{fifo.wait_stats('critical')[1] / 60:.1f}m, low p95 {fifo.wait_stats('low')[1] / 60:.1f}m)")
    print(f"{'variant':38}{'util arr.':>10}{'x FIFO':>8}{'util':>7}{'makespan':>10}{'crit p95':>10}"
          f"{'x FIFO':>8}{'low p95':>9}{'x FIFO':>8}{'preempt':>9}{'wall':>6}")
    for name, change in ABLATION:
        if change is None:
            t = dataclasses.replace(trace, jobs=[dataclasses.replace(j, time_limit=None) for j in trace.jobs])
            c = cfg
        else:
            t, c = trace, dataclasses.replace(cfg, **change)
        t0 = time.perf_counter()
        r = simulate(t, decide, name, c, sim, progress, quotas)
        print("\r" + " " * 150 + "\r", end="", file=sys.stderr)
        r.wall_s = time.perf_counter() - t0
        (util, _, _), (crit, _, _), (low, _, _) = _targets(r, fifo).values()
        print(f"{name:38}{r.util_window:>10.3f}{util:>8.3f}{r.utilization:>7.3f}{r.makespan / 3600:>9.1f}h"
              f"{r.wait_stats('critical')[1] / 60:>9.1f}m{crit:>8.3f}{r.wait_stats('low')[1] / 60:>8.1f}m"
              f"{low:>8.2f}{r.preemptions:>9}{r.wall_s:>5.0f}s", flush=True)
        rows.append({"variant": name, "config": change, **_summary(r),
                     "ratios": {"util_arrival": util, "critical_p95": crit, "low_p95": low}})
    return rows


def _probe(trace, cfg, sim, quotas) -> dict:
    from bench.scheduler.probe import ProbeSimulator
    out = {}
    print("\nprobe (time averages while jobs arrive; shares of all CPUs or GPUs):")
    for name, fn in (("policy", decide), ("fifo", fifo_decide)):
        p = ProbeSimulator(trace, fn, name, cfg, sim, None, quotas)
        p.run()
        out[name] = r = p.report()
        print(f"  {name:6} " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()), flush=True)
    return out


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
