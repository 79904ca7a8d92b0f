"""Failures that a retry would only repeat, told apart from those a restart can fix.

An exception raised on a rank before its first training step completes, of a kind that does not
depend on the cluster's state (a model that cannot be imported or built, bad arguments, a dtype or
shape error in the first forward, out of memory while building), is re-raised as
:class:`SetupError`. The driver's failure policy (``actors.trainer.trainer``) ends the run when
every failed rank reports one; worker or node loss, preemption and errors after the first step
are retried as before. Nothing here imports torch; Ray only to unwrap its exception wrapper.
"""

from __future__ import annotations

_DETERMINISTIC = (ImportError, AttributeError, TypeError, ValueError, KeyError, IndexError, NameError,
                  NotImplementedError, MemoryError, AssertionError, ZeroDivisionError)
# RuntimeErrors from the model's own arithmetic (collectives raise RuntimeError too, and a lost peer
# must stay retryable): dtype and shape mismatches, allocation failures
_DETERMINISTIC_RUNTIME = ("must have the same dtype", "expected scalar type", "mat1 and mat2 shapes",
                          "size mismatch", "shape mismatch", "shape '", "out of memory",
                          "Expected all tensors to be on the same device", "not implemented for")


class SetupError(RuntimeError):
    """Training could not start on this rank for a reason a retry would hit again."""

    def __init__(self, message: str, rank: int = -1, cause: str = ""):
        super().__init__(message)
        self.rank, self.cause = rank, cause

    def __reduce__(self):
        return (SetupError, (self.args[0], self.rank, self.cause))


def deterministic(e: BaseException) -> bool:
    """Whether ``e`` (raised before the first step) would be raised again by a retry."""
    if isinstance(e, SetupError):
        return True
    if type(e).__name__ in ("OutOfMemoryError", "SpecError", "ShardError"):
        return True  # torch.OutOfMemoryError; a bad spec; a missing or corrupt shard
    if isinstance(e, (ConnectionError, TimeoutError)):
        return False
    if isinstance(e, _DETERMINISTIC):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e) for m in _DETERMINISTIC_RUNTIME)


def as_setup_error(e: BaseException, rank: int) -> SetupError:
    return SetupError(f"training could not start on rank {rank}: {type(e).__name__}: {e}", rank,
                      type(e).__name__)


def setup_failure(error: BaseException) -> SetupError | None:
    """The SetupError behind a training failure when every failed rank reported one, else None."""
    if isinstance(error, SetupError):
        return error
    failures = getattr(error, "worker_failures", None)  # Ray Train's WorkerGroupError
    if not failures:
        cause = error.__cause__ or error.__context__
        return setup_failure(cause) if cause is not None and cause is not error else None
    found = [_unwrap(f) for f in failures.values()]
    return found[0] if found and all(isinstance(f, SetupError) for f in found) else None


def _unwrap(e: BaseException) -> BaseException:
    """A worker's exception as raised in the train function (Ray Train wraps it)."""
    from orchestrator.compat.ray_internals import unwrap_user_exception
    return unwrap_user_exception(e)
