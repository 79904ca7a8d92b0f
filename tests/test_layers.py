"""Imports point down (docs/ARCHITECTURE.md, section 1): the compat modules import nothing of ours,
the control-plane core nothing from ``actors/`` or ``jobs/`` and no torch or DeepSpeed, ``actors/`` nothing from ``jobs/``,
trainer code no serve code and serve code no trainer code; and private Ray and DeepSpeed internals
are named only in the compat modules. Read from every module's source (lazy imports inside functions
included), so a new one fails here naming the file, the line and the module or name."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPAT = "orchestrator/compat/"


def _imports(path: str):
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.lineno, node.module


def _forbidden(rel: str) -> tuple[str, ...]:
    if rel.startswith(COMPAT):
        return ("actors", "jobs", "bench", "orchestrator")  # but orchestrator.compat, see below
    if rel.startswith("orchestrator/") and not (rel == "orchestrator/cli.py" or rel.startswith("orchestrator/commands/")
                                                or rel == "orchestrator/__main__.py"):
        return ("actors", "jobs", "torch", "deepspeed")
    if rel.startswith("actors/trainer/"):
        return ("jobs", "actors.serve")
    if rel.startswith("actors/serve/"):
        return ("jobs", "actors.trainer")
    if rel.startswith("actors/"):
        return ("jobs",)
    return ()


def _modules():
    for top in ("orchestrator", "actors", "jobs"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    yield os.path.relpath(os.path.join(d, f), ROOT)


def test_imports_point_down():
    bad = []
    for rel in _modules():
        banned = _forbidden(rel)
        for line, mod in _imports(os.path.join(ROOT, rel)):
            if mod == "orchestrator.compat" or mod.startswith("orchestrator.compat."):
                continue  # the lowest layer: anyone may import it
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{rel}:{line} imports {mod}")
    assert not bad, "imports that point up or sideways:\n" + "\n".join(bad)


# Private Ray and DeepSpeed internals this project uses, by the module or attribute name a use
# must spell out; only orchestrator/compat/ may.
PRIVATE = ("ray._private", "ray.train.v2._internal", "ray.serve._private", "ray.core.generated",
           "_get_global_client", "_hp_mapping", "ds_id", "ds_numel", "ds_shape", "ds_process_group",
           "fp32_partitioned_groups_flat", "_lazy_init_hp_params_optimizer_state", "update_lp_params",
           "_reassign_or_swap_out_partitioned_parameters", "fp16_groups", "_base_exc",
           "_count_possible_workers", "_get_num_workers_for_resource_request",
           "_initialize_and_run_controller", "PrestartWorkers", "WORKER_PROCESS_SETUP_HOOK_ENV_VAR",
           "HEALTH_CHECK_INTERVAL_S_ENV_VAR", "get_target_groups", "compiler.compile")


def _names(path: str):
    """(line, dotted name) of every import, attribute chain and string in ``path``."""
    tree = ast.parse(open(path).read(), path)
    yield from _imports(path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
            yield node.lineno, node.value  # getattr(x, "name"), hasattr(x, "name")


def _private_uses(rel: str) -> list[str]:
    out = []
    for line, name in _names(os.path.join(ROOT, rel)):
        for p in PRIVATE:
            if name == p or name.startswith(p + ".") or name.endswith("." + p) or ("." + p + ".") in name:
                out.append(f"{rel}:{line} uses {p} ({name})")
    return sorted(set(out))


def test_private_ray_and_deepspeed_internals_are_touched_only_in_the_compat_modules():
    bad = [u for rel in _modules() if not rel.startswith(COMPAT) for u in _private_uses(rel)]
    assert not bad, "private internals outside orchestrator/compat/:\n" + "\n".join(bad)
    assert _private_uses(COMPAT + "ray_internals.py") and _private_uses(COMPAT + "deepspeed_internals.py")


def test_the_check_sees_lazy_imports():
    src = "def f():\n    from actors.trainer import loop\n"
    tree_mods = [n.module for n in ast.walk(ast.parse(src)) if isinstance(n, ast.ImportFrom)]
    assert tree_mods == ["actors.trainer"] and _forbidden("orchestrator/service.py")[:2] == ("actors", "jobs")
