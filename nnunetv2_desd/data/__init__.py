"""Data: raw checks and body masks, planning for pre-training, the unlabelled pool, labelled fractions, reference
datasets, DRRs per case, preprocessing match, demo sources."""
