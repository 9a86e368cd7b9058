"""PVT-UNet: a PVTv2-b1-style 3D pyramid vision transformer encoder with nnU-Net's U-Net decoder (CADS's
downstream network, never released by its authors; built here from the paper's description).

``PVTUNet`` is named in plans (``network_class_name``, ``arch_kwargs``) and built by nnU-Net's
``get_network_from_plans``; ``default_arch_kwargs()`` gives PVTv2-b1. Its encoder has nnU-Net's interface
(``output_channels``, ``strides``, ``return_skips``); the decoder is nnU-Net's ``UNetDecoder``. A 2D input (a DRR)
takes ``encoder.drr_path`` into the same transformer blocks (``set_drr_path_trainable``).
Design (stages, blocks, the 2D path): docs/pvt_unet.md.
"""
from typing import List, Optional, Sequence

import torch
from dynamic_network_architectures.building_blocks.simple_conv_blocks import StackedConvBlocks
from dynamic_network_architectures.building_blocks.unet_decoder import UNetDecoder
from torch import Tensor, nn
from torch.nn import functional as F

from nnunetv2_desd.common.errors import DesdError

CLASS_NAME = 'nnunetv2_desd.architectures.pvt_unet.PVTUNet'
PVT_V2_B1 = dict(embed_dims=(64, 128, 320, 512), depths=(2, 2, 2, 2), num_heads=(1, 2, 5, 8),
                 mlp_ratios=(8, 8, 4, 4), sr_ratios=(8, 4, 2, 1))
CONV_STAGE_FEATURES = (32, 64)
STRIDES = ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2))


def default_arch_kwargs(embed_dims: Sequence[int] = PVT_V2_B1['embed_dims'],
                        conv_features: Sequence[int] = CONV_STAGE_FEATURES,
                        depths: Sequence[int] = PVT_V2_B1['depths'], num_heads: Sequence[int] = PVT_V2_B1['num_heads'],
                        mlp_ratios: Sequence[float] = PVT_V2_B1['mlp_ratios'],
                        sr_ratios: Sequence[int] = PVT_V2_B1['sr_ratios'],
                        strides: Optional[Sequence[Sequence[int]]] = None, drop_path_rate: float = 0.1) -> dict:
    """PVTUNet's ``arch_kwargs`` (JSON-ready) for the plans; the defaults are PVTv2-b1 with the (2, 4, 4) stem.
    Default strides: (1,1,1) for conv stage 0, (1,2,2) for the other conv stages, (2,2,2) per transformer stage."""
    if strides is None:
        strides = [(1, 1, 1)] + [(1, 2, 2)] * (len(conv_features) - 1) + [(2, 2, 2)] * len(embed_dims)
    kwargs = dict(
        n_stages=len(conv_features) + len(embed_dims),
        features_per_stage=[int(c) for c in (*conv_features, *embed_dims)],
        strides=[[int(s) for s in stride] for stride in strides],
        n_conv_per_stage=[2] * len(conv_features),
        depths=[int(d) for d in depths], num_heads=[int(h) for h in num_heads],
        mlp_ratios=[float(m) for m in mlp_ratios], sr_ratios=[int(r) for r in sr_ratios],
        n_conv_per_stage_decoder=[2] * (len(conv_features) + len(embed_dims) - 1),
        drop_path_rate=float(drop_path_rate), qkv_bias=True, drr_path=True,
    )
    check_arch_kwargs(**kwargs)
    return kwargs


