"""ReFs (Medical Image Analysis 2024): DeSD plus a supervised reference task, with gradient matching on the
shared encoder.

The SSL branch is DeSD's (views, heads, teacher, loss); the reference branch trains the planned decoder on the
reference dataset with nnU-Net's Dice + CE and deep supervision. Two forms of gradient matching: ``fish``
(default, first order, after Fish, Shi et al., ICLR 2022) and ``cosine`` (an explicit 1 - cos(g_ssl, g_ref) term,
double backward, bounded by ``matching_stages``). The paper's formula is not public; the derivation of the Fish
update and the reasons for the defaults are in docs/refs.md.
"""
import math
from functools import partial
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.paths import nnUNet_preprocessed
from torch import Tensor, nn
from torch.func import functional_call

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.planning import plans_copied_from
from nnunetv2_desd.data.raw import resolve_dataset_name
from nnunetv2_desd.data.reference import ViewAndReferenceBatches, build_reference_loader, open_reference
from nnunetv2_desd.pretraining.distributed import (average_gradients, check_finite_everywhere, derived_seed,
                                                   nan_unless_finite)
from nnunetv2_desd.pretraining.gradient_matching import fish_gradients, gradient_cosine
from nnunetv2_desd.pretraining.methods.base import StepContext
from nnunetv2_desd.pretraining.methods.desd import DeSD
from nnunetv2_desd.pretraining.network import build_planned_network

MATCHING_FORMS = ('fish', 'cosine')


def encoder_stage_of(name: str) -> int:
    """Encoder stage of an nnU-Net encoder parameter: ``stages.{s}.*`` -> s; ResEnc's ``stem.*`` -> 0."""
    if name.startswith('stem.'):
        return 0
    parts = name.split('.')
    if len(parts) > 2 and parts[0] == 'stages' and parts[1].isdigit():
        return int(parts[1])
    raise DesdError(f'encoder parameter {name!r} belongs to no stage (expected stem.* or stages.<s>.*).')


def matched_encoder_names(encoder: nn.Module, num_stages: int, deepest: Optional[int]) -> List[str]:
    """Names (relative to the encoder) of the parameters matched by the cosine form: all stages, or the
    ``deepest`` ones only."""
    if deepest is not None and not 1 <= deepest <= num_stages:
        raise DesdError(f'--matching-stages {deepest}: the encoder has {num_stages} stages; give 1..{num_stages}.')
    first = 0 if deepest is None else num_stages - deepest
    return [n for n, p in encoder.named_parameters() if p.requires_grad and encoder_stage_of(n) >= first]


def _nnunet_trainer_stand_in(**attributes) -> SimpleNamespace:
    """What ``nnUNetTrainer._build_loss`` and ``_get_deep_supervision_scales`` read of their trainer, so that ReFs
    calls nnU-Net's own methods without building a trainer: one process (the Dice per process; ReFs averages the
    gradients itself), deep supervision on, no torch.compile."""
    return SimpleNamespace(is_ddp=False, enable_deep_supervision=True, _do_i_compile=lambda: False, **attributes)


def deep_supervision_scales(pool_op_kernel_sizes) -> List[List[float]]:
    """nnU-Net's target scales (``nnUNetTrainer._get_deep_supervision_scales``): 1 / cumulative stride of every
    stage but the deepest (the first is 1)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # heavy: imported when ReFs runs
    trainer = _nnunet_trainer_stand_in(configuration_manager=SimpleNamespace(
        pool_op_kernel_sizes=pool_op_kernel_sizes))
    return [list(map(float, s)) for s in nnUNetTrainer._get_deep_supervision_scales(trainer)]


def reference_loss(label_manager, batch_dice: bool, num_outputs: int) -> nn.Module:
    """nnU-Net's training loss for the reference labels (``nnUNetTrainer._build_loss``):

        L_ref = sum_i w_i (Dice_i + CE_i)   (regions: soft Dice + BCE, background included),
        w_i proportional to 1 / 2^i over the outputs from full resolution down, w_last = 0, sum w_i = 1.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # heavy: imported when ReFs runs
    trainer = _nnunet_trainer_stand_in(label_manager=label_manager,
                                       configuration_manager=SimpleNamespace(batch_dice=batch_dice),
                                       _get_deep_supervision_scales=lambda: [None] * num_outputs)  # counted only
    return nnUNetTrainer._build_loss(trainer)


