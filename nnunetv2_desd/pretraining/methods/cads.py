"""CADS (IEEE TMI 2024): DeSD plus distillation from the 3D teacher into the X-ray branch, on packed masked views.

The encoder is the nnU-Net-planned 3D encoder for both modalities. A DRR enters it as a volume of size 1 on the
projection axis: with zero padding every 3x3x3 convolution then sees only its kernel's centre slice on that
axis, so the 2D path is the 3D path with its weights tied (the same parameter tensors, no copies).
"""
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.drrs import drr_axes, require_ct, write_drrs
from nnunetv2_desd.pretraining.methods.base import PretrainingMethod
from nnunetv2_desd.pretraining.views.augmentation import split_views
from nnunetv2_desd.pretraining.views.masking import block_for_ratio, check_maskable, packed_masking

# student inputs [view 1, view 2, DRR]; teacher views [view 1, view 2]
CADS_PAIRS: List[Tuple[int, int]] = [(0, 1), (0, 2), (1, 0), (1, 2)]


def deepest_size(input_size: Sequence[int], strides: Sequence[Sequence[int]]) -> List[int]:
    """Spatial size after every stride of the encoder (a stride-s convolution maps n voxels to ceil(n / s))."""
    size = [int(n) for n in input_size]
    for stride in strides:
        size = [-(-n // int(s)) for n, s in zip(size, stride)]
    return size


class CADS(PretrainingMethod):
    """CADS's inputs: both 3D views masked and packed (teacher and student alike), plus the volume's DRR.

    inputs(batch) -> teacher input (2B, C, *packed) and the student inputs ((2B, C, *packed), (B, C, *drr)), so
    student logits come back as (D, S = 3, B, K) over [view 1, view 2, DRR]; pairs CADS_PAIRS. Every view
    draws its own kept patches.
    """
    name = 'cads'
    official_settings = dict(epochs=150, optimizer='adamw', lr=7.5e-4, min_lr=2e-6, weight_decay=0.04,
                             weight_decay_end=0.4, clip_grad=0.3, freeze_last_layer_epochs=3,
                             warmup_teacher_temp_epochs=50)
    drr_path = True
    n_student_inputs = 3
    pairs = CADS_PAIRS

    def __init__(self, mask_ratio: float, mask_patch: Sequence[int]):
        self.mask_ratio = float(mask_ratio)
        self.mask_patch = tuple(int(p) for p in mask_patch)
        self.block = block_for_ratio(mask_ratio)

    @classmethod
    def check_before_preparing(cls, cfg, raw) -> None:
        """CT only (a DRR projects Hounsfield units) and a mask ratio the packing can realise."""
        block_for_ratio(cfg.mask_ratio)
        require_ct(raw.dataset_json['channel_names'], raw.name)

    @classmethod
    def prepare(cls, cfg, prepared, raw, share: Tuple[int, int] = (0, 1)) -> None:
        prepared.drr_files = write_drrs(prepared, cfg.drr_view, cfg.drr_attenuation, cfg.num_preprocessing_processes,
                                        raw, *share)

    @classmethod
    def build(cls, cfg, prepared, patch_size: Sequence[int]) -> 'CADS':
        method = cls(cfg.mask_ratio, cfg.mask_patch)
        axes = set()  # from the DRR ledgers of the pool's datasets (or of one prepared dataset): no DRR is opened
        for member in getattr(prepared, 'members', [prepared]):
            axes.update(drr_axes(member, cfg.drr_view, cfg.drr_attenuation).values())
        method.check(patch_size, prepared.configuration_manager.pool_op_kernel_sizes, sorted(axes))
        return method

    def check(self, patch_size: Sequence[int], strides: Sequence[Sequence[int]], projection_axes: Sequence[int]):
        """Refuses a patch the masking cannot split, or inputs that reach the deepest stage as one voxel
        (instance norm needs more than one)."""
        patch_size = [int(p) for p in patch_size]
        if self.block > 1:
            check_maskable(patch_size, self.mask_patch, self.block)
        packed = [patch_size[0], patch_size[1] // self.block, patch_size[2] // self.block]
        inputs = {'the packed 3D view': packed}
        for axis in sorted(set(projection_axes)):
            inputs[f'the DRR (projected along axis {axis})'] = [1 if i == axis else p for i, p in enumerate(patch_size)]
        for name, size in inputs.items():
            if np.prod(deepest_size(size, strides)) < 2:
                raise DesdError(f'{name} ({"x".join(map(str, size))} voxels for patch '
                                f'{"x".join(map(str, patch_size))}) reaches the deepest encoder stage as a single '
                                f'voxel, where instance norm is undefined; use a larger --patch-size or a smaller '
                                f'--mask-ratio.')

    def inputs(self, batch: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        views = split_views(batch['data'].to(device, non_blocking=True)).flatten(0, 1)
        packed, _ = packed_masking(views, self.mask_patch, self.block)
        return packed, (packed, batch['drr'].to(device, non_blocking=True))

    def metadata(self) -> dict:
        return {'mask_ratio': self.mask_ratio, 'mask_patch': list(self.mask_patch)}
