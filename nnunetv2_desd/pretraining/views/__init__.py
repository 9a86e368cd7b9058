"""Views of a volume: augmentation, packed masking, and the loader that yields view batches."""
