"""The ``orchestrator`` command. Each command group lives in ``orchestrator/commands/<group>.py``
and exposes ``register(subparsers)``; this file only wires them together."""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "orchestrator.commands.validate",   # validate SPEC
    "orchestrator.commands.data",       # data write / data inspect
    "orchestrator.commands.export",     # export CKPT OUT
    "orchestrator.commands.jobs",       # submit / status / queue / cancel / logs / scheduler
    "orchestrator.commands.quota",      # quota set / list / delete
    "orchestrator.commands.top",        # top (live KPIs from the metrics endpoints)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orchestrator",
        description="Queue, gang-schedule and run elastic DeepSpeed/Tune/Serve jobs on Ray.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # a command group not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
