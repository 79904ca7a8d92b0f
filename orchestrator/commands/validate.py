"""``orchestrator validate SPEC``: print the resolved spec, or every error with its field path."""

from __future__ import annotations

import sys

from orchestrator import spec as specmod


def register(sub) -> None:
    p = sub.add_parser("validate", help="check a job spec and print it resolved (defaults filled in)")
    p.add_argument("spec", help="path or URL of a YAML job spec")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        spec = specmod.load_spec(args.spec)
    except specmod.SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"# {args.spec}: valid {spec.kind} spec")
        print(specmod.dump_spec(spec), end="")
        for line in specmod.describe(spec):
            print(line)
    return 0
