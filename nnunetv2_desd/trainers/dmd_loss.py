"""The deep mutual distillation loss of DMD (Xie, Yin, Li, Wang, MICCAI 2023), multi-class form.

Two networks of one architecture see the same batch and give logits z1, z2 of shape (B, C, X, Y, Z)
(or (B, C, X, Y) in 2D). Each is softened with the temperature T and the two maps are pulled together
by a soft Dice, on labelled and unlabelled samples alike (paper Eq. 4, softmax form):

    L_dmd = 1 - Dice(softmax(z1 / T), softmax(z2 / T))
    Dice(p, q) = mean over classes (and samples) of (2 * sum(p * q) + s) / (sum(p) + sum(q) + s)

The sums run over the spatial axes, and over the batch axis too when ``batch_dice`` is set (nnU-Net's
convention for its supervised Dice, read from the plans). With softmax the background channel is left out as in
nnU-Net's supervised Dice (``do_bg=False``; it equals 1 minus the foreground channels). The original binary DMD
uses sigmoid(z / T) of a single channel; ``nonlinearity='sigmoid'`` gives that form, and nnU-Net's region-based
training, with every channel kept. Dice is symmetric in p and q, and neither map is detached: each network is
the other's teacher, and the gradient reaches both. For soft maps Dice(p, p) = sum(p^2) / sum(p) < 1, so the
loss is lowest where the two maps agree and are confident; the temperature softens both before they are compared.

A high temperature keeps both targets at high entropy; the paper's point is that sharpening (entropy
minimisation) hurts in ambiguous regions. Defaults from the paper: T = 2 (1.93 in its 16-label setting),
weight lambda = 4 (applied by the trainer; the paper's text gives 1 in one place and 4 in another).
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
