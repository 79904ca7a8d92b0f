"""``orchestrator submit | status | queue | cancel | logs | scheduler``: jobs from the command line.

Every command takes ``--store`` (default ``$ORCHESTRATOR_STORE`` or ``~/.orchestrator/jobs.db``;
a path or any SQLAlchemy URL). ``--address`` (default ``$RAY_ADDRESS``) names the Ray cluster for
``logs`` and ``scheduler``, as for ``ray job``: a dashboard ``http://host:8265`` or a GCS
``host:6379``. Ray token auth comes from the environment exactly as for Ray's own CLI
(``RAY_AUTH_MODE=token``, token in ``~/.ray/auth_token`` or ``RAY_AUTH_TOKEN``).

``submit``, ``status``, ``queue`` and ``cancel`` touch only the store (so ``ray job submit --
orchestrator submit SPEC`` works from anywhere the store is reachable); the ``scheduler`` service
turns store state into Ray jobs and back. It waits out Ray outages of any length (its Ray driver
is a child process it starts again: ``ray_adapter.RayLink``); ``scheduler --once`` fails fast.
Exit status: 0 ok, 1 a store or Ray error (unknown job, illegal transition, store or cluster
unavailable), 2 an invalid spec or argument.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from orchestrator import spec as specmod
from orchestrator import store as storemod
from orchestrator.policy import ClusterState, JobView, Node, fits_empty_cluster


def register(sub) -> None:
    p = sub.add_parser("submit", help="validate a job spec and queue it")
    p.add_argument("spec", help="path or URL of a YAML job spec")
    p.add_argument("--cluster", metavar="NxCPU[:GPU],...",
                   help="the cluster's nodes (e.g. '4x8,2x16:2'); a spec whose gang can never fit "
                        "them is rejected instead of queued")
    _common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="one job: state, workers, checkpoint and its history")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true", help="print the record as JSON")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("queue", help="table of jobs waiting or running, and why each waits "
                                     "(--all: every job)")
    p.add_argument("--all", action="store_true", help="include finished jobs")
    p.add_argument("--state", action="append", choices=storemod.STATES, help="only these states")
    _common(p)
    p.set_defaults(func=cmd_queue)

    p = sub.add_parser("cancel", help="cancel a job (a pipeline: its unfinished stages too)")
    p.add_argument("job_id")
    p.add_argument("--reason", default="cancelled by user")
    _common(p)
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("logs", help="a job's logs from the Ray Jobs API")
    p.add_argument("job_id")
    p.add_argument("--attempt", type=int, default=None, help="an earlier attempt (default: latest)")
    _common(p)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("scheduler", help="run the scheduler service: admit, launch, watch, retry, "
                                         "preempt (Ctrl-C or SIGTERM stops it; jobs keep running)")
    p.add_argument("--once", action="store_true", help="run a single scheduling tick and exit")
    p.add_argument("--tick", type=float, default=2.0, metavar="S", help="seconds between ticks")
    p.add_argument("--lease-ttl", type=float, default=15.0, metavar="S",
                   help="high availability: schedulers on one store elect one active by a lease in "
                        "the store, renewed every tick; a standby takes over once it has not been "
                        "renewed for S seconds (default 15; at least twice --tick)")
    p.add_argument("--id", default=None, metavar="NAME",
                   help="this scheduler's name in the lease (default: host:pid:random)")
    p.add_argument("--quota", action="append", default=[], metavar="TEAM=CPUS[:GPUS]",
                   help="DEPRECATED, use `orchestrator quota set TEAM --cpus 0:CPUS [--gpus 0:GPUS]`: "
                        "the most a team may hold at once (repeatable). Written to the store at "
                        "start, only for a team the store has no quota for (a stored quota wins "
                        "and is left as it is); the store is what the scheduler reads every tick")
    p.add_argument("--autoscale-node", action="append", default=[], metavar="CPUS[:GPUS]",
                   help="a node type the autoscaler can add (repeatable); without any, a gang "
                        "larger than the current cluster is rejected")
    p.add_argument("--min-run-before-preempt", type=float, default=None, metavar="S",
                   help="a job runs this long before it may be shrunk or preempted (default 1800)")
    p.add_argument("--retry-backoff", type=float, default=10.0, metavar="S",
                   help="first retry delay of a failed job; doubles per retry (max 600)")
    p.add_argument("--checkpoint-timeout", type=float, default=120.0, metavar="S",
                   help="how long a preempted train job may take to checkpoint before it is stopped")
    p.add_argument("--admission-timeout", type=float, default=600.0, metavar="S",
                   help="how long Ray may take to place an admitted gang before it is requeued")
    p.add_argument("--python", default=sys.executable,
                   help="the cluster's Python interpreter for job entrypoints (default: this one)")
    p.add_argument("--workdir", default=os.getcwd(),
                   help="directory jobs start in, for relative paths in specs (default: cwd)")
    p.add_argument("--working-dir", default=None, metavar="DIR",
                   help="upload DIR as the jobs' runtime_env working_dir (remote clusters) "
                        "instead of using this checkout in place")
    p.add_argument("--spec-dir", default=os.environ.get("ORCHESTRATOR_SPEC_DIR", "~/.orchestrator/specs"),
                   help="URL where each attempt's resolved spec is written; jobs read it from "
                        "there, so remote clusters need shared storage (s3://...)")
    p.add_argument("--entrypoint", default="{python} -m jobs.{kind} {spec}",
                   help="entrypoint template ({python}, {kind}, {spec})")
    p.add_argument("--reconnect-max", type=float, default=30.0, metavar="S",
                   help="while Ray (or the store) is unreachable, retry after the tick, doubling "
                        "up to S seconds; the scheduler waits out outages of any length")
    p.add_argument("--health-file", default=None, metavar="PATH",
                   help="touch PATH after every tick (failed ones too): a liveness probe checks "
                        "its age (cluster/orchestrator-scheduler.k8s.yaml)")
    _common(p)
    p.set_defaults(func=cmd_scheduler)


def _common(p) -> None:
    p.add_argument("--store", default=os.environ.get("ORCHESTRATOR_STORE", storemod.DEFAULT_URL),
                   help="job store path or SQLAlchemy URL (env ORCHESTRATOR_STORE)")
    p.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster address, as for `ray job` (env RAY_ADDRESS)")


def _fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def parse_cluster(text: str) -> ClusterState:
    """``'4x8,2x16:2'`` -> 4 nodes of 8 CPUs and 2 nodes of 16 CPUs + 2 GPUs."""
    nodes = []
    for part in text.split(","):
        m = re.fullmatch(r"\s*(\d+)x(\d+(?:\.\d+)?)(?::(\d+(?:\.\d+)?))?\s*", part)
        if not m:
            raise ValueError(f"--cluster: {part!r} is not COUNTxCPUS[:GPUS] (e.g. 4x8 or 2x16:2)")
        for _ in range(int(m[1])):
            nodes.append(Node(f"n{len(nodes)}", float(m[2]), float(m[3] or 0)))
    return ClusterState.of(nodes)


def _never_fits(spec, cluster: ClusterState) -> list[str]:
    """Reasons any job the spec creates can never run on ``cluster`` (empty: all can)."""
    parts = [(st.name, st.spec) for st in spec.stages] if isinstance(spec, specmod.PipelineSpec) \
        else [(None, spec)]
    out = []
    for stage, s in parts:
        lo, hi, c, g = storemod.demand(s)
        why = fits_empty_cluster(JobView(s.name, 0, min_workers=lo, max_workers=hi, cpus_per_worker=c,
                                         gpus_per_worker=g, allowed=storemod.allowed_workers(s)),
                                 cluster)
        if why:
            out.append(f"stage {stage}: {why}" if stage else why)
    return out


def cmd_submit(args) -> int:
    from jobs.preflight import preflight
    try:
        spec = specmod.load_spec(args.spec)
        preflight(spec, args.spec)
    except specmod.SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    if args.cluster:
        try:
            cluster = parse_cluster(args.cluster)
        except ValueError as e:
            return _fail(str(e), 2)
        reasons = _never_fits(spec, cluster)
        if reasons:
            return _fail(f"{args.spec}: rejected, it can never fit the cluster: " + "; ".join(reasons), 2)
    try:
        st = storemod.JobStore(args.store)
        job_id = st.submit(spec)
        stages = st.list(parent_id=job_id)
    except storemod.StoreError as e:
        return _fail(str(e))
    print(job_id)
    for s in stages:
        print(f"  stage {s.stage}: {s.id}")
    return 0


def _age(t: float | None) -> str:
    if t is None:
        return "-"
    s = max(0, int(time.time() - t))
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h"


def cmd_status(args) -> int:
    try:
        job = storemod.JobStore(args.store).get(args.job_id, history=True)
    except storemod.StoreError as e:
        return _fail(str(e))
    if args.json:
        d = {k: v for k, v in job.__dict__.items() if k != "history"}
        d["history"] = [t.__dict__ for t in job.history]
        print(json.dumps(d, indent=2, default=str))
        return 0
    print(f"{job.id}  {job.kind}  {job.state}  ({job.reason})")
    if job.wait_reason:
        print(f"  waiting for: {job.wait_reason} since {_when(job.wait_since)} ({_age(job.wait_since)}): "
              f"{job.wait_detail}")
    print(f"  team {job.team}, priority {job.priority}, workers {job.workers} "
          f"(gang {job.min_workers}..{job.max_workers} x {job.cpus_per_worker:g} CPU"
          f"{f', {job.gpus_per_worker:g} GPU' if job.gpus_per_worker else ''})")
    print(f"  attempts {job.attempts}/{job.max_retries + 1}, ray submission {job.ray_submission_id or '-'}")
    if job.checkpoint_url:
        print(f"  checkpoint {job.checkpoint_url} step {job.checkpoint_step} ({_age(job.checkpoint_time)} ago)")
    if job.parent_id:
        print(f"  pipeline {job.parent_id}, stage {job.stage}, after {job.depends_on or 'nothing'}")
    if job.kind == "pipeline":
        for s in storemod.JobStore(args.store).list(parent_id=job.id):
            print(f"  stage {s.stage}: {s.id}  {s.state}  ({s.reason})")
    print("  history:")
    for t in job.history:
        print(f"    {_when(t.at)}  {t.from_state or '-':>9} -> {t.to_state:<9}  {t.reason}")
    return 0


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _waiting_for(job, width: int = 60) -> str:
    """The queue's WAITING-FOR cell: the code and the start of its detail."""
    if not job.wait_reason:
        return "-"
    text = f"{job.wait_reason}: {job.wait_detail}" if job.wait_detail else job.wait_reason
    return text if len(text) <= width else text[:width - 3] + "..."


