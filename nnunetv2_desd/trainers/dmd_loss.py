"""The deep mutual distillation loss of DMD (Xie, Yin, Li, Wang, MICCAI 2023), multi-class form.

    L_dmd = 1 - Dice(softmax(z1 / T), softmax(z2 / T))

over the spatial axes (and the batch with ``batch_dice``), background left out as in nnU-Net's Dice;
``nonlinearity='sigmoid'`` gives the original binary form and region-based training. Symmetric, neither side
detached. Why a soft Dice at a high temperature: docs/dmd.md.
"""
from typing import Sequence

import torch
from torch import nn


def soft_dice(p: torch.Tensor, q: torch.Tensor, axes: Sequence[int], smooth: float = 1e-5) -> torch.Tensor:
    """(2 * sum(p * q) + smooth) / (sum(p) + sum(q) + smooth), summed over ``axes`` (nnU-Net's soft Dice
    with ``q`` in place of the one-hot target); the denominator is clipped at 1e-8 as nnU-Net does."""
    intersection = (p * q).sum(dim=tuple(axes))
    total = p.sum(dim=tuple(axes)) + q.sum(dim=tuple(axes))
    return (2 * intersection + smooth) / torch.clip(total + smooth, min=1e-8)


class MutualDistillationLoss(nn.Module):
    """L_dmd = 1 - Dice(softmax(z1 / T), softmax(z2 / T)) (DMD Eq. 4); see the module docstring."""

    def __init__(self, temperature: float = 2.0, nonlinearity: str = 'softmax', batch_dice: bool = False,
                 smooth: float = 1e-5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f'the DMD temperature must be positive, got {temperature}')
        if nonlinearity not in ('softmax', 'sigmoid'):
            raise ValueError(f"nonlinearity is 'softmax' or 'sigmoid', got {nonlinearity!r}")
        self.temperature = float(temperature)
        self.nonlinearity = nonlinearity
        self.batch_dice = batch_dice
        self.smooth = smooth

    def soften(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float() / self.temperature  # in float32 also under autocast
        if self.nonlinearity == 'sigmoid':
            return torch.sigmoid(z)
        return torch.softmax(z, dim=1)[:, 1:]  # background left out (do_bg=False)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        if z1.shape != z2.shape:
            raise ValueError(f'the two networks\' logits differ in shape: {tuple(z1.shape)} vs {tuple(z2.shape)}')
        p1, p2 = self.soften(z1), self.soften(z2)
        spatial = list(range(2, z1.ndim))
        dice = soft_dice(p1, p2, [0] + spatial if self.batch_dice else spatial, self.smooth)
        return 1 - dice.mean()


class DeepSupervisedMutualDistillation(nn.Module):
    """The DMD loss at full resolution, or as a weighted sum over nnU-Net's deep-supervision outputs.

    ``weights`` are the supervised loss's deep-supervision weights (nnU-Net halves them per scale, drops the
    lowest and normalises to sum 1); None or a single output: full resolution only.
    """

    def __init__(self, loss: MutualDistillationLoss, weights: Sequence[float] = None):
        super().__init__()
        self.loss = loss
        self.weights = None if weights is None else [float(w) for w in weights]

    def forward(self, out1, out2) -> torch.Tensor:
        if not isinstance(out1, (list, tuple)):
            return self.loss(out1, out2)
        if self.weights is None:
            return self.loss(out1[0], out2[0])
        return sum(w * self.loss(a, b) for w, a, b in zip(self.weights, out1, out2) if w != 0)
