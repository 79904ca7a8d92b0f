"""How a job's entrypoint tells the scheduler whether running it again could help: its exit code.

``python -m jobs.<kind>`` exits 2 for a spec that fails validation or preflight, and 3 when the
job failed for a reason that would fail it again the same way (a model that cannot be built, a
dtype error in the first step, out of memory while building): the scheduler marks such a job
failed at once instead of retrying it ``scheduling.max_retries`` times. Any other failure (a
worker or node lost, a crash mid-run) may be retried.

A job stopped by a signal (SIGTERM from Ray's job stop, SIGINT from a terminal) that handles it
cleans up and exits :func:`stopped_exit_code`. Ray marks a job that its Jobs API stopped STOPPED
whatever the code; one signalled by anything else ends FAILED with that code, and may be retried.
"""

EXIT_INVALID_SPEC = 2
EXIT_NOT_RETRYABLE = 3
NOT_RETRYABLE = frozenset({EXIT_INVALID_SPEC, EXIT_NOT_RETRYABLE})


def retryable(exit_code: int | None) -> bool:
    """Whether a failed entrypoint with this exit code is worth running again."""
    return exit_code not in NOT_RETRYABLE


def stopped_exit_code(signum: int) -> int:
    """What an entrypoint stopped by signal ``signum`` exits with once it has cleaned up: 128 +
    the signal number, as a shell reports a process the signal ended (130 SIGINT, 143 SIGTERM)."""
    return 128 + int(signum)
