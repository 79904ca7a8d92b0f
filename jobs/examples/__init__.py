"""Small example models and the synthetic data they train on (no downloads)."""
