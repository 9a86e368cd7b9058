"""The training engine: the loop (student, teacher, AMP, DDP, checkpoints, export), schedules, EMA, progress."""