class ReFs(DeSD):
    """ReFs's step: DeSD's views and loss for the SSL branch, plus a reference batch (``batch['reference']``:
    nnU-Net's {'data': (B, C, *patch), 'target': [(B, 1, *patch * scale) per output]}) for the reference branch.

    The planned network gets the reference's outputs: its decoder is the reference branch, optimised with the
    student. ``compute_gradients(context, batch)`` leaves the step's gradient in ``.grad`` of every trainable
    parameter (scaled by AMP's loss scale, if any) and returns (loss, metrics); the engine then steps as for DeSD.
    """
    name = 'refs'
    exclusive_options = ('reference',)
    resume_keys = ('reference',)
    ddp_wrapper = False  # its steps are no plain backward: it averages the gradients itself

    def __init__(self, reference: str, reference_weight: float = 1.0, matching: str = 'fish',
                 matching_weight: float = 1.0, matching_stages: Optional[int] = None, fish_inner_lr: float = 0.01,
                 reference_batch_size: Optional[int] = None):
        self.reference = reference
        self.reference_weight = float(reference_weight)
        self.matching = matching
        self.matching_weight = float(matching_weight)
        self.matching_stages = matching_stages
        self.fish_inner_lr = float(fish_inner_lr)
        self.reference_batch_size = reference_batch_size
        self.reference_plans = None  # set by build once the reference is opened
        self.reference_dataset = None  # PreparedData, set by build
        self.gradient_patterns = {}  # average_gradients' agreed gradient patterns (DDP)

    @classmethod
    def complete_settings(cls, values: dict) -> None:
        if values['plans_from'] is None:  # the reference's plans: its preprocessed data fit as they are
            values['plans_from'] = values['reference']

    @staticmethod
    def _require_reference(cfg) -> None:
        if not cfg.reference:
            raise DesdError('-m refs needs --reference DATASET: a labelled dataset preprocessed with nnU-Net '
                            '(nnUNetv2_plan_and_preprocess -d DATASET -c 3d_fullres).')

    @classmethod
    def check_before_preparing(cls, cfg, raw) -> None:
        """The reference must be preprocessed with the plans the pre-training data will get (those of
        ``--plans-from``, by default the reference's own)."""
        cls._require_reference(cfg)
        reference = cfg.reference = resolve_dataset_name(cfg.reference)  # as the checkpoint records it
        source = resolve_dataset_name(cfg.plans_from or cfg.reference)
        source_plans = cfg.plans or 'nnUNetPlans'
        source_file = join(nnUNet_preprocessed, source, source_plans + '.json')
        if not isfile(source_file):
            raise DesdError(f'{source_file} does not exist: plan and preprocess {source} first '
                            f'(nnUNetv2_plan_and_preprocess -d {source[7:10]} -c {cfg.configuration}).')
        open_reference(reference, load_json(source_file), plans_copied_from(source_plans, source), cfg.configuration,
                       raw.num_channels, plans_source=source)

    @classmethod
    def build(cls, cfg, prepared, patch_size: Sequence[int]) -> 'ReFs':
        cls._require_reference(cfg)
        method = cls(cfg.reference, cfg.reference_weight, cfg.matching, cfg.matching_weight, cfg.matching_stages,
                     cfg.fish_inner_lr, cfg.reference_batch_size)
        method.reference_dataset = open_reference(cfg.reference, prepared.plans, prepared.plans_identifier,
                                                  prepared.configuration, prepared.num_input_channels,
                                                  plans_source=prepared.plans_source)
        method.reference = method.reference_dataset.dataset_name
        method.reference_plans = method.reference_dataset.plans_identifier
        method.batch_size = cfg.reference_batch_size or cfg.batch_size
        method.patch_size = patch_size
        method.pretraining_data = prepared  # the export's fresh segmentation outputs are sized for its labels
        method.deep_supervision_scales = deep_supervision_scales(prepared.configuration_manager.pool_op_kernel_sizes)
        return method

    def num_outputs(self, prepared) -> int:
        return self.reference_dataset.label_manager.num_segmentation_heads

    def sync_batchnorm(self) -> bool:
        return self.matching != 'cosine'  # SyncBatchNorm has no double backward

    def attach(self, context: StepContext) -> None:
        """nnU-Net's loss for the reference labels, and the parameter names the steps work with."""
        self.reference_loss = reference_loss(self.reference_dataset.label_manager,
                                             self.reference_dataset.configuration_manager.batch_dice,
                                             len(self.deep_supervision_scales)).to(context.device)
        student, network = context.student, context.network
        encoder = student.encoder
        decoder = {n: p for n, p in network.named_parameters() if n.startswith('decoder.')}
        self.trainable_parameters = {n: p for n, p in {**dict(student.named_parameters()), **decoder}.items()
                                     if p.requires_grad}
        self.student_parameter_names = [n for n, _ in student.named_parameters() if n in self.trainable_parameters]
        self.network_parameter_names = [n for n, _ in network.named_parameters() if n in self.trainable_parameters]
        self.encoder_names = ['encoder.' + n for n, p in encoder.named_parameters() if p.requires_grad]
        self.matched_names = self.encoder_names if self.matching != 'cosine' else \
            ['encoder.' + n for n in matched_encoder_names(encoder, len(encoder.output_channels),
                                                           self.matching_stages)]

    def extra_parameters(self, network: nn.Module) -> list:
        return [p for n, p in network.named_parameters() if n.startswith('decoder.')]

    def loader(self, context: StepContext, views, num_workers: int):
        """The view batches, each with a reference batch under 'reference'."""
        reference = build_reference_loader(self.reference_dataset, self.patch_size, self.batch_size,
                                           self.deep_supervision_scales, num_workers,
                                           pin_memory=context.device.type == 'cuda',
                                           seeds=context.worker_seeds(num_workers, 'reference'),
                                           ordered=context.deterministic)
        return ViewAndReferenceBatches(views, reference)

    def export_weights(self, context: StepContext, weights):
        """The decoder trained on the reference task; its segmentation outputs (which nnU-Net never transfers)
        freshly initialised for the pre-training dataset's labels, so the export has the tensors and shapes of a
        DeSD export of the same plans."""
        prepared = self.pretraining_data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(context.seed)
            template = build_planned_network(prepared.plans_manager, prepared.configuration_manager,
                                             prepared.num_input_channels,
                                             prepared.label_manager.num_segmentation_heads).state_dict()
        return {k: template[k].clone() if '.seg_layers.' in k else weights[k] for k in template}

    def metadata(self) -> dict:
        return {'reference': self.reference, 'reference_plans': self.reference_plans,
                'reference_weight': self.reference_weight, 'matching': self.matching,
                'matching_weight': self.matching_weight if self.matching == 'cosine' else None,
                'matching_stages': self.matching_stages if self.matching == 'cosine' else None,
                'fish_inner_lr': self.fish_inner_lr if self.matching == 'fish' else None,
                'reference_batch_size': self.reference_batch_size,
                'decoder': 'trained on the reference task; seg_layers freshly initialised for the pre-training '
                           'dataset\'s labels'}

    def compute_gradients(self, context: StepContext, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        reference = batch['reference']
        x = reference['data'].to(context.device, non_blocking=True)
        y = [t.to(context.device, non_blocking=True) for t in reference['target']]
        # the losses are scaled here, not by scaler.scale(loss); scaling a one makes the scaler set up its scale
        # tensor (lazily created there), which unscale_ and step need
        scale = context.scaler.scale(torch.ones((), device=context.device)).reshape(()) \
            if context.scaler is not None else 1.0  # a tensor: the scale is not read on the host
        if self.matching == 'fish':
            loss, metrics = self._fish(context, batch, x, y, scale)
        else:
            loss, metrics = self._cosine(context, batch, x, y, scale)
        if context.dist.enabled:
            average_gradients(context.parameters, self.gradient_patterns)
        return loss, metrics

    def _fish(self, context: StepContext, batch, x, y, scale):
        params, values = self.trainable_parameters, {}
        amp = context.scaler is not None
        guard = nan_unless_finite if amp else (lambda loss: loss)  # AMP: a non-finite loss skips the step
        # nnU-Net's blocks reach one module under two names (conv and all_modules.0), and the decoder reaches the
        # encoder: tie_weights=True would restore one name with the other's swapped-in tensor; every parameter is
        # given once, under its module's name, so no tying is needed
        call = partial(functional_call, tie_weights=False)

        def ssl(theta):
            student = {n: theta[n] for n in self.student_parameter_names}
            values['ssl'] = context.ssl_loss(batch, lambda *inputs: call(context.student, student, inputs))
            return guard(values['ssl']) * scale

        def ref(theta):
            network = {n: theta[n] for n in self.network_parameter_names}
            with torch.autocast(context.device.type, enabled=context.amp):
                values['reference'] = self.reference_loss(call(context.network, network, (x,)), y)
            return guard(values['reference']) * (scale * self.reference_weight)

        # the order from this process's seed and the step: no draw on the device, and the same after a resume
        ssl_first = derived_seed(context.seed, context.dist.rank, 'fish order', context.step) % 2 == 0
        grads, cosine, finite = fish_gradients(params, [ssl, ref] if ssl_first else [ref, ssl], self.fish_inner_lr,
                                               scale, self.encoder_names)
        metrics = {'ssl_loss': values['ssl'].detach(), 'reference_loss': values['reference'].detach()}
        # AMP: a non-finite loss or gradient anywhere skips the step everywhere (the averaged gradients carry it)
        check_finite_everywhere({'SSL loss': metrics['ssl_loss'], 'reference loss': metrics['reference_loss'],
                                 'fish gradient': torch.where(finite, 0.0, math.nan)}, context.step, context.device,
                                skippable=('SSL loss', 'reference loss', 'fish gradient') if amp else ())
        for name, p in params.items():
            p.grad = grads.get(name)
        loss = (values['ssl'] + self.reference_weight * values['reference']).detach()
        if cosine is None:
            cosine = torch.full((), math.nan, device=context.device)
        return loss, {**metrics, 'gradient_cosine': cosine}

    def _cosine(self, context: StepContext, batch, x, y, scale):
        amp = context.scaler is not None
        ssl = context.ssl_loss(batch, context.student)
        with torch.autocast(context.device.type, enabled=context.amp):
            ref = self.reference_loss(context.network(x), y)
        matched = [self.trainable_parameters[n] for n in self.matched_names]
        cosine = gradient_cosine(ssl * scale, ref * scale, matched, create_graph=self.matching_weight > 0)
        # AMP: a non-finite value skips the step (its NaN reaches every gradient); otherwise it raises
        check_finite_everywhere({'SSL loss': ssl, 'reference loss': ref, 'gradient cosine': cosine}, context.step,
                                context.device,
                                skippable=('SSL loss', 'reference loss', 'gradient cosine') if amp else ())
        loss = ssl + self.reference_weight * ref + self.matching_weight * (1 - cosine)
        ((nan_unless_finite(loss) if amp else loss) * scale).backward()
        metrics = {'ssl_loss': ssl.detach(), 'reference_loss': ref.detach(), 'gradient_cosine': cosine.detach()}
        return loss.detach(), metrics
