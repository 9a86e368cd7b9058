"""CADS packed masking, checked voxel by voxel against an explicit loop reconstruction from `keep`."""
import itertools

import pytest
import torch

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.pretraining.views.masking import block_for_ratio, check_maskable, mask_ratio, packed_masking


def arange_views(n, c, shape, dtype=torch.float64):
    """Every voxel holds its own flat index in x: a packed value tells where it came from."""
    return torch.arange(n * c * shape[0] * shape[1] * shape[2], dtype=dtype).reshape(n, c, *shape)


def loop_pack(x, keep, patch, block):
    """Reference: copy the kept patch of every block to its packed position, one patch at a time."""
    n, c, a0, a1, a2 = x.shape
    p0, p1, p2 = patch
    out = torch.full((n, c, a0, a1 // block, a2 // block), float('nan'), dtype=x.dtype)
    for s, g0, b1, b2 in itertools.product(range(n), range(a0 // p0), range(a1 // (block * p1)),
                                           range(a2 // (block * p2))):
        i1, i2 = divmod(int(keep[s, g0, b1, b2]), block)
        j1, j2 = b1 * block + i1, b2 * block + i2  # source patch on the (G1, G2) grid
        out[s, :, g0 * p0:(g0 + 1) * p0, b1 * p1:(b1 + 1) * p1, b2 * p2:(b2 + 1) * p2] = \
            x[s, :, g0 * p0:(g0 + 1) * p0, j1 * p1:(j1 + 1) * p1, j2 * p2:(j2 + 1) * p2]
    return out


def patch_of_voxel(flat_index, shape, patch):
    """(sample*channel, g0, g1, g2) of the patch that holds x.flatten()[flat_index]."""
    a0, a1, a2 = shape
    a2_idx, rest = flat_index % a2, flat_index // a2
    a1_idx, rest = rest % a1, rest // a1
    a0_idx, nc = rest % a0, rest // a0
    return nc, a0_idx // patch[0], a1_idx // patch[1], a2_idx // patch[2]


@pytest.mark.parametrize("n, c, shape, patch, block", [
    (2, 2, (8, 32, 32), (4, 8, 8), 2),   # CADS default patch
    (3, 1, (4, 12, 16), (2, 3, 4), 2),   # anisotropic patch: catches swapped axes
    (2, 1, (2, 9, 18), (1, 3, 2), 3),    # block 3 (88.9 % masked)
])
def test_packed_voxels_match_loop_reconstruction(n, c, shape, patch, block):
    x = arange_views(n, c, shape)
    packed, keep = packed_masking(x, patch, block, generator=torch.Generator().manual_seed(0))
    g0, g1, g2 = (a // p for a, p in zip(shape, patch))
    assert packed.shape == (n, c, shape[0], shape[1] // block, shape[2] // block)
    assert keep.shape == (n, g0, g1 // block, g2 // block) and keep.dtype == torch.int64
    assert keep.min() >= 0 and keep.max() < block ** 2
    assert torch.equal(packed, loop_pack(x, keep, patch, block))

    # 1/k^2 of the voxels, none twice
    values = packed.flatten().long()
    assert values.numel() * block ** 2 == x.numel()
    assert values.unique().numel() == values.numel()
    # each packed patch is one whole source patch; source patches are distinct, one per block
    nc, s0, s1, s2 = patch_of_voxel(values, shape, patch)
    src = torch.stack([nc, s0, s1, s2], dim=-1).reshape(n * c, shape[0], shape[1] // block, shape[2] // block, 4)
    per_patch = src.reshape(n * c, g0, patch[0], g1 // block, patch[1], g2 // block, patch[2], 4)
    per_patch = per_patch.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, patch[0] * patch[1] * patch[2], 4)
    assert (per_patch == per_patch[:, :1]).all()                    # one source patch per packed patch
    sources = per_patch[:, 0]
    assert sources.unique(dim=0).shape[0] == sources.shape[0]       # distinct source patches
    blocks_of_sources = torch.stack([sources[:, 0], sources[:, 1], sources[:, 2] // block, sources[:, 3] // block], 1)
    assert blocks_of_sources.unique(dim=0).shape[0] == sources.shape[0]  # every block gives exactly one


def test_channels_share_the_draw():
    x = arange_views(2, 1, (4, 16, 16))
    x = torch.cat([x, x + 1000.0], dim=1)  # channel 1 = channel 0 + 1000
    packed, _ = packed_masking(x, (2, 4, 4), 2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(packed[:, 1], packed[:, 0] + 1000.0)


def test_draws_are_per_sample_per_block_seeded_and_uniform():
    x = torch.zeros(4, 1, 4, 16, 16)
    gen = torch.Generator().manual_seed(1)
    _, keep = packed_masking(x, (2, 4, 4), 2, generator=gen)  # 2 x 2 x 2 = 8 blocks per sample
    assert all(not torch.equal(keep[i], keep[j]) for i in range(4) for j in range(i))  # P(equal) = 4^-8 each
    assert len(keep[0].unique()) > 1  # not one offset for the whole view
    _, again = packed_masking(x, (2, 4, 4), 2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(keep, again)
    _, next_draw = packed_masking(x, (2, 4, 4), 2, generator=gen)
    assert not torch.equal(keep, next_draw)
    # uniform over the 4 offsets: 16384 draws, each share within 0.02 of 1/4 (~6 standard deviations)
    _, many = packed_masking(torch.zeros(4, 1, 16, 128, 128), (1, 4, 4), 2,
                             generator=torch.Generator().manual_seed(2))
    shares = torch.bincount(many.flatten(), minlength=4).double() / many.numel()
    assert many.numel() == 16384 and torch.allclose(shares, torch.full((4,), 0.25, dtype=torch.float64), atol=0.02)


def test_block_one_is_identity():
    x = torch.randn(2, 1, 8, 16, 16)
    packed, keep = packed_masking(x, (4, 8, 8), 1)
    assert packed is x
    assert keep.shape == (2, 2, 2, 2) and keep.dtype == torch.int64 and not keep.any()


def test_gradient_is_one_on_kept_voxels_zero_elsewhere():
    x = arange_views(2, 2, (4, 12, 16)).requires_grad_()
    packed, keep = packed_masking(x, (2, 3, 4), 2, generator=torch.Generator().manual_seed(5))
    packed.sum().backward(retain_graph=True)
    kept = torch.zeros_like(x, dtype=torch.bool)
    for s, g0, b1, b2 in itertools.product(*(range(d) for d in keep.shape)):
        i1, i2 = divmod(int(keep[s, g0, b1, b2]), 2)
        j1, j2 = 2 * b1 + i1, 2 * b2 + i2
        kept[s, :, 2 * g0:2 * g0 + 2, 3 * j1:3 * j1 + 3, 4 * j2:4 * j2 + 4] = True
    assert kept.sum() * 4 == x.numel()
    assert torch.equal(x.grad, kept.double())
    # a weighted sum sends each packed weight back to the voxel it came from
    x.grad = None
    weights = torch.randn(packed.shape, dtype=torch.float64)
    (packed * weights).sum().backward()
    assert torch.equal(x.grad.flatten()[packed.detach().flatten().long()], weights.flatten())
    assert x.grad[~kept].abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_any_float_dtype(dtype):
    x = torch.randn(2, 1, 4, 16, 16)
    ref, ref_keep = packed_masking(x, (2, 4, 4), 2, generator=torch.Generator().manual_seed(7))
    packed, keep = packed_masking(x.to(dtype), (2, 4, 4), 2, generator=torch.Generator().manual_seed(7))
    assert packed.dtype == dtype and torch.equal(keep, ref_keep) and torch.equal(packed, ref.to(dtype))


@pytest.mark.cuda
def test_cuda_matches_loop_reconstruction():
    x = arange_views(2, 1, (4, 12, 16), dtype=torch.float32).cuda().requires_grad_()
    packed, keep = packed_masking(x, (2, 3, 4), 2, generator=torch.Generator('cuda').manual_seed(0))
    assert packed.is_cuda and keep.is_cuda
    assert torch.equal(packed.detach().cpu(), loop_pack(x.detach().cpu(), keep.cpu(), (2, 3, 4), 2))
    packed.sum().backward()
    assert x.grad.sum().item() == x.numel() / 4


def test_ratio_block_mapping():
    assert [block_for_ratio(r) for r in (0, 0.0, 0.75, 0.8889, 0.9375, 0.96)] == [1, 1, 2, 3, 4, 5]
    assert block_for_ratio(8 / 9) == 3 and block_for_ratio(0.7505) == 2
    assert [mask_ratio(k) for k in (1, 2, 4)] == [0.0, 0.75, 0.9375]
    for bad in (0.5, 0.7, 0.752, 0.9, 1.0, -0.25, float('nan'), "high"):
        with pytest.raises(DesdError, match=r"0\.75, 0\.8889, 0\.9375"):
            block_for_ratio(bad)


def test_check_maskable():
    check_maskable((16, 96, 96), (4, 8, 8), 2)   # DeSD/CADS input 1 x 16 x 96 x 96
    check_maskable((16, 96, 96), (4, 8, 8), 3)   # 12 patches per axis, 4 blocks of 3
    check_maskable((4, 24, 24), (4, 8, 8), 1)    # no block constraint
    with pytest.raises(DesdError, match=r"\(18, 96, 96\).*\(4, 8, 8\).*multiple of \(4, 16, 16\).*axis 0"):
        check_maskable((18, 96, 96), (4, 8, 8), 2)    # depth not a multiple of the patch
    with pytest.raises(DesdError, match=r"multiple of \(4, 16, 16\).*axis 1, 2"):
        check_maskable((16, 40, 40), (4, 8, 8), 2)    # 5 x 5 patches in-plane: not whole 2 x 2 blocks
    with pytest.raises(DesdError, match=r"multiple of \(4, 24, 24\).*axis 2"):
        check_maskable((16, 96, 84), (4, 8, 8), 3)
    with pytest.raises(DesdError, match="3D view shape"):
        check_maskable((96, 96), (4, 8, 8), 2)
    with pytest.raises(DesdError, match="block"):
        check_maskable((16, 96, 96), (4, 8, 8), 0)
    with pytest.raises(DesdError, match=r"\(8, 40, 32\)"):
        packed_masking(torch.zeros(1, 1, 8, 40, 32))
    with pytest.raises(ValueError, match="N, C, A0, A1, A2"):
        packed_masking(torch.zeros(1, 8, 32, 32))
