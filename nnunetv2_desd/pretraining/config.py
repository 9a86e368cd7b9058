"""The one configuration object of a pre-training run, with the documented defaults.

Defaults follow DeSD's official run (METHODS.md §1) where it carries over to nnU-Net's networks:
SGD momentum 0.9, lr = 0.3 * global batch / 256 with 10 warm-up epochs then cosine, weight decay 1e-6
(not on biases and norms), K = 60000, student temperature 0.1, teacher temperature 0.04 -> 0.07 over 20
epochs, centre momentum 0.9, teacher momentum 0.996 -> 1 (cosine, per iteration), prototypes frozen for
the first epoch. nnU-Net-style length: 250 iterations per epoch.
"""
from dataclasses import asdict, dataclass
from typing import List, Optional


@dataclass
class PretrainConfig:
    dataset: str
    method: str = 'desd'
    configuration: str = '3d_fullres'
    plans: Optional[str] = None            # default: the planner's own plans name (nnUNetPlans)
    planner: str = 'ExperimentPlanner'
    plans_from: Optional[str] = None
    continue_training: bool = False
    device: str = 'cuda'
    # schedule
    epochs: int = 300
    iters_per_epoch: int = 250
    batch_size: int = 2                    # per process; each sample gives 2 views
    patch_size: Optional[List[int]] = None  # default: the plans' patch size
    # DeSD
    out_dim: int = 60000
    stages: Optional[List[int]] = None     # default: the deepest 4 encoder stages
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_bn: bool = True
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 20
    center_momentum: float = 0.9
    teacher_momentum: float = 0.996
    freeze_last_layer_epochs: int = 1
    # optimisation
    optimizer: str = 'sgd'
    lr: float = 0.3                        # per 256 samples: lr_peak = lr * global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 1e-6
    clip_grad: float = 0.0                 # 0: off (DeSD's recipe does not clip)
    # engine
    num_workers: Optional[int] = None      # augmentation processes; default nnU-Net's get_allowed_n_proc_DA()
    num_preprocessing_processes: int = 2
    seed: int = 12345

    def to_dict(self) -> dict:
        return asdict(self)

