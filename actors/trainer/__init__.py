"""Elastic DeepSpeed ZeRO trainer: train loop, checkpoint I/O, resharding, export."""
