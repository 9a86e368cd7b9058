"""Training-memory estimates without a GPU: autograd's saved tensors of one forward pass on the meta device.

nnU-Net sizes its U-Net's patch and batch by feature-map elements (``compute_conv_feature_map_size``); a transformer
has no such count, so its saved bytes are converted to nnU-Net's units through its reference PlainConvUNet and then
nnU-Net's batch rule applies. Meta tensors carry shapes only, so this takes well under a second on a CPU.
The formulas: docs/pvt_unet.md.
"""
import math
from functools import lru_cache
from typing import Callable, Sequence

import torch
from torch import nn

REFERENCE_FEATURE_MAP_ELEMENTS = 560_000_000  # nnU-Net ExperimentPlanner.UNet_reference_val_3d
REFERENCE_GB = 8                              # ... UNet_reference_val_corresp_GB
REFERENCE_BATCH = 2                           # ... UNet_reference_val_corresp_bs_3d
MIN_BATCH, MAX_DATASET_COVERED = 2, 0.05      # ... UNet_min_batch_size, max_dataset_covered
REFERENCE_PATCH = (128, 128, 128)


def saved_activation_bytes(build: Callable[[], nn.Module], input_shape: Sequence[int]) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward of ``build()`` (built on the meta
    device) on a (B, C, *patch) input: parameters excluded, views of one tensor counted once."""
    with torch.device('meta'):
        network = build()
    network.train()
    parameters = {id(p) for p in network.parameters()}
    kept = {}

    def pack(t: torch.Tensor):
        base = t if t._base is None else t._base
        if id(base) not in parameters:
            kept[id(base)] = base  # the reference keeps the id unique while counting
        return t

    x = torch.zeros(*input_shape, device='meta', requires_grad=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return int(sum(t.numel() * t.element_size() for t in kept.values()))


def reference_unet(input_channels: int = 1, num_classes: int = 2, deep_supervision: bool = True) -> nn.Module:
    """The PlainConvUNet nnU-Net's default planner makes for an isotropic 128^3 patch."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    return PlainConvUNet(input_channels, 6, (32, 64, 128, 256, 320, 320), nn.Conv3d, 3,
                         (1, 2, 2, 2, 2, 2), (2, 2, 2, 2, 2, 2), num_classes, (2, 2, 2, 2, 2), True,
                         nn.InstanceNorm3d, {'eps': 1e-5, 'affine': True}, None, None, nn.LeakyReLU,
                         {'inplace': True}, deep_supervision=deep_supervision)


@lru_cache(maxsize=1)
def bytes_per_feature_map_element() -> float:
    """kappa: saved bytes per element of nnU-Net's feature-map count, for its reference U-Net."""
    unet = reference_unet()
    saved = saved_activation_bytes(reference_unet, (1, 1, *REFERENCE_PATCH))
    return saved / float(unet.compute_conv_feature_map_size(REFERENCE_PATCH))


def equivalent_feature_map_elements(build: Callable[[], nn.Module], input_channels: int,
                                    patch: Sequence[int]) -> float:
    """Per-sample training memory of ``build()`` at ``patch``, in nnU-Net's feature-map elements."""
    return saved_activation_bytes(build, (1, input_channels, *patch)) / bytes_per_feature_map_element()


def nnunet_batch_size(equivalent_elements: float, gpu_memory_gb: float, patch: Sequence[int],
                      dataset_voxels: float) -> int:
    """nnU-Net's batch rule: round(reference * GB / 8 / estimate * 2), capped at 5 % of the dataset, at least 2."""
    reference = REFERENCE_FEATURE_MAP_ELEMENTS * gpu_memory_gb / REFERENCE_GB
    batch = round(reference / equivalent_elements * REFERENCE_BATCH)
    cap = dataset_voxels * MAX_DATASET_COVERED / math.prod(int(p) for p in patch)
    return int(max(min(batch, round(cap) if math.isfinite(cap) else batch), MIN_BATCH))


def fits(equivalent_elements: float, gpu_memory_gb: float) -> bool:
    """nnU-Net's patch condition: batch 2 fits the memory target (the reference count is for batch 2)."""
    return equivalent_elements <= REFERENCE_FEATURE_MAP_ELEMENTS * gpu_memory_gb / REFERENCE_GB