def check_arch_kwargs(n_stages: int, features_per_stage, strides, n_conv_per_stage, depths, num_heads, mlp_ratios,
                      sr_ratios, n_conv_per_stage_decoder=2, **_) -> None:
    """DesdError naming the first inconsistency of PVTUNet's plans arguments."""
    def fail(message):
        raise DesdError(f'PVTUNet arch_kwargs: {message}')
    n_transformer = len(depths)
    if not (len(num_heads) == len(mlp_ratios) == len(sr_ratios) == n_transformer >= 1):
        fail(f'depths {list(depths)}, num_heads {list(num_heads)}, mlp_ratios {list(mlp_ratios)} and sr_ratios '
             f'{list(sr_ratios)} need one entry per transformer stage.')
    if len(features_per_stage) != n_stages or len(strides) != n_stages:
        fail(f'n_stages {n_stages} needs as many features_per_stage ({len(features_per_stage)}) and strides '
             f'({len(strides)}).')
    if len(n_conv_per_stage) != n_stages - n_transformer or len(n_conv_per_stage) < 1:
        fail(f'n_conv_per_stage {list(n_conv_per_stage)} needs one entry per conv stage: n_stages - len(depths) = '
             f'{n_stages - n_transformer}, at least 1 (the full-resolution stage).')
    if any(len(s) != 3 or min(s) < 1 for s in strides) or any(int(s) != 1 for s in strides[0]):
        fail(f'strides {[list(s) for s in strides]} must be 3D, positive, and [1, 1, 1] for stage 0 (the '
             f'decoder ends at full resolution).')
    for dim, heads in zip(features_per_stage[-n_transformer:], num_heads):
        if dim % heads:
            fail(f'transformer stage width {dim} is not divisible by its {heads} heads.')
    if min(sr_ratios) < 1 or min(depths) < 1 or min(n_conv_per_stage) < 1:
        fail('sr_ratios, depths and n_conv_per_stage must be >= 1.')
    if not isinstance(n_conv_per_stage_decoder, int) and len(n_conv_per_stage_decoder) != n_stages - 1:
        fail(f'n_conv_per_stage_decoder needs n_stages - 1 = {n_stages - 1} entries.')


def total_stride(strides: Sequence[Sequence[int]]) -> List[int]:
    """Per-axis product of the stage strides: every patch axis is padded to a multiple of it."""
    total = [1, 1, 1]
    for stride in strides:
        total = [t * int(s) for t, s in zip(total, stride)]
    return total


def flat_axis(x: Tensor) -> Optional[int]:
    """The spatial axis (0..2) of size 1 of a (B, C, a0, a1, a2) tensor, None for a volume."""
    flat = [a for a, n in enumerate(x.shape[2:]) if n == 1]
    if len(flat) > 1:
        raise DesdError(f'PVT encoder input {tuple(x.shape)} has {len(flat)} spatial axes of size 1; a volume has '
                        f'none, a 2D image (DRR) exactly one.')
    return flat[0] if flat else None


