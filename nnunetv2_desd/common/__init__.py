"""What every stage shares: one-line errors, atomic checkpoint files, and the export format (ours, nnssl's)."""
