"""What the engine asks of a pre-training method: its checks, data, inputs, gradients, parameters, loaders, export.

The engine (``engine/loop.py``) calls these hooks and knows no method by name. The defaults are plain
self-distillation: the student's loss, one backward (scaled under AMP), DDP's gradient averaging.
"""
from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from nnunetv2_desd.pretraining.distributed import check_finite_everywhere, nan_unless_finite


class PretrainingMethod:
    name: str = ''
    official_settings: Dict[str, object] = {}  # what the method's published run changes in PretrainConfig
    exclusive_options: Tuple[str, ...] = ()  # PretrainConfig fields (None unless given) only this method reads
    drr_path = False  # the encoder also takes 2D inputs (planned_encoder's drr_path)
    ddp_wrapper = True  # under DDP the student's forward runs through DDP; False: compute_gradients averages .grad
    n_student_inputs: int
    pairs: Sequence[Tuple[int, int]]

    # before anything is written, then after nnU-Net's preprocessing
    @classmethod
    def complete_settings(cls, values: dict) -> None:
        """Fills settings that follow from others (``PretrainConfig.create``'s values, in place)."""

    @classmethod
    def check_before_preparing(cls, cfg, raw) -> None:
        """Refuses options or inputs the method cannot use (``raw``: the dataset as read), before planning or
        preprocessing writes anything."""

    @classmethod
    def prepare(cls, cfg, prepared, raw, share: Tuple[int, int] = (0, 1)) -> None:
        """Writes the method's own data next to nnU-Net's preprocessed data of one dataset (rank 0 first, then the
        others); ``share``: (part, parts), the cases of this job."""

    @classmethod
    def build(cls, cfg, prepared, patch_size: Sequence[int]) -> 'PretrainingMethod':
        return cls()

    # the networks and the optimiser
    def num_outputs(self, prepared) -> int:
        """Segmentation outputs of the planned network."""
        return prepared.label_manager.num_segmentation_heads

    def sync_batchnorm(self) -> bool:
        """Whether the heads may use SyncBatchNorm under CUDA DDP."""
        return True

    def attach(self, trainer) -> None:
        """Called once the student and teacher exist."""

    def extra_parameters(self, trainer) -> List[torch.nn.Parameter]:
        """Parameters optimised besides the student's."""
        return []

    # a step
    def inputs(self, batch: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Teacher input and student inputs of a view batch."""
        raise NotImplementedError

    def loader(self, trainer, views, num_workers: int):
        """The training batches: the view loader's, or more."""
        return views

    def compute_gradients(self, trainer, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Leaves the step's gradient in ``.grad`` (scaled by AMP's loss scale, if any); returns (loss, metrics), as
        tensors read at logging time. A non-finite loss raises; under AMP it makes the scaler skip the step."""
        loss = trainer.ssl_loss(batch)
        amp = trainer.scaler is not None
        check_finite_everywhere({'loss': loss}, trainer.step, trainer.device, skippable=('loss',) if amp else ())
        (trainer.scaler.scale(nan_unless_finite(loss)) if amp else loss).backward()
        return loss, {}

    # the export
    def export_weights(self, trainer, weights: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return weights

    def metadata(self) -> dict:
        """The method's settings, recorded in the export."""
        return {}