def replicate_pad_to_multiple(x: Tensor, multiple: int) -> Tensor:
    """(B, C, *grid) padded by edge replication, split evenly before/after, to a multiple of ``multiple`` per axis."""
    pads = []
    for n in reversed(x.shape[2:]):
        extra = -n % multiple
        pads += [extra // 2, extra - extra // 2]
    return F.pad(x, pads, mode='replicate') if any(pads) else x


def channel_layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """LayerNorm over the channels of a (B, C, *grid) map."""
    return norm(x.movedim(1, -1)).movedim(-1, 1)


class DropPath(nn.Module):
    """Stochastic depth: drops the residual branch of a whole sample with probability p (scaled by 1/(1-p))."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SpatialReductionAttention(nn.Module):
    """PVT's attention: softmax(Q K^T / sqrt(d)) V per head, Q from every token, K and V from the token grid
    reduced by an r^3 convolution of stride r (+ LayerNorm) when r > 1: N queries attend to ~N / r^3 keys."""

    def __init__(self, dim: int, heads: int, sr_ratio: int, qkv_bias: bool = True):
        super().__init__()
        self.heads, self.sr_ratio = heads, int(sr_ratio)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        if self.sr_ratio > 1:
            self.sr = nn.Conv3d(dim, dim, self.sr_ratio, self.sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, c // self.heads).transpose(1, 2)
        source = x
        if self.sr_ratio > 1:
            reduced = self.sr(replicate_pad_to_multiple(x.transpose(1, 2).reshape(b, c, *grid), self.sr_ratio))
            source = self.sr_norm(reduced.flatten(2).transpose(1, 2))
        k, v = self.kv(source).view(b, -1, 2, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ConvMlp(nn.Module):
    """PVTv2's feed-forward: Linear -> 3^3 depth-wise convolution on the grid (replicate padding) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv3d(hidden, hidden, 3, 1, 1, groups=hidden, padding_mode='replicate')
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        b, n, _ = x.shape
        x = self.fc1(x)
        x = self.dwconv(x.transpose(1, 2).reshape(b, -1, *grid)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class TransformerBlock(nn.Module):
    """x + DropPath(SRA(LN(x))), then x + DropPath(MLP(LN(x))): a PVTv2 block on tokens (B, N, C)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float, qkv_bias: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SpatialReductionAttention(dim, heads, sr_ratio, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ConvMlp(dim, int(round(dim * mlp_ratio)))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, grid: Sequence[int]) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x), grid))


class PatchEmbedding(nn.Module):
    """Overlapping patch embedding: 3^3 convolution with the stage's stride, then LayerNorm over channels."""

    def __init__(self, in_channels: int, dim: int, stride: Sequence[int]):
        super().__init__()
        self.conv = nn.Conv3d(in_channels, dim, 3, tuple(int(s) for s in stride), 1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return channel_layer_norm(self.norm, self.conv(x))


class TransformerStage(nn.Module):
    """Patch embedding, PVTv2 blocks, LayerNorm: (B, C_in, *grid) -> (B, dim, *grid / stride)."""

    def __init__(self, in_channels: int, dim: int, stride: Sequence[int], depth: int, heads: int, mlp_ratio: float,
                 sr_ratio: int, drop_paths: Sequence[float], qkv_bias: bool):
        super().__init__()
        self.embed = PatchEmbedding(in_channels, dim, stride)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, sr_ratio, p, qkv_bias)
                                    for p in drop_paths[:depth])
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.transform(self.embed(x))

    def transform(self, x: Tensor) -> Tensor:
        """The blocks and the final norm on an embedded map (B, dim, *grid); shared by the 3D and 2D paths."""
        b, c, *grid = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            tokens = block(tokens, grid)
        return self.norm(tokens).transpose(1, 2).reshape(b, c, *grid)


# ------------------------------------------------------------------------------------------------------- 2D path
class FlatConv(nn.Module):
    """A k x k 2D convolution (padding k // 2) on a (B, C, a0, a1, a2) map with one axis of size 1: the map is
    convolved on its two other axes, with the given 3D stride's entries for those axes."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.kaiming_normal_(self.weight, a=1e-2)

    def forward(self, x: Tensor, axis: int, stride: Sequence[int]) -> Tensor:
        plane_stride = [int(s) for a, s in enumerate(stride) if a != axis]
        y = F.conv2d(x.squeeze(2 + axis), self.weight, self.bias, plane_stride, self.weight.shape[-1] // 2)
        return y.unsqueeze(2 + axis)


class FlatConvStage(nn.Module):
    """2D counterpart of a conv stage: (FlatConv, instance norm, leaky ReLU) x n, the first with the stage's stride."""

    def __init__(self, in_channels: int, out_channels: int, n_convs: int):
        super().__init__()
        self.convs = nn.ModuleList(FlatConv(in_channels if i == 0 else out_channels, out_channels)
                                   for i in range(n_convs))
        self.norms = nn.ModuleList(nn.InstanceNorm3d(out_channels, eps=1e-5, affine=True) for _ in range(n_convs))

    def forward(self, x: Tensor, axis: int, stride: Sequence[int]) -> Tensor:
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x = F.leaky_relu(norm(conv(x, axis, stride if i == 0 else (1, 1, 1))), 1e-2)
        return x


class FlatPatchEmbedding(nn.Module):
    """2D counterpart of a patch embedding: FlatConv with the stage's stride, LayerNorm over channels."""

    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.conv = FlatConv(in_channels, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, axis: int, stride: Sequence[int]) -> Tensor:
        return channel_layer_norm(self.norm, self.conv(x, axis, stride))


class DrrPath(nn.Module):
    """The parallel 2D embeddings: ``stages[s]`` replaces encoder stage s's conv blocks or patch embedding."""

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], n_conv_per_stage: Sequence[int]):
        super().__init__()
        stages, previous = [], input_channels
        for s, features in enumerate(features_per_stage):
            stages.append(FlatConvStage(previous, features, n_conv_per_stage[s]) if s < len(n_conv_per_stage)
                          else FlatPatchEmbedding(previous, features))
            previous = features
        self.stages = nn.ModuleList(stages)


