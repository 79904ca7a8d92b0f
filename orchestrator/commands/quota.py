"""``orchestrator quota set | list | delete``: the teams' quotas, kept in the job store.

A quota per team, per resource: a *guaranteed* share the team may always use (taken back from
borrowers by preemption when it needs it) and a *max* it may hold at once; teams of one *cohort*
lend each other the guaranteed capacity they leave idle. ``orchestrator.policy`` says exactly how.
The scheduler reads the quotas from the store every tick: a change takes effect without a restart.

``--cpus G[:MAX]`` and ``--gpus G[:MAX]``: ``G`` guaranteed and ``MAX`` the max; ``G`` alone means
``G:G`` (no borrowing), ``MAX`` may be ``inf`` (no limit), ``0:MAX`` is a plain cap. ``set`` changes
only what it is given; a new team starts with nothing guaranteed, no max and no cohort. Exit
status: 0 ok, 1 a store error or a team with no quota, 2 an invalid value (named).
"""

from __future__ import annotations

import json
import os
import re
import sys

from orchestrator import store as storemod

_AMOUNT = r"\d+(?:\.\d+)?"


def register(sub) -> None:
    p = sub.add_parser("quota", help="teams' quotas: guaranteed share, max, cohort (set, list, delete)")
    qs = p.add_subparsers(dest="quota_command", metavar="ACTION", required=True)

    s = qs.add_parser("set", help="create or change a team's quota (only what is given changes)")
    s.add_argument("team")
    s.add_argument("--cpus", metavar="G[:MAX]", help="CPUs guaranteed, and the most it may hold "
                   "(default MAX = G, no borrowing; 'inf': no limit; 0:MAX: a plain cap)")
    s.add_argument("--gpus", metavar="G[:MAX]", help="GPUs, as --cpus")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--cohort", metavar="NAME",
                   help="teams of one cohort lend each other idle guaranteed capacity")
    g.add_argument("--no-cohort", action="store_true",
                   help="leave its cohort (then it lends nothing and borrows only capacity no team "
                        "guarantees)")
    _common(s)
    s.set_defaults(func=cmd_set)

    ls = qs.add_parser("list", help="every team's quota and what its jobs hold now")
    ls.add_argument("--json", action="store_true", help="print a JSON list")
    _common(ls)
    ls.set_defaults(func=cmd_list)

    d = qs.add_parser("delete", help="remove a team's quota (no guarantee, no max any more)")
    d.add_argument("team")
    _common(d)
    d.set_defaults(func=cmd_delete)


def _common(p) -> None:
    p.add_argument("--store", default=os.environ.get("ORCHESTRATOR_STORE", storemod.DEFAULT_URL),
                   help="job store path or SQLAlchemy URL (env ORCHESTRATOR_STORE)")


def _fail(msg: str, code: int = 1) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def parse_share(text: str, option: str) -> tuple[float, float | None]:
    """``'4'`` -> (4, 4); ``'4:16'`` -> (4, 16); ``'4:inf'`` -> (4, None)."""
    m = re.fullmatch(rf"\s*({_AMOUNT})(?::({_AMOUNT}|inf))?\s*", text)
    if not m:
        raise ValueError(f"{option}: {text!r} is not G[:MAX] (guaranteed[:max], e.g. 4, 4:16, 0:8 "
                         f"or 4:inf)")
    g = float(m[1])
    mx = g if m[2] is None else (None if m[2] == "inf" else float(m[2]))
    return g, mx


def _res(g: float, mx: float | None) -> str:
    return f"{g:g}/{'-' if mx is None else f'{mx:g}'}"


def describe(q: storemod.QuotaRecord) -> str:
    """One line: ``team: CPU 4 guaranteed, max 16; GPU ...; cohort ml``."""
    def one(res, g, mx):
        return f"{res} {g:g} guaranteed, {'no max' if mx is None else f'max {mx:g}'}"
    return (f"{q.team}: {one('CPU', q.guaranteed_cpus, q.max_cpus)}; "
            f"{one('GPU', q.guaranteed_gpus, q.max_gpus)}; "
            f"{'cohort ' + q.cohort if q.cohort else 'no cohort'}")


def cmd_set(args) -> int:
    fields = {}
    try:
        for res in ("cpus", "gpus"):
            text = getattr(args, res)
            if text is not None:
                g, mx = parse_share(text, f"--{res}")
                fields[f"guaranteed_{res}"], fields[f"max_{res}"] = g, mx
    except ValueError as e:
        return _fail(str(e), 2)
    if args.cohort is not None or args.no_cohort:
        fields["cohort"] = None if args.no_cohort else args.cohort
    if not fields:
        return _fail("quota set: give at least one of --cpus, --gpus, --cohort, --no-cohort", 2)
    try:
        q = storemod.JobStore(args.store).set_quota(args.team, **fields)
    except storemod.InvalidQuota as e:
        return _fail(str(e), 2)
    except storemod.StoreError as e:
        return _fail(str(e))
    print(describe(q))
    return 0


def cmd_list(args) -> int:
    try:
        st = storemod.JobStore(args.store)
        quotas = st.list_quotas()
        jobs = st.list(storemod.ACTIVE)
    except storemod.StoreError as e:
        return _fail(str(e))
    used: dict[str, list[float]] = {}
    for j in jobs:
        u = used.setdefault(j.team, [0.0, 0.0])
        u[0] += j.workers * j.cpus_per_worker
        u[1] += j.workers * j.gpus_per_worker
    if args.json:
        print(json.dumps([{**q.__dict__, "used_cpus": used.get(q.team, [0.0, 0.0])[0],
                           "used_gpus": used.get(q.team, [0.0, 0.0])[1]} for q in quotas], indent=2))
        return 0
    cols = ("TEAM", "COHORT", "CPU G/MAX", "GPU G/MAX", "IN USE CPU/GPU")
    rows = [(q.team, q.cohort or "-", _res(q.guaranteed_cpus, q.max_cpus),
             _res(q.guaranteed_gpus, q.max_gpus),
             "{:g}/{:g}".format(*used.get(q.team, (0.0, 0.0)))) for q in quotas]
    if not rows:
        print("(no quotas: every team may use any free capacity)")
        return 0
    widths = [max([len(c)] + [len(r[i]) for r in rows]) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_delete(args) -> int:
    try:
        storemod.JobStore(args.store).delete_quota(args.team)
    except storemod.StoreError as e:
        return _fail(str(e))
    print(f"{args.team}: quota deleted")
    return 0
