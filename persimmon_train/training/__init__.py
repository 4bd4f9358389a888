"""Training: typed config, the loop, optimizer/schedule, checkpoints, trackers, export."""
