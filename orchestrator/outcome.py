"""How a job's entrypoint tells the scheduler whether running it again could help: its exit code.

``python -m jobs.<kind>`` exits 2 for a spec that fails validation or preflight, and 3 when the
job failed for a reason that would fail it again the same way (a model that cannot be built, a
dtype error in the first step, out of memory while building): the scheduler marks such a job
failed at once instead of retrying it ``scheduling.max_retries`` times. Any other failure (a
worker or node lost, a crash mid-run) may be retried.
"""

EXIT_INVALID_SPEC = 2
EXIT_NOT_RETRYABLE = 3
NOT_RETRYABLE = frozenset({EXIT_INVALID_SPEC, EXIT_NOT_RETRYABLE})


def retryable(exit_code: int | None) -> bool:
    """Whether a failed entrypoint with this exit code is worth running again."""
    return exit_code not in NOT_RETRYABLE
