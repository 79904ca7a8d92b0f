"""Ray Tune trials over the elastic DeepSpeed trainer: one Tune trial = one Ray Train run."""
