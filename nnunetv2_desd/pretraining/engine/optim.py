"""Gradient clipping of the pre-training recipes."""
from typing import Iterable

import torch


@torch.no_grad()
def clip_per_parameter_(parameters: Iterable[torch.Tensor], max_norm: float) -> None:
    """Per-parameter clipping (DINO, CADS 0.3): g <- g * min(1, max_norm / (||g||_2 + 1e-6)) for each tensor
    on its own, unlike torch's clip_grad_norm_, which scales all gradients by their joint norm."""
    for p in parameters:
        if p.grad is not None:
            p.grad.mul_((max_norm / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))
