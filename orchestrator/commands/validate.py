"""``orchestrator validate SPEC``: print the resolved spec, or every error with its field path."""

from __future__ import annotations

import sys

from orchestrator import spec as specmod


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a job spec and print it resolved (defaults filled in)")
    p.add_argument("spec", help="path or URL of a YAML job spec")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a spec field first, e.g. --set dataset.url=/data/cls (value parsed as YAML)")
    p.add_argument("--offline", action="store_true",
                   help="check the spec alone, without reading the dataset's manifest")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        spec = specmod.load_spec(args.spec, specmod.parse_assignments(args.set, "--set", args.spec))
        _check_searches(spec, args.spec)
        notes = []
        if not args.offline:
            from jobs.preflight import preflight
            notes = preflight(spec, args.spec)
    except specmod.SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"# {args.spec}: valid {spec.kind} spec")
        print(specmod.dump_spec(spec), end="")
        from actors.trainer.preflight import count_params
        for line in specmod.describe(spec, count_params) + notes:
            print(line)
    return 0


def _check_searches(spec, source: str) -> None:
    """Tune searches (alone or as pipeline stages): every value the search can produce must make a
    valid trial spec, as ``jobs.tune`` checks before it takes any Ray resource."""
    from jobs.tune import check_tune_spec  # jobs imports nothing of Ray at module level
    tunes = [("", spec)] if spec.kind == "tune" else \
        [(f"stages.{st.name}.spec.", st.spec) for st in getattr(spec, "stages", []) if st.spec.kind == "tune"]
    errors = []
    for prefix, t in tunes:
        try:
            check_tune_spec(t)
        except specmod.SpecError as e:
            errors += [(prefix + path, reason) for path, reason in e.errors]
    if errors:
        raise specmod.SpecError(errors, source)
