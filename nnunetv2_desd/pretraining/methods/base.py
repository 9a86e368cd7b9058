"""What the engine asks of a pre-training method: its checks, data, inputs, gradients, parameters, loaders, export.

The engine (``engine/loop.py``) calls these hooks and knows no method by name. The defaults are plain
self-distillation: the student's loss, one backward (scaled under AMP), DDP's gradient averaging.
"""
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from nnunetv2_desd.pretraining.distributed import DistContext, check_finite_everywhere, derived_seed, nan_unless_finite
from nnunetv2_desd.pretraining.network import MultiStageDistillationNetwork


@dataclass(frozen=True)
class StepContext:
    """What the engine hands the method's hooks, at the current ``step``."""
    dist: DistContext                       # rank, world size, device
    seed: int                               # --seed
    amp: bool                               # autocast on
    scaler: Optional[torch.amp.GradScaler]  # AMP's loss scaler; None without AMP
    student: MultiStageDistillationNetwork  # encoder and heads
    network: nn.Module                      # the planned network; its encoder is the student's
    ssl_loss: Callable[..., Tensor]         # ssl_loss(batch, student=None): the self-distillation loss of a batch
    parameters: List[nn.Parameter]          # every optimised parameter
    step: int
    deterministic: bool                     # --deterministic: loader workers taken in turn

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def worker_seeds(self, num_workers: int, *loader: str) -> List[int]:
        """A seed per loader worker, distinct per process, loader, worker and start (step), from --seed."""
        return [derived_seed(self.seed, self.dist.rank, 'worker', *loader, worker, self.step)
                for worker in range(num_workers)]


class PretrainingMethod:
    name: str = ''
    official_settings: Dict[str, object] = {}  # what the method's published run changes in PretrainConfig
    exclusive_options: Tuple[str, ...] = ()  # PretrainConfig fields (None unless given) only this method reads
    resume_keys: Tuple[str, ...] = ()  # PretrainConfig fields a resumed run must keep (they shape what it builds)
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

    def extra_parameters(self, network: nn.Module) -> List[nn.Parameter]:
        """Parameters of the planned ``network`` optimised besides the student's."""
        return []

    def attach(self, context: StepContext) -> None:
        """Called once the networks and the optimiser exist."""

    # a step
    def inputs(self, batch: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        """Teacher input and student inputs of a view batch."""
        raise NotImplementedError

    def loader(self, context: StepContext, views, num_workers: int):
        """The training batches: the view loader's, or more."""
        return views

    def compute_gradients(self, context: StepContext, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        """Leaves the step's gradient in ``.grad`` (scaled by AMP's loss scale, if any); returns (loss, metrics), as
        tensors read at logging time. A non-finite loss raises; under AMP it makes the scaler skip the step."""
        loss = context.ssl_loss(batch)
        amp = context.scaler is not None
        check_finite_everywhere({'loss': loss}, context.step, context.device, skippable=('loss',) if amp else ())
        (context.scaler.scale(nan_unless_finite(loss)) if amp else loss).backward()
        return loss, {}

    # the export
    def export_weights(self, context: StepContext, weights: Dict[str, Tensor]) -> Dict[str, Tensor]:
        return weights

    def metadata(self) -> dict:
        """The method's settings, recorded in the export."""
        return {}
