"""The one configuration object of a pre-training run, with the documented defaults.

The dataclass defaults are DeSD's published run where it carries over to nnU-Net's networks (docs/methods.md,
"DeSD"), with nnU-Net's 250 iterations per epoch; ``METHOD_DEFAULTS`` holds what CADS's published run changes
(docs/methods.md, "CADS"), collected from each method's ``official_settings``. ``PretrainConfig.create`` applies
a method's defaults, then the recipe's (``RECIPES``), and scales the recipe's epoch counts to runs shorter than the
official one; explicit values are never scaled. ReFs (``-m refs``, docs/refs.md) keeps DeSD's recipe and, without
``--plans-from``, pre-trains with the reference dataset's plans. Details: docs/pretraining.md.
"""
import math
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Union

from nnunetv2_desd.pretraining.methods.registry import METHODS

METHOD_DEFAULTS = {name: dict(method.official_settings) for name, method in METHODS.items()}
SCALED_EPOCH_COUNTS = ('warmup_epochs', 'warmup_teacher_temp_epochs', 'freeze_last_layer_epochs')
# --recipe: 'official' is the method's published recipe (the dataclass defaults plus METHOD_DEFAULTS); 'small-batch'
# (the default) changes what breaks at nnU-Net's batch of 2 volumes x 2 views per process, as measured with
# desd_probe and the loss diagnostics (docs/methods.md, "Small batches"): running statistics instead of
# batch statistics in the heads, Sinkhorn-Knopp targets over a queue instead of a centre, K scaled to that queue
# (K <= 4 x queue keeps the targets sharp), a sharper teacher, a faster-moving teacher.
RECIPES = {
    'official': {},
    'small-batch': dict(head_norm='running', sinkhorn_queue=64, out_dim=256, teacher_temp=0.02, warmup_teacher_temp=0.02,
                        teacher_momentum=0.9),
}


# field -> (kind, lower, upper, what): every option's type and range, checked in one place (PretrainConfig.check)
# kinds: 'int'/'float' with inclusive bounds (None: open), '(float' excludes the lower bound, 'ints' a list of ints
LIMITS = {
    'epochs': ('int', 1, None, 'a positive number of epochs'),
    'iters_per_epoch': ('int', 1, None, 'a positive number of iterations'),
    'batch_size': ('int', 1, None, 'a positive batch size'),
    'patch_size': ('ints', 4, None, 'three patch lengths of at least 4 voxels'),
    'out_dim': ('int', 2, None, 'at least 2 prototypes'),
    'stages': ('ints', 0, None, 'encoder stage indices'),
    'head_hidden_dim': ('int', 1, None, 'a positive width'),
    'head_bottleneck_dim': ('int', 1, None, 'a positive width'),
    'student_temp': ('(float', 0, None, 'a temperature above 0'),
    'teacher_temp': ('(float', 0, None, 'a temperature above 0'),
    'warmup_teacher_temp': ('(float', 0, None, 'a temperature above 0'),
    'warmup_teacher_temp_epochs': ('int', 0, None, 'a number of epochs, 0 or more'),
    'center_momentum': ('float', 0, 1, 'a momentum in [0, 1]'),
    'sinkhorn_queue': ('int', 0, None, 'a queue length, 0 or more'),
    'teacher_momentum': ('float', 0, 1, 'a momentum in [0, 1]'),
    'teacher_momentum_end': ('float', 0, 1, 'a momentum in [0, 1]'),
    'freeze_last_layer_epochs': ('int', 0, None, 'a number of epochs, 0 or more'),
    'lr': ('(float', 0, None, 'a learning rate above 0'),
    'min_lr': ('float', 0, None, 'a learning rate, 0 or more'),
    'warmup_epochs': ('int', 0, None, 'a number of epochs, 0 or more'),
    'weight_decay': ('float', 0, None, 'a weight decay, 0 or more'),
    'weight_decay_end': ('float', 0, None, 'a weight decay, 0 or more'),
    'clip_grad': ('float', 0, None, 'a gradient norm, 0 (off) or more'),
    'mask_ratio': ('float', 0, 0.999, 'a share in [0, 1)'),
    'mask_patch': ('ints', 1, None, 'three positive patch lengths'),
    'reference_weight': ('float', 0, None, 'a weight, 0 or more'),
    'matching_weight': ('float', 0, None, 'a weight, 0 or more'),
    'matching_stages': ('int', 1, None, 'a positive number of stages'),
    'fish_inner_lr': ('float', 0, None, 'a learning rate, 0 or more'),
    'reference_batch_size': ('int', 1, None, 'a positive batch size'),
    'num_workers': ('int', 0, None, 'a number of processes, 0 or more'),
    'num_preprocessing_processes': ('int', 1, None, 'a positive number of processes'),
    'seed': ('int', 0, 2 ** 32 - 1, 'a seed in [0, 2^32)'),
}
CHOICES = {'method': tuple(METHODS), 'device': ('cuda', 'cpu'), 'optimizer': ('sgd', 'adamw'),
           'matching': ('fish', 'cosine')}


