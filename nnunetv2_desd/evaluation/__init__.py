"""Fine-tuning benchmark: a pre-trained trainer against nnU-Net's vanilla trainer on the same folds and labelled
fractions (``desd_benchmark``), from stock ``nnUNetv2_train`` runs and their ``validation/summary.json``."""