def cmd_queue(args) -> int:
    states = args.state or (None if args.all else [s for s in storemod.STATES if s not in storemod.TERMINAL])
    try:
        jobs = storemod.JobStore(args.store).list(states)
    except (storemod.StoreError, ValueError) as e:
        return _fail(str(e))
    rank = {c: i for i, c in enumerate(("critical", "high", "normal", "low"))}
    jobs.sort(key=lambda j: (j.state not in storemod.ACTIVE, rank.get(j.priority, 9), j.submit_time))
    cols = ("ID", "KIND", "TEAM", "PRIORITY", "STATE", "WORKERS", "TRIES", "AGE", "WAITING-FOR", "REASON")
    rows = [(j.id, j.kind, j.team, j.priority, j.state,
             f"{j.workers}/{j.min_workers}..{j.max_workers}" if j.max_workers else "-",
             str(j.attempts), _age(j.submit_time), _waiting_for(j), j.reason[:60]) for j in jobs]
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    if not rows:
        print("(no jobs)")
    return 0


def cmd_cancel(args) -> int:
    try:
        job = storemod.JobStore(args.store).cancel(args.job_id, args.reason)
    except storemod.StoreError as e:
        return _fail(str(e))
    # The scheduler service stops the Ray job on its next cycle (it watches for cancelled jobs).
    print(f"{job.id} cancelled")
    return 0