def option_name(field_name: str) -> str:
    return {'num_preprocessing_processes': '-np', 'device': '-device', 'method': '-m'}.get(
        field_name, '--' + field_name.replace('_', '-'))


def limit_problem(name: str, value) -> Optional[str]:
    """None if ``value`` fits LIMITS[name] (None values always fit: not given), else the one-line complaint."""
    kind, low, high, what = LIMITS[name]
    if value is None:
        return None
    values = list(value) if kind == 'ints' and isinstance(value, (list, tuple)) else [value]
    if kind == 'ints' and name in ('patch_size', 'mask_patch') and len(values) != 3:
        return f'{option_name(name)} needs 3 values, got {len(values)}'
    for v in values:
        integral = isinstance(v, int) and not isinstance(v, bool)
        number = integral or (isinstance(v, float) and math.isfinite(v))
        if kind in ('int', 'ints') and not integral or not number:
            return f'{option_name(name)} {value!r}: expected {what}'
        if low is not None and (v <= low if kind == '(float' else v < low) or high is not None and v > high:
            return f'{option_name(name)} {v!r}: expected {what}'
    return None


@dataclass
class PretrainConfig:
    dataset: Union[str, List[str]]         # one dataset, or the datasets of a pool (ids or names)
    method: str = 'desd'
    recipe: str = 'small-batch'            # see RECIPES
    configuration: str = '3d_fullres'
    plans: Optional[str] = None            # default: the planner's own plans name (nnUNetPlans)
    planner: str = 'ExperimentPlanner'
    plans_from: Optional[str] = None
    continue_training: bool = False        # --c: continue this run's checkpoint_latest (a new run where none)
    overwrite: bool = False                # replace an existing run instead of refusing to
    allow_schedule_change: bool = False    # --c with other --epochs/--iters-per-epoch
    init: Optional[str] = None             # start the encoder from this export or nnssl checkpoint
    device: str = 'cuda'
    amp: Optional[bool] = None             # mixed precision (autocast + GradScaler); None: on for CUDA only
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
    head_norm: str = 'batch'               # 'batch' (DeSD), 'running' or 'none' (DINO ViT); see heads.py
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 20
    center_momentum: float = 0.9
    sinkhorn_queue: int = 0                # > 0: Sinkhorn-Knopp targets over this many past teacher rows, no centring
    teacher_momentum: float = 0.996
    teacher_momentum_end: float = 1.0      # cosine teacher_momentum -> this per iteration
    freeze_last_layer_epochs: int = 1
    # optimisation
    optimizer: str = 'sgd'
    lr: float = 0.3                        # per 256 samples: lr_peak = lr * global batch / 256
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 1e-6
    weight_decay_end: Optional[float] = None  # cosine weight_decay -> weight_decay_end per iteration; None: constant
    clip_grad: float = 0.0                 # per-parameter gradient-norm clipping (DINO); 0: off (DeSD does not clip)
    # CADS
    mask_ratio: float = 0.75               # keep 1 of every 2x2 in-plane block of patches
    mask_patch: List[int] = field(default_factory=lambda: [4, 8, 8])
    drr_view: str = 'lateral'
    drr_attenuation: str = 'linear'
    # ReFs
    reference: Optional[str] = None        # labelled dataset of the reference task
    reference_weight: float = 1.0          # lambda_ref
    matching: str = 'fish'                 # 'fish' (first order) or 'cosine' (explicit term, double backward)
    matching_weight: float = 1.0           # lambda_match of the cosine term
    matching_stages: Optional[int] = None  # cosine: match the deepest N encoder stages only; None: all
    fish_inner_lr: float = 0.01            # alpha of Fish's inner SGD steps
    reference_batch_size: Optional[int] = None  # default: batch_size
    # engine
    num_workers: Optional[int] = None      # augmentation processes; default nnU-Net's get_allowed_n_proc_DA()
    num_preprocessing_processes: Optional[int] = None  # default: nnU-Net's default_num_processes
    seed: int = 12345
    deterministic: bool = False            # ordered loader workers, deterministic torch algorithms
    # the pool
    dataset_weights: Optional[List[float]] = None  # sampling weight per dataset; None: uniform over cases
    exclude_bad_cases: bool = False        # leave the cases the image check names out (recorded) instead of stopping

    @property
    def datasets(self) -> List[str]:
        return [self.dataset] if isinstance(self.dataset, str) else [str(d) for d in self.dataset]

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> 'PretrainConfig':
        """DesdError (one line) for the first option outside LIMITS or CHOICES; returns self."""
        from nnunetv2_desd.common.errors import DesdError
        problems = [limit_problem(name, getattr(self, name)) for name in LIMITS]
        problems += [f'{option_name(name)} {getattr(self, name)!r}: choose one of {", ".join(choices)}'
                     for name, choices in CHOICES.items() if getattr(self, name) not in choices]
        problems += [f'{option_name(name)} is an option of -m {other}, not of -m {self.method}'
                     for other, method in METHODS.items() if other != self.method
                     for name in method.exclusive_options if getattr(self, name) is not None]
        problems.append(self._pool_problem())
        if self.recipe not in RECIPES:
            problems.append(f'--recipe {self.recipe!r}: choose one of {", ".join(RECIPES)}')
        problems = [p for p in problems if p]
        if problems:
            raise DesdError(problems[0] + '.')
        return self

    def _pool_problem(self) -> Optional[str]:
        if len(set(self.datasets)) != len(self.datasets):
            return f'-d {" ".join(self.datasets)}: a dataset is given twice'
        weights = self.dataset_weights
        if weights is None:
            return None
        if len(weights) != len(self.datasets):
            return f'--dataset-weights needs one weight per dataset of -d ({len(self.datasets)}), got {len(weights)}'
        if not all(isinstance(w, (int, float)) and math.isfinite(w) and w > 0 for w in weights):
            return f'--dataset-weights {list(weights)}: every weight must be a finite number above 0'
        return None

    @classmethod
    def create(cls, dataset: str, method: str = 'desd', **given) -> 'PretrainConfig':
        """Dataclass defaults, then ``METHOD_DEFAULTS[method]`` with scaled epoch counts, then ``given``
        (options left at None count as not given)."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f'unknown PretrainConfig fields {unknown}')
        recipe = given.get('recipe', cls.recipe)
        if recipe not in RECIPES:
            from nnunetv2_desd.common.errors import DesdError
            raise DesdError(f'--recipe {recipe!r}: choose one of {", ".join(RECIPES)}.')
        official = {**cls(dataset).to_dict(), **METHOD_DEFAULTS.get(method, {})}
        values = {**official, **RECIPES[recipe]}
        epochs = given.get('epochs', official['epochs'])
        problem = limit_problem('epochs', epochs)
        if problem:
            from nnunetv2_desd.common.errors import DesdError
            raise DesdError(problem + '.')
        if epochs < official['epochs']:
            for key in SCALED_EPOCH_COUNTS:  # a count the recipe has stays at least 1 epoch
                scaled = round(official[key] * epochs / official['epochs'])
                values[key] = max(scaled, 1) if official[key] > 0 else 0
        values.update(given, dataset=dataset, method=method)
        if method in METHODS:
            METHODS[method].complete_settings(values)
        return cls(**values).check()

