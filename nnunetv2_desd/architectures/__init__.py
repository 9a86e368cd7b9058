"""Network architectures that nnU-Net plans can name (``architecture.network_class_name``): PVT-UNet."""
