"""Plans for fine-tuning: like a pre-trained checkpoint (ours or nnssl's), and PVT-UNet plans."""
