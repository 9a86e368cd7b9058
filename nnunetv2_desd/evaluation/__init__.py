"""Evaluation: the encoder probe and ``desd_benchmark`` (fine-tuned against scratch and vanilla nnU-Net, its report
and statistics)."""
