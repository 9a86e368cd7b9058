"""The one configuration object of a pre-training run, with the documented defaults.

The dataclass defaults are DeSD's published run where it carries over to nnU-Net's networks (docs/methods.md,
"DeSD"), with nnU-Net's 250 iterations per epoch; each method's ``official_settings`` holds what its published run
changes (docs/methods.md, "CADS"). Each field declares its option once (``option``: flag, help, bounds, choices);
desd_pretrain's parser and ``check`` derive from ``OPTIONS``. ``PretrainConfig.create`` applies
a method's defaults, then the recipe's (``RECIPES``), and scales the recipe's epoch counts to runs shorter than the
official one; explicit values are never scaled. ReFs (``-m refs``, docs/refs.md) keeps DeSD's recipe and, without
``--plans-from``, pre-trains with the reference dataset's plans. Details: docs/pretraining.md.
"""
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, replace
from typing import Dict, List, Optional, Tuple, Union, get_args, get_origin

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.drr_projection import ATTENUATIONS, VIEWS
from nnunetv2_desd.pretraining.heads import HEAD_NORMS
from nnunetv2_desd.pretraining.methods.refs import MATCHING_FORMS
from nnunetv2_desd.pretraining.methods.registry import METHODS

SCALED_EPOCH_COUNTS = ('warmup_epochs', 'warmup_teacher_temp_epochs', 'freeze_last_layer_epochs')
# --recipe: 'official' is the method's published recipe (the dataclass defaults plus the method's official_settings);
# 'small-batch' (the default) changes what breaks at nnU-Net's batch of 2 volumes x 2 views per process, as measured
# with desd_probe and the loss diagnostics (docs/methods.md, "Small batches"): running statistics
# instead of batch statistics in the heads, Sinkhorn-Knopp targets over a queue instead of a centre, K scaled to that
# queue (K <= 4 x queue keeps the targets sharp), a sharper teacher, a faster-moving teacher.
RECIPES = {
    'official': {},
    'small-batch': dict(head_norm='running', sinkhorn_queue=64, out_dim=256, teacher_temp=0.02, warmup_teacher_temp=0.02,
                        teacher_momentum=0.9),
}


@dataclass(frozen=True)
class Option:
    """What a PretrainConfig field declares once: its command-line option, its help and the values it accepts.
    ``type`` and ``many`` (a list) come from the field's annotation."""
    help: str
    flag: str = ''                  # default: --field-name
    low: Optional[float] = None     # inclusive bounds of a number (of every number of a list)
    above: Optional[float] = None   # exclusive lower bound
    high: Optional[float] = None
    expect: str = ''                # a bounded value's description in the complaint, 'expected ...'
    choices: Tuple[str, ...] = ()
    length: Optional[int] = None    # a list of exactly this many values
    group: Optional[str] = None     # its section of --help
    type: type = str
    many: bool = False

    @property
    def bounded(self) -> bool:
        return (self.low, self.above, self.high) != (None, None, None)


def option(default=MISSING, *, factory=MISSING, **declared) -> Field:
    """A PretrainConfig field with its Option (``declared``: Option's fields)."""
    return field(default=default, default_factory=factory, metadata={'option': Option(**declared)})


def _value_type(annotation) -> Tuple[type, bool]:
    """(type of a value, whether a list): Optional[X] is X; List[X] and Union[str, List[str]] are lists of X."""
    if get_origin(annotation) is Union:
        args = [a for a in get_args(annotation) if a is not type(None)]
        annotation = next((a for a in args if get_origin(a) is list), args[0])
    if get_origin(annotation) is list:
        return get_args(annotation)[0], True
    return annotation, False


CADS, REFS = 'CADS', 'ReFs'