# ------------------------------------------------------------------------------------------------------- encoder
class PVTEncoder(nn.Module):
    """Conv stages then transformer stages; forward(x) -> per-stage features (``return_skips``) or the deepest.

    Carries the attributes nnU-Net's ``UNetDecoder`` reads (``output_channels``, ``strides``, ``kernel_sizes``,
    ``conv_op``, norms, non-linearity) and that our pre-training heads read (``output_channels``, ``return_skips``).
    """

    def __init__(self, input_channels: int, features_per_stage: Sequence[int], strides: Sequence[Sequence[int]],
                 n_conv_per_stage: Sequence[int], depths: Sequence[int], num_heads: Sequence[int],
                 mlp_ratios: Sequence[float], sr_ratios: Sequence[int], drop_path_rate: float = 0.1,
                 qkv_bias: bool = True, drr_path: bool = True, return_skips: bool = False):
        super().__init__()
        self.output_channels = [int(c) for c in features_per_stage]
        self.strides = [tuple(int(s) for s in stride) for stride in strides]
        self.kernel_sizes = [[3, 3, 3] for _ in self.strides]
        self.conv_op, self.conv_bias = nn.Conv3d, True
        self.norm_op, self.norm_op_kwargs = nn.InstanceNorm3d, {'eps': 1e-5, 'affine': True}
        self.dropout_op, self.dropout_op_kwargs = None, None
        self.nonlin, self.nonlin_kwargs = nn.LeakyReLU, {'inplace': True}
        self.return_skips = return_skips
        self.n_conv_stages = len(n_conv_per_stage)

        n_blocks = int(sum(depths))  # stochastic depth rising linearly from 0 to drop_path_rate over the blocks
        rates = [float(drop_path_rate) * i / max(1, n_blocks - 1) for i in range(n_blocks)]
        stages, previous = [], int(input_channels)
        for s, features in enumerate(self.output_channels):
            if s < self.n_conv_stages:
                stages.append(StackedConvBlocks(int(n_conv_per_stage[s]), nn.Conv3d, previous, features, 3,
                                                self.strides[s], self.conv_bias, self.norm_op, self.norm_op_kwargs,
                                                None, None, self.nonlin, self.nonlin_kwargs))
            else:
                t = s - self.n_conv_stages
                first = int(sum(depths[:t]))
                stages.append(TransformerStage(previous, features, self.strides[s], int(depths[t]), int(num_heads[t]),
                                               float(mlp_ratios[t]), int(sr_ratios[t]), rates[first:], qkv_bias))
            previous = features
        self.stages = nn.ModuleList(stages)  # registered first: stages.0 holds the stem's first convolution
        self.drr_path = DrrPath(int(input_channels), self.output_channels, n_conv_per_stage) if drr_path else None

    def set_drr_path_trainable(self, trainable: bool) -> None:
        if self.drr_path is not None:
            self.drr_path.requires_grad_(trainable)

    def forward(self, x: Tensor):
        image_2d = x.dim() == 4
        if image_2d:
            x = x.unsqueeze(2)  # a plain 2D image: the in-plane axes 1, 2 and their strides
        axis = flat_axis(x)
        if axis is not None and self.drr_path is None:
            raise DesdError(f'input {tuple(x.shape)} is 2D, but this PVT encoder was built without a 2D path '
                            f'(arch_kwargs drr_path false).')
        features = []
        for s, stage in enumerate(self.stages):
            if axis is None:
                x = stage(x)
            else:
                x = self.drr_path.stages[s](x, axis, self.strides[s])
                if s >= self.n_conv_stages:
                    x = stage.transform(x)
            features.append(x)
        if image_2d:
            features = [f.squeeze(2) for f in features]
        return features if self.return_skips else features[-1]


