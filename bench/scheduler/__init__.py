"""Scheduler benchmark: orchestrator.policy.decide vs a FIFO gang baseline, by simulation."""
