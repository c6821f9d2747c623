"""Training: the run config, the trainer, checkpoints, accelerate engines, and the demo recipe."""