# ----------------------------------------------------------------------------------------------------- network
class PVTUNet(nn.Module):
    """PVT encoder + nnU-Net's U-Net decoder, built with nnU-Net's signature (input_channels, num_classes, **kwargs).

    forward(x (B, C, *patch)) -> logits (B, num_classes, *patch), or with ``decoder.deep_supervision`` the list of
    logits at scales 1, 1/strides[1], 1/(strides[1] strides[2]), ... (highest resolution first), nnU-Net's order.
    Transformer fine-tuning prefers AdamW: ``preferred_optimizer`` tells the fine-tuning trainers.
    """
    preferred_optimizer = 'adamw'

    def __init__(self, input_channels: int, num_classes: int, n_stages: int = 6,
                 features_per_stage: Sequence[int] = (*CONV_STAGE_FEATURES, *PVT_V2_B1['embed_dims']),
                 strides: Sequence[Sequence[int]] = STRIDES, n_conv_per_stage: Sequence[int] = (2, 2),
                 depths: Sequence[int] = PVT_V2_B1['depths'], num_heads: Sequence[int] = PVT_V2_B1['num_heads'],
                 mlp_ratios: Sequence[float] = PVT_V2_B1['mlp_ratios'],
                 sr_ratios: Sequence[int] = PVT_V2_B1['sr_ratios'], n_conv_per_stage_decoder=2,
                 drop_path_rate: float = 0.1, qkv_bias: bool = True, drr_path: bool = True,
                 deep_supervision: bool = False):
        super().__init__()
        check_arch_kwargs(n_stages, features_per_stage, strides, n_conv_per_stage, depths, num_heads, mlp_ratios,
                          sr_ratios, n_conv_per_stage_decoder)
        self.encoder = PVTEncoder(input_channels, features_per_stage, strides, n_conv_per_stage, depths, num_heads,
                                  mlp_ratios, sr_ratios, drop_path_rate, qkv_bias, drr_path, return_skips=True)
        self.decoder = UNetDecoder(self.encoder, num_classes, n_conv_per_stage_decoder, deep_supervision)
        self.total_stride = total_stride(self.encoder.strides)
        self.apply(self.initialize)
        self.encoder.set_drr_path_trainable(False)  # segmentation never runs it

    def forward(self, x: Tensor):
        size = list(x.shape[2:])
        padded = [-(-n // t) * t for n, t in zip(size, self.total_stride)]
        if padded != size:  # zero padding at the end of each axis, cropped off again below
            x = F.pad(x, [p for n, m in zip(reversed(size), reversed(padded)) for p in (0, m - n)])
        out = self.decoder(self.encoder(x))
        if padded == size:
            return out
        if not isinstance(out, (list, tuple)):
            return out[(...,) + tuple(slice(0, n) for n in size)]
        cropped, scale = [], [1, 1, 1]
        for i, logits in enumerate(out):
            scale = [a * int(b) for a, b in zip(scale, self.encoder.strides[i])]
            cropped.append(logits[(...,) + tuple(slice(0, -(-n // s)) for n, s in zip(size, scale))])
        return cropped

    @staticmethod
    def initialize(module: nn.Module) -> None:
        """nnU-Net's He init for convolutions (a = 1e-2), PVT's truncated normal (std 0.02) for linear layers."""
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, FlatConv)):
            nn.init.kaiming_normal_(module.weight, a=1e-2)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
