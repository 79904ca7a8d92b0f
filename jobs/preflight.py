"""Checks a spec must pass before a job takes any resource, beyond its own validation: everything
that can be known from the spec and small reads. Used by every ``jobs.*`` entrypoint,
``orchestrator validate`` and ``orchestrator submit``.

For each train spec (alone, a tune search's trial, a pipeline stage): the dataset's manifest is
read (one small object), the model is built and run on PyTorch's meta device on a sample of the
dataset's shape (no memory, no arithmetic: the factory's own import and Python are the cost), and
a probe object is written and deleted under the checkpoint URL (one small write and delete).
"""

from __future__ import annotations

from orchestrator.spec import PipelineSpec, SpecError, TrainSpec, TuneSpec


def _trains(spec) -> list[tuple[str, TrainSpec]]:
    if isinstance(spec, TrainSpec):
        return [("", spec)]
    if isinstance(spec, TuneSpec):
        return [("trial.", spec.trial)]
    if isinstance(spec, PipelineSpec):
        return [(f"stages.{st.name}.spec.{p}", t) for st in spec.stages for p, t in _trains(st.spec)]
    return []


def preflight(spec, source: str | None = None) -> list[str]:
    """Raises SpecError listing every problem with its field path; else returns notes on what the
    job will do (``# ...`` lines ``orchestrator validate`` prints)."""
    from actors.data.preflight import check_dataset
    from actors.trainer.preflight import checkpoint_errors, model_errors
    errors, notes = [], []
    for prefix, t in _trains(spec):
        found = check_dataset(t)
        found.errors += model_errors(t, found.schema) + checkpoint_errors(t)
        errors += [(prefix + path, reason) for path, reason in found.errors]
        notes += [f"# {prefix}{n}" for n in found.notes]
    if errors:
        raise SpecError(errors, source)
    return notes
