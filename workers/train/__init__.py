"""What each Ray Train worker runs: the loop, its state and checkpoints, models, evaluation,
randomness, metrics, control."""