def cmd_logs(args) -> int:
    try:
        st = storemod.JobStore(args.store)
        job = st.get(args.job_id)
        stages = st.list(parent_id=job.id)
    except storemod.StoreError as e:
        return _fail(str(e))
    if job.kind == "pipeline":
        lines = "\n".join(f"  stage {s.stage}: {s.id} ({s.state})" for s in stages)
        return _fail(f"{job.id} is a pipeline; each stage has its own logs:\n{lines}")
    if not job.ray_submission_id:
        return _fail(f"job {job.id} has not been submitted to Ray yet (state {job.state}); no logs")
    sid = job.ray_submission_id
    if args.attempt is not None:
        if not 0 <= args.attempt <= job.attempts:
            return _fail(f"job {job.id} has attempts 0..{job.attempts}, not {args.attempt}", 2)
        sid = f"orch-{job.id}-a{args.attempt}"
    try:
        from ray.job_submission import JobSubmissionClient
        client = JobSubmissionClient(args.address)
        print(client.get_job_logs(sid), end="")
    except Exception as e:  # noqa: BLE001 - any Ray/HTTP failure is reported, not raised
        from orchestrator.ray_adapter import connection_help
        return _fail(f"cannot fetch logs of {job.id} (Ray job {sid}): {e}\n({connection_help(args.address)})")
    return 0