@dataclass
class PretrainConfig:
    dataset: Union[str, List[str]] = option(
        flag='-d', help='dataset(s) in nnUNet_raw, ids or names (labels optional, not used); several pre-train one '
                        'encoder on all their images, prepared with the plans of --plans-from, else the first\'s')
    method: str = option('desd', flag='-m', choices=tuple(METHODS),
                         help='desd: deep self-distillation; cads: DeSD + CT/DRR alignment with packed masking (CT '
                              'only); refs: DeSD + a supervised reference task with gradient matching (needs '
                              '--reference)')
    recipe: str = option('small-batch', choices=tuple(RECIPES),
                         help='small-batch: what makes self-distillation learn at nnU-Net\'s batch sizes (running '
                              'head statistics, sharper and faster teacher); official: the method\'s published '
                              'recipe, for large global batches. Options given explicitly override either')
    configuration: str = option('3d_fullres', flag='-c', help='nnU-Net 3D configuration')
    plans: Optional[str] = option(None, flag='-p', help='plans identifier (default: the planner\'s, nnUNetPlans)')
    planner: str = option('ExperimentPlanner', flag='-pl',
                          help='nnU-Net experiment planner, e.g. nnUNetPlannerResEncM')
    plans_from: Optional[str] = option(None, help='use the plans nnU-Net made for this (labelled) dataset, so the '
                                                  'encoder transfers 1:1 (-m refs: default --reference)')
    continue_training: bool = option(False, flag='--c',
                                     help='continue from checkpoint_latest, or start a new run where there is none '
                                          '(one job line serves the first launch, a requeue and torchrun\'s restarts)')
    overwrite: bool = option(False, help='start over, replacing the run in the output folder (without it, and '
                                         'without --c, an existing run is refused)')
    allow_schedule_change: bool = option(False, help='--c with other --epochs or --iters-per-epoch (the lr, teacher '
                                                     'and weight-decay schedules change mid-run)')
    init: Optional[str] = option(None, help='start student and teacher encoder from this checkpoint: a nnunetv2_desd '
                                            'export or an nnssl checkpoint (network_weights + nnssl_adaptation_plan) '
                                            'whose encoder the plans build; e.g. DeSD on top of an MAE-pretrained '
                                            'ResEnc-L')
    device: str = option('cuda', flag='-device', choices=('cuda', 'cpu'), help='where to train')
    amp: Optional[bool] = option(None, help='mixed precision: autocast (float16 on CUDA, bfloat16 on CPU) with a '
                                            'GradScaler (default: on for -device cuda only)')
    # schedule
    epochs: int = option(300, low=1, expect='a positive number of epochs', help='pre-training epochs')
    iters_per_epoch: int = option(250, low=1, expect='a positive number of iterations', help='iterations per epoch')
    batch_size: int = option(2, low=1, expect='a positive batch size',
                             help='per process; each sample gives 2 views')
    patch_size: Optional[List[int]] = option(None, low=4, length=3, expect='three patch lengths of at least 4 voxels',
                                             help='default: the plans\' patch size')
    # DeSD
    out_dim: int = option(60000, low=2, expect='at least 2 prototypes', help='K, the number of prototypes')
    stages: Optional[List[int]] = option(None, low=0, expect='encoder stage indices',
                                         help='encoder stages to distil (default: the deepest 4; must include the '
                                              'deepest)')
    head_hidden_dim: int = option(2048, low=1, expect='a positive width', help='hidden width of the heads')
    head_bottleneck_dim: int = option(256, low=1, expect='a positive width', help='bottleneck width of the heads')
    head_norm: str = option('batch', choices=HEAD_NORMS,
                            help='normalisation in the heads: batch = DeSD\'s BatchNorm1d over the per-process batch, '
                                 'running = batch norm with running statistics over steps (small batches), none = '
                                 'DINO\'s ViT recipe')
    student_temp: float = option(0.1, above=0, expect='a temperature above 0', help='temperature of the student')
    teacher_temp: float = option(0.07, above=0, expect='a temperature above 0',
                                 help='temperature of the teacher after its warm-up')
    warmup_teacher_temp: float = option(0.04, above=0, expect='a temperature above 0',
                                        help='temperature of the teacher at the start')
    warmup_teacher_temp_epochs: int = option(20, low=0, expect='a number of epochs, 0 or more',
                                             help='epochs of the teacher temperature\'s linear warm-up')
    center_momentum: float = option(0.9, low=0, high=1, expect='a momentum in [0, 1]',
                                    help='EMA momentum of the teacher centre')
    sinkhorn_queue: int = option(0, low=0, expect='a queue length, 0 or more',
                                 help='teacher targets by Sinkhorn-Knopp equipartition over the current and this many '
                                      'past teacher rows (0: DeSD\'s centring)')
    teacher_momentum: float = option(0.996, low=0, high=1, expect='a momentum in [0, 1]',
                                     help='EMA momentum of the teacher at the start')
    teacher_momentum_end: float = option(1.0, low=0, high=1, expect='a momentum in [0, 1]',
                                         help='the teacher momentum\'s cosine schedule ends here')
    freeze_last_layer_epochs: int = option(1, low=0, expect='a number of epochs, 0 or more',
                                           help='epochs with the prototypes frozen')
    # optimisation
    optimizer: str = option('sgd', choices=('sgd', 'adamw'), help='optimiser')
    lr: float = option(0.3, above=0, expect='a learning rate above 0',
                       help='base lr per 256 samples (scaled by the global batch)')
    min_lr: float = option(1e-6, low=0, expect='a learning rate, 0 or more', help='lr at the end of the cosine')
    warmup_epochs: int = option(10, low=0, expect='a number of epochs, 0 or more', help='epochs of linear lr warm-up')
    weight_decay: float = option(1e-6, low=0, expect='a weight decay, 0 or more',
                                 help='weight decay (not on biases and norms)')
    weight_decay_end: Optional[float] = option(None, low=0, expect='a weight decay, 0 or more',
                                               help='cosine schedule weight-decay -> this per iteration')
    clip_grad: float = option(0.0, low=0, expect='a gradient norm, 0 (off) or more',
                              help='per-parameter gradient-norm clipping, 0 = off')
    # CADS
    mask_ratio: float = option(0.75, low=0, high=0.999, expect='a share in [0, 1)', group=CADS,
                               help='share of 3D patches masked: 1 - 1/k^2 keeps 1 of every k x k in-plane block '
                                    '(0 = no masking)')
    mask_patch: List[int] = option(factory=lambda: [4, 8, 8], low=1, length=3, expect='three positive patch lengths',
                                   group=CADS, help='patch size of the masking, in voxels')
    drr_view: str = option('lateral', choices=VIEWS, group=CADS, help='direction of the DRR\'s rays')
    drr_attenuation: str = option('linear', choices=ATTENUATIONS, group=CADS, help='the DRR\'s attenuation model')
    # ReFs
    reference: Optional[str] = option(None, group=REFS,
                                      help='labelled dataset (id or name) of the reference task, preprocessed by '
                                           'nnU-Net with the pre-training plans')
    reference_weight: float = option(1.0, low=0, expect='a weight, 0 or more', group=REFS,
                                     help='lambda_ref, weight of the reference loss')
    matching: str = option('fish', choices=MATCHING_FORMS, group=REFS,
                           help='gradient matching: fish = first-order inner steps (Fish); cosine = explicit '
                                'lambda_match (1 - cos(g_ssl, g_ref)) with double backward')
    matching_weight: float = option(1.0, low=0, expect='a weight, 0 or more', group=REFS,
                                    help='lambda_match of the cosine form')
    matching_stages: Optional[int] = option(None, low=1, expect='a positive number of stages', group=REFS,
                                            help='cosine form: match the gradients of the deepest N encoder stages '
                                                 'only, to bound memory (default: all stages)')
    fish_inner_lr: float = option(0.01, low=0, expect='a learning rate, 0 or more', group=REFS,
                                  help='alpha, lr of the inner SGD steps of the fish form')
    reference_batch_size: Optional[int] = option(None, low=1, expect='a positive batch size', group=REFS,
                                                 help='reference cases per process and step (default: --batch-size)')
    # engine
    num_workers: Optional[int] = option(None, low=0, expect='a number of processes, 0 or more',
                                        help='augmentation processes (default: nnU-Net\'s nnUNet_n_proc_DA logic; 0 = '
                                             'in-process)')
    num_preprocessing_processes: Optional[int] = option(
        None, flag='-np', low=1, expect='a positive number of processes',
        help='processes for checking, fingerprinting, preprocessing and DRRs (default: nnU-Net\'s '
             'default_num_processes, nnUNet_def_n_proc)')
    seed: int = option(12345, low=0, high=2 ** 32 - 1, expect='a seed in [0, 2^32)', help='random seed')
    deterministic: bool = option(False, help='reproducible pre-training: ordered loader workers and deterministic '
                                             'torch algorithms (slower); the same seed gives the same run on the same '
                                             'machine')
    # the pool (checked together with -d, in _pool_problem)
    dataset_weights: Optional[List[float]] = option(None, help='sampling weight per dataset of -d (default: every '
                                                               'case equally likely)')
    exclude_bad_cases: bool = option(False, help='leave out the cases the image check names (recorded in the log and '
                                                 'the export) instead of stopping')

    @property
    def datasets(self) -> List[str]:
        return [self.dataset] if isinstance(self.dataset, str) else [str(d) for d in self.dataset]

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> 'PretrainConfig':
        """DesdError (one line) for the first option outside its declared bounds or choices; returns self."""
        problems = [option_problem(name, getattr(self, name)) for name in OPTIONS]
        problems += [f'{option_name(name)} is an option of -m {other}, not of -m {self.method}'
                     for other, method in METHODS.items() if other != self.method
                     for name in method.exclusive_options if getattr(self, name) is not None]
        problems.append(self._pool_problem())
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
        """Dataclass defaults, then the method's ``official_settings`` with scaled epoch counts, then ``given``
        (options left at None count as not given)."""
        given = {k: v for k, v in given.items() if v is not None}
        unknown = sorted(set(given) - set(OPTIONS))
        if unknown:
            raise TypeError(f'unknown PretrainConfig fields {unknown}')
        recipe = given.get('recipe', cls.recipe)
        official = {**cls(dataset).to_dict(), **(METHODS[method].official_settings if method in METHODS else {})}
        epochs = given.get('epochs', official['epochs'])
        problem = option_problem('recipe', recipe) or option_problem('epochs', epochs)
        if problem:
            raise DesdError(problem + '.')
        values = {**official, **RECIPES[recipe]}
        if epochs < official['epochs']:
            for key in SCALED_EPOCH_COUNTS:  # a count the recipe has stays at least 1 epoch
                scaled = round(official[key] * epochs / official['epochs'])
                values[key] = max(scaled, 1) if official[key] > 0 else 0
        values.update(given, dataset=dataset, method=method)
        if method in METHODS:
            METHODS[method].complete_settings(values)
        return cls(**values).check()


