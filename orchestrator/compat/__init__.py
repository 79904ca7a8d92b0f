"""The only modules that touch a private Ray or DeepSpeed internal (DESIGN.md, "Layers").

One module per engine: :mod:`.ray_internals`, :mod:`.deepspeed_internals`. Each touch says why no
public API serves, and each module's ``verify()`` checks every internal it relies on, raising
:class:`CompatError` naming the one that moved; ``tests/test_compat.py`` calls both, so an upgrade
fails there first instead of degrading quietly (a restore without optimizer state, a spare that
never starts). These modules import nothing of this project's but this package.
"""


class CompatError(RuntimeError):
    """A private Ray or DeepSpeed internal this project relies on has moved or changed shape."""

    def __init__(self, engine: str, what: str, detail: str):
        super().__init__(f"{engine} internal {what}: {detail}. This version of {engine} is not the one "
                         f"orchestrator/compat/ was written for (see the pins in pyproject.toml)")
        self.engine, self.what = engine, what