def _parse_resources(text: str, what: str) -> tuple[float, float]:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)(?::(\d+(?:\.\d+)?))?\s*", text)
    if not m:
        raise ValueError(f"{what}: {text!r} is not CPUS[:GPUS] (e.g. 8 or 16:2)")
    return float(m[1]), float(m[2] or 0)


def _seed_quotas(store, quotas: dict) -> None:
    """The deprecated ``--quota`` flags: each becomes the team's stored quota (a max, nothing
    guaranteed) unless the store already has one for it, which wins."""
    from orchestrator.commands.quota import describe
    for team, q in quotas.items():
        try:
            have = store.get_quota(team)
        except storemod.UnknownQuota:
            store.set_quota(team, max_cpus=q.cpus, max_gpus=q.gpus)
            print(f"scheduler: --quota is deprecated; stored quota of {team!r} (max {q.cpus:g} CPU"
                  f"{'' if q.gpus is None else f', {q.gpus:g} GPU'}); change it with "
                  f"`orchestrator quota set`", file=sys.stderr)
            continue
        print(f"scheduler: --quota {team}=... ignored: the store has a quota for it, which wins "
              f"({describe(have)})", file=sys.stderr)


def cmd_scheduler(args) -> int:
    import logging
    import signal
    import threading

    from orchestrator.policy import PolicyConfig, Quota
    from orchestrator.service import Scheduler, SchedulerConfig
    try:
        quotas = {}
        for q in args.quota:
            team, eq, res = q.partition("=")
            if not team or not eq:
                raise ValueError(f"--quota: {q!r} is not TEAM=CPUS[:GPUS]")
            c, g = _parse_resources(res, "--quota")
            quotas[team] = Quota(cpus=c, gpus=g if ":" in res else None)
        shapes = tuple(_parse_resources(s, "--autoscale-node") for s in args.autoscale_node)
        policy = PolicyConfig() if args.min_run_before_preempt is None else \
            PolicyConfig(min_run_before_preempt_s=args.min_run_before_preempt)
        config = SchedulerConfig(
            policy=policy, autoscale_shapes=shapes, python=args.python,
            entrypoint=args.entrypoint, workdir=os.path.abspath(args.workdir),
            working_dir=args.working_dir, spec_dir=args.spec_dir, retry_backoff_s=args.retry_backoff,
            checkpoint_timeout_s=args.checkpoint_timeout, admission_timeout_s=args.admission_timeout,
            tick_s=args.tick, lease_ttl_s=args.lease_ttl, reconnect_max_s=args.reconnect_max,
            health_file=args.health_file, **({"scheduler_id": args.id} if args.id else {}))
    except ValueError as e:
        return _fail(str(e), 2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        store = storemod.JobStore(args.store)
        _seed_quotas(store, quotas)
    except storemod.StoreError as e:
        return _fail(str(e))
    # The Ray driver is a child process (RayLink) that is started again after Ray went away:
    # a driver does not outlive a GCS outage of 60 s, the scheduler must.
    from orchestrator.ray_adapter import RayLink, RayUnavailable, connection_help
    ray = RayLink(args.address)
    try:
        ray.connect()
    except RayUnavailable as e:
        if args.once:
            return _fail(f"{e}\n({connection_help(args.address)})")
        # A service started before its cluster (or during an outage) waits for it.
        print(f"scheduler: store {storemod.redacted(store.url)}; {e}; waiting for Ray "
              f"({connection_help(args.address)})", file=sys.stderr, flush=True)
    sched = Scheduler(store, ray, config, metrics=ray.metrics)
    try:
        if args.once:
            try:
                if not sched.lead():
                    held = store.lease("scheduler")
                    return _fail(f"another scheduler is active on this store: {held.holder if held else '?'}")
                try:
                    sched.tick()
                finally:
                    store.release_lease(sched.lease)
            except (RayUnavailable, storemod.StoreError) as e:
                return _fail(str(e))
            return 0
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        if ray.connected:
            print(f"scheduler: store {storemod.redacted(store.url)}, Ray jobs at {ray.dashboard_url}", flush=True)
        try:
            sched.run(stop)
        except KeyboardInterrupt:
            pass
        return 0
    finally:
        ray.close()
