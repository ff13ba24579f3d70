"""flashtrain's trainer: Hydra entry point, data pipeline, training loop, checkpoints, logging."""
