"""CADS packed masking: keep one patch per k x k in-plane block and pack the kept patches.

A 3D view (N, C, A0, A1, A2) is cut into patches of p0 x p1 x p2 voxels (axis 0 = depth, axes 1, 2 =
in-plane), i.e. a (G0, G1, G2) patch grid. Patches are grouped into blocks of 1 x k x k patches; one
patch per block is kept at random, so the masking ratio is 1 - 1/k^2 (k = 2: 75 %). The kept patch
of block (g0, b1, b2) is written to patch position (g0, b1, b2) of the packed view
(N, C, A0, A1 / k, A2 / k): the encoder sees a k^2 times smaller input (CADS's saving in compute
and memory). Packing is a gather, so gradients flow back to the kept voxels only.
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from nnunetv2_desd.common.errors import DesdError

DEFAULT_PATCH = (4, 8, 8)
RATIO_TOLERANCE = 1e-3


def mask_ratio(block: int) -> float:
    """Fraction of patches masked when one patch of every block x block group is kept: 1 - 1/k^2."""
    return 1.0 - 1.0 / block ** 2


def block_for_ratio(ratio: float) -> int:
    """The block size k with ratio == 1 - 1/k^2 (0 -> 1, 0.75 -> 2, 0.8889 -> 3, 0.9375 -> 4)."""
    allowed = ", ".join(f"{mask_ratio(k):.4g}" for k in range(1, 6))
    try:
        value = float(ratio)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 <= value < 1:  # also rejects NaN
        raise DesdError(f"mask ratio must be one of {allowed}, ... (1 - 1/k^2 for a block of k x k patches), "
                        f"got {ratio!r}")
    ratio = value
    block = max(1, round(1 / math.sqrt(1 - ratio)))
    if abs(mask_ratio(block) - ratio) > RATIO_TOLERANCE:
        raise DesdError(f"mask ratio {ratio} is not 1 - 1/k^2 for any block size k; use one of {allowed}, ... "
                        f"(one patch kept per k x k in-plane block)")
    return block


def check_maskable(view_shape: Sequence[int], patch: Sequence[int] = DEFAULT_PATCH, block: int = 2) -> None:
    """DesdError unless every view axis divides into patches and the in-plane patch grid into blocks.

    Equivalently, the view shape (A0, A1, A2) must be a multiple of (p0, k * p1, k * p2).
    """
    view_shape, patch = tuple(int(a) for a in view_shape), tuple(int(p) for p in patch)
    if len(view_shape) != 3 or len(patch) != 3 or min(patch) < 1 or int(block) != block or block < 1:
        raise DesdError(f"masking needs a 3D view shape, a 3D patch of positive sizes and a block size >= 1; "
                        f"got view shape {view_shape}, patch {patch}, block {block}")
    multiple = (patch[0], block * patch[1], block * patch[2])
    bad_axes = [axis for axis in range(3) if view_shape[axis] % multiple[axis]]
    if bad_axes:
        raise DesdError(f"view shape {view_shape} cannot be masked with patch {patch} and block {block}: "
                        f"each axis must be a multiple of {multiple} (patch, times the block on axes 1 and 2), "
                        f"axis {', '.join(map(str, bad_axes))} is not; change the view (patch) size, the mask "
                        f"patch or the mask ratio")


def packed_masking(x: Tensor, patch: Sequence[int] = DEFAULT_PATCH, block: int = 2,
                   generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """Keep one random patch per block x block in-plane group and pack the kept patches.

    x (N, C, A0, A1, A2) -> packed (N, C, A0, A1 / k, A2 / k), keep (N, G0, G1 / k, G2 / k) int64:
    keep = i1 * k + i2, the offset of the kept patch inside its block, drawn uniformly and independently
    per sample and block (from `generator`, which must live on x's device, if given).
    """
    if x.dim() != 5:
        raise ValueError(f"expected a batch of 3D views (N, C, A0, A1, A2), got shape {tuple(x.shape)}")
    check_maskable(x.shape[2:], patch, block)
    n, c, a0, a1, a2 = x.shape
    p0, p1, p2 = (int(p) for p in patch)
    k = int(block)
    g0, h1, h2 = a0 // p0, a1 // (k * p1), a2 // (k * p2)  # h = blocks per in-plane axis
    if k == 1:
        return x, torch.zeros(n, g0, h1, h2, dtype=torch.long, device=x.device)
    keep = torch.randint(0, k * k, (n, g0, h1, h2), generator=generator, device=x.device)

    # (N, C, G0, p0, H1, k, p1, H2, k, p2) -> (N, C, G0, H1, H2, k*k, p0*p1*p2): one row per patch of a block
    blocks = x.reshape(n, c, g0, p0, h1, k, p1, h2, k, p2).permute(0, 1, 2, 4, 7, 5, 8, 3, 6, 9)
    blocks = blocks.reshape(n, c, g0, h1, h2, k * k, p0 * p1 * p2)
    index = keep.view(n, 1, g0, h1, h2, 1, 1).expand(n, c, g0, h1, h2, 1, p0 * p1 * p2)
    kept = blocks.gather(5, index)  # (N, C, G0, H1, H2, 1, p0*p1*p2)

    # patch (g0, b1, b2) back to voxels: (N, C, G0, p0, H1, p1, H2, p2) -> (N, C, A0, A1/k, A2/k)
    packed = kept.view(n, c, g0, h1, h2, p0, p1, p2).permute(0, 1, 2, 5, 3, 6, 4, 7)
    return packed.reshape(n, c, a0, h1 * p1, h2 * p2), keep