def _resolved(f) -> Option:
    declared = f.metadata['option']
    value_type, many = _value_type(f.type)
    return replace(declared, flag=declared.flag or '--' + f.name.replace('_', '-'), type=value_type, many=many)


OPTIONS: Dict[str, Option] = {f.name: _resolved(f) for f in fields(PretrainConfig)}


def option_name(field_name: str) -> str:
    return OPTIONS[field_name].flag


def option_problem(name: str, value) -> Optional[str]:
    """None if ``value`` is one the option ``name`` accepts, else the one-line complaint. A number's None always
    fits (not given); options without bounds or choices accept anything."""
    spec = OPTIONS[name]
    if spec.choices:
        return None if value in spec.choices else f'{spec.flag} {value!r}: choose one of {", ".join(spec.choices)}'
    if value is None or not spec.bounded:
        return None
    values = list(value) if spec.many and isinstance(value, (list, tuple)) else [value]
    if spec.length is not None and len(values) != spec.length:
        return f'{spec.flag} needs {spec.length} values, got {len(values)}'
    for v in values:
        integral = isinstance(v, int) and not isinstance(v, bool)
        number = integral or (isinstance(v, float) and math.isfinite(v))
        if spec.type is int and not integral or not number:
            return f'{spec.flag} {value!r}: expected {spec.expect}'
        if (spec.low is not None and v < spec.low or spec.above is not None and v <= spec.above
                or spec.high is not None and v > spec.high):
            return f'{spec.flag} {v!r}: expected {spec.expect}'
    return None
