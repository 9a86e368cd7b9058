"""The nnU-Net-planned network and the encoder view of it that self-distillation trains.

One way to build a network from plans: nnU-Net's ``get_network_from_plans``, called with the arguments
``nnUNetTrainer.build_network_architecture`` gives it for training and prediction, so parameter names match the
fine-tuning network (PlainConvUNet ``encoder.stages.*``, ResidualEncoderUNet ``encoder.stem`` + ``encoder.stages.*``).
"""
from typing import List, Optional, Sequence

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.pretraining.heads import ProjectionHead, global_average_pool

DEFAULT_NUM_DISTILLED_STAGES = 4  # DeSD distils the four stages of its ResNet-50


def build_planned_network(plans_manager, configuration_manager, num_input_channels: int,
                          num_output_channels: int) -> nn.Module:
    """The plans' network with deep supervision, as nnU-Net 2.8.1's trainer builds it, without importing the trainer
    module (seaborn and more: about 0.7 s of CPU per desd_pretrain process)."""
    return get_network_from_plans(configuration_manager.network_arch_class_name,
                                  configuration_manager.network_arch_init_kwargs,
                                  configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                  num_output_channels, allow_init=True, deep_supervision=True)


def planned_patch(patch_size: Optional[Sequence[int]], configuration_manager) -> List[int]:
    """The training patch: ``patch_size`` (``--patch-size``) or the plans'; DesdError unless every axis is a multiple
    of the encoder's total stride."""
    patch = [int(p) for p in (patch_size or configuration_manager.patch_size)]
    stride = np.prod(np.asarray(configuration_manager.pool_op_kernel_sizes), axis=0)
    if any(p % int(s) for p, s in zip(patch, stride)):
        raise DesdError(f'--patch-size {" ".join(map(str, patch))}: the encoder downsamples by '
                        f'{" x ".join(str(int(s)) for s in stride)}; use multiples of these.')
    return patch


def planned_encoder(network: nn.Module, drr_path: bool = True) -> nn.Module:
    """``network.encoder`` returning every stage's features. An encoder with a separate 2D path for radiographs
    (PVT-UNet's, frozen in the segmentation network) gets it trainable when ``drr_path`` (CADS), frozen otherwise."""
    encoder = getattr(network, 'encoder', None)
    if encoder is None or not hasattr(encoder, 'output_channels'):
        raise DesdError(f'{type(network).__name__} has no nnU-Net encoder (network.encoder with output_channels).')
    encoder.return_skips = True  # every stage's output, not only the deepest
    if hasattr(encoder, 'set_drr_path_trainable'):
        encoder.set_drr_path_trainable(drr_path)
    return encoder


def resolve_stages(num_stages: int, stages: Optional[Sequence[int]]) -> List[int]:
    """Default: the deepest four stages. Negative indices count from the deepest stage."""
    if not stages:
        return list(range(max(0, num_stages - DEFAULT_NUM_DISTILLED_STAGES), num_stages))
    resolved = sorted({s % num_stages if -num_stages <= s < num_stages else -1 for s in stages})
    if resolved[0] < 0:
        raise DesdError(f'--stages {list(stages)}: the encoder has stages 0..{num_stages - 1}.')
    if resolved[-1] != num_stages - 1:
        raise DesdError(f'--stages {list(stages)} must include the deepest stage {num_stages - 1}: '
                        f'the teacher target comes from it.')
    return resolved


class MultiStageDistillationNetwork(nn.Module):
    """Encoder + one projection head per selected stage.

    forward(x_1, ..., x_n) with x_i (N_i, C, *spatial_i) -> logits (D, N_1 + ... + N_n, K), D = number of selected
    stages (shallow to deep), rows in input order. Inputs of different shapes (CADS: packed 3D views and DRRs)
    pass the encoder separately, in one call (one DDP forward); their pooled features then go through each
    head together, once (one batch norm over all rows; the normalised prototypes are computed once per step).
    The student selects the distilled stages, the teacher only the deepest.
    """

    def __init__(self, encoder: nn.Module, stages: Sequence[int], out_dim: int, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm: str = 'batch'):
        super().__init__()
        self.encoder = encoder
        self.stages = list(stages)
        self.heads = nn.ModuleList(ProjectionHead(encoder.output_channels[s], out_dim, hidden_dim, bottleneck_dim,
                                                  norm) for s in self.stages)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        pooled = [[] for _ in self.stages]
        for x in inputs:
            features = self.encoder(x)
            for i, s in enumerate(self.stages):
                pooled[i].append(global_average_pool(features[s]))
        return torch.stack([head(torch.cat(rows)) for rows, head in zip(pooled, self.heads)])
