"""Two strongly augmented 3D views per volume (DeSD), built from batchgeneratorsv2 transforms.

nnU-Net's data loader crops a context region of ``context_factor * patch`` voxels around a random location
and applies one transform per sample. ``TwoViews`` runs an independent random pipeline twice on that region
(random crop position and scale, flips, noise, blur, brightness, contrast, gamma: all in true 3D) and
concatenates the two views along the channel axis, so nnU-Net's loader batches them unchanged:
``batch['data']`` is (B, 2C, X, Y, Z); ``split_views`` turns it into (2, B, C, X, Y, Z).
"""
from typing import Sequence, Tuple

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.random import RandomTransform

CONTEXT_FACTOR = 1.5  # the loader's region is 1.5x the patch; both views are cropped from it


def context_patch_size(patch_size: Sequence[int]) -> Tuple[int, ...]:
    return tuple(int(np.ceil(p * CONTEXT_FACTOR)) for p in patch_size)


def desd_view_pipeline(patch_size: Sequence[int], scaling: RandomScalar = (0.7, 1.4),
                       p_intensity: float = 0.5) -> ComposeTransforms:
    """One random view: random crop + scale, flips on all axes, then noise/blur/brightness/contrast/gamma."""
    patch_size = tuple(int(p) for p in patch_size)
    return ComposeTransforms([
        SpatialTransform(patch_size, patch_center_dist_from_border=[p // 2 for p in patch_size], random_crop=True,
                         p_elastic_deform=0, p_rotation=0, p_scaling=0.5, scaling=scaling,
                         p_synchronize_scaling_across_axes=1, border_mode_seg='constant', padding_value_seg=-1),
        MirrorTransform(allowed_axes=(0, 1, 2)),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
                        apply_probability=p_intensity),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.0), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=p_intensity),
        RandomTransform(MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)),
                                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p_intensity),
        RandomTransform(ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True,
                                          synchronize_channels=False, p_per_channel=1),
                        apply_probability=p_intensity),
        RandomTransform(GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=p_intensity),
    ])


class TwoViews(BasicTransform):
    """Applies ``pipeline`` twice, independently, to one sample; views are stacked on the channel axis."""

    def __init__(self, pipeline: BasicTransform, n_views: int = 2):
        super().__init__()
        self.pipeline = pipeline
        self.n_views = n_views

    def apply(self, data_dict, **params):
        views = [self.pipeline(image=data_dict['image'].clone(), segmentation=data_dict['segmentation'].clone())
                 for _ in range(self.n_views)]
        return {'image': torch.cat([v['image'] for v in views]), 'segmentation': views[0]['segmentation']}


def split_views(batch_data: torch.Tensor, n_views: int = 2) -> torch.Tensor:
    """(B, V*C, *spatial) -> (V, B, C, *spatial)."""
    b, vc = batch_data.shape[:2]
    return batch_data.view(b, n_views, vc // n_views, *batch_data.shape[2:]).transpose(0, 1)
