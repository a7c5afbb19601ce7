"""Training: run config, optimizer and schedule, checkpoints, the loop."""
