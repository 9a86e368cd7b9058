"""ReFs (Medical Image Analysis 2024): DeSD plus a supervised reference task, with gradient matching on the
shared encoder.

One encoder, two branches, one step:

    SSL branch        L_ssl = DeSD's loss (its views, heads and teacher, unchanged)
    reference branch  L_ref = nnU-Net's Dice + CE with deep supervision, on the reference dataset's labels,
                      through the planned decoder
    goal              low L_ssl + lambda_ref L_ref, and similar encoder gradients g_ssl, g_ref of the two tasks

No code of the paper is public and its exact formula is not available here; two forms of gradient matching:

* ``fish`` (default), first order (Shi et al., ICLR 2022): from theta, one SGD step of size alpha on each task in
  a random order on a copy, theta~ = theta - alpha g_1(theta) - alpha g_2(theta - alpha g_1(theta)); the update
  direction is G = (theta - theta~) / alpha = g_1(theta) + g_2(theta - alpha g_1). Expanding g_2 and averaging
  over the two orders,

      E[G] = grad(L_ssl + lambda_ref L_ref) - (alpha lambda_ref / 2) grad(g_ssl . g_ref) + O(alpha^2),

  so following G lowers both losses and raises the inner product of their gradients, with no second
  derivative computed. G goes to the run's optimizer as the gradient of every trainable parameter (encoder,
  SSL heads, decoder; the heads and the decoder thus get their own task's gradient, taken at the inner point
  where their task ran). With plain SGD at learning rate eta this is Fish's meta step
  theta <- theta + eps (theta~ - theta) with eps = eta / alpha; momentum, weight decay, the lr schedule and
  clipping apply to G as they apply to DeSD's gradient. Cost: one DeSD forward/backward plus one supervised
  forward/backward; peak memory: the larger of the two graphs (they are never alive together).
* ``cosine``: an explicit term on the encoder's gradients,

      L = L_ssl + lambda_ref L_ref + lambda_match (1 - cos(g_ssl, g_ref)),
      g_t = dL_t / d theta_enc (flattened, concatenated over the matched encoder parameters),

  back-propagated through g_ssl and g_ref (double backward). Both graphs and both gradient graphs are alive
  together; ``matching_stages`` restricts theta_enc to the deepest encoder stages to bound that memory.

Fish is the default: it is the first-order form the method's abstract points to, costs about one DeSD step
plus one supervised step (the cosine form's double backward costs several), and keeps memory at the larger
branch instead of both branches plus their gradient graphs.

Defaults, not from the paper (its formula is not available): lambda_ref = 1 and lambda_match = 1 (the tasks and
the matching term weighted alike), alpha = 0.01 (nnU-Net's initial learning rate for the supervised task). The
logged ``gradient_cosine`` is cos(g_ssl, g_ref) on the matched encoder parameters (fish: between the two inner
steps' gradients, on the whole encoder).
"""
import math
from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.planning import plans_copied_from
from nnunetv2_desd.data.reference import WithReference, build_reference_loader, open_reference
from nnunetv2_desd.pretraining.distributed import (average_gradients, check_finite_everywhere, derived_seed,
                                                   nan_unless_finite)
from nnunetv2_desd.pretraining.methods.desd import DeSD

MATCHING_FORMS = ('fish', 'cosine')


def gradient_cosine(loss_a: Tensor, loss_b: Tensor, params: Sequence[Tensor], create_graph: bool = True,
                    eps: float = 1e-12) -> Tensor:
    """cos(g_a, g_b) = <g_a, g_b> / (|g_a| |g_b|), g_t = dL_t/dparams flattened and concatenated over ``params``.

    With ``create_graph`` the result is differentiable in the parameters (the double backward of the cosine
    form). A parameter one loss does not reach contributes zeros. Computed in float32 or wider; scaling a loss
    (AMP's loss scale) does not change the result.
    """
    grads = []
    for loss in (loss_a, loss_b):
        g = torch.autograd.grad(loss, list(params), create_graph=create_graph, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    a, b = [[_wide(g) for g in gs] for gs in grads]
    dot = sum((x * y).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum(x.pow(2).sum() for x in a))
    norm_b = torch.sqrt(sum(y.pow(2).sum() for y in b))
    return dot / (norm_a * norm_b).clamp_min(eps)


def _wide(t: Tensor) -> Tensor:
    """float32 at least (AMP's half precision gradients would overflow in the sums of squares)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def matching_loss(loss_a: Tensor, loss_b: Tensor, params: Sequence[Tensor]) -> Tensor:
    """1 - cos(g_a, g_b) in [0, 2], differentiable in the parameters (see ``gradient_cosine``)."""
    return 1 - gradient_cosine(loss_a, loss_b, params, create_graph=True)


def fish_gradients(params: Dict[str, Tensor], losses: Sequence[Callable[[Dict[str, Tensor]], Tensor]],
                   inner_lr: float, loss_scale: float = 1.0, match: Sequence[str] = ()
                   ) -> Tuple[Dict[str, Tensor], Optional[float], bool]:
    """Fish's update direction G = (theta - theta~) / alpha = sum_k g_k(theta_{k-1}), where
    theta_0 = ``params`` and theta_k = theta_{k-1} - alpha g_k(theta_{k-1}) (one plain SGD step per loss, in the
    given order; ``losses[k](theta)`` evaluates loss k at the parameter values ``theta``, a dict like ``params``).

    ``loss_scale``: the losses come multiplied by it (AMP); the inner steps use the unscaled gradients, G stays
    scaled, as the gradients of a scaled backward would be. Returns (G by name (parameters no loss reaches are
    left out), the cosine between the first two inner gradients over the names in ``match`` (None without
    ``match`` or after a non-finite gradient), whether every gradient was finite). Every loss is evaluated
    whatever happens, so that each process issues the same collectives (the SSL loss all-reduces its centre);
    after a non-finite gradient no further inner step is taken, G holds it, and AMP's scaler skips the step.
    One host sync; ``fish_gradients_on_device`` is the same without it.
    """
    total, cosine, finite = fish_gradients_on_device(params, losses, inner_lr, loss_scale, match)
    if cosine is None:
        return total, None, bool(finite)
    flag, value = torch.stack([finite.to(cosine.dtype), cosine]).tolist()
    return total, value if flag else None, bool(flag)


def fish_gradients_on_device(params: Dict[str, Tensor], losses: Sequence[Callable[[Dict[str, Tensor]], Tensor]],
                             inner_lr: float, loss_scale: Union[float, Tensor] = 1.0, match: Sequence[str] = ()
                             ) -> Tuple[Dict[str, Tensor], Optional[Tensor], Tensor]:
    """``fish_gradients`` with no host sync: the cosine is a 0-d tensor (NaN after a non-finite gradient; None
    without ``match``), finiteness a 0-d bool tensor, and the inner steps after a non-finite gradient are taken
    by ``torch.where`` (to the same point)."""
    current = dict(params)
    total: Dict[str, Tensor] = {}
    cosine, all_finite = None, None
    for k, loss_at in enumerate(losses):
        names = list(current)
        grads = torch.autograd.grad(loss_at(current), [current[n] for n in names], allow_unused=True)
        grads = {n: g for n, g in zip(names, grads) if g is not None}
        if k == 1 and match:  # total holds the first gradient alone
            common = [n for n in match if n in total and n in grads]
            if common:
                dot = sum((_wide(total[n]) * _wide(grads[n])).sum() for n in common)
                norms = torch.sqrt(sum(_wide(total[n]).pow(2).sum() for n in common)) * \
                    torch.sqrt(sum(_wide(grads[n]).pow(2).sum() for n in common))
                cosine = dot / norms.clamp_min(1e-12)
        if grads:  # one flag over all gradients: the largest magnitudes are finite (NaN propagates)
            finite = torch.isfinite(torch.stack([_wide(m) for m in torch._foreach_norm(list(grads.values()),
                                                                                       math.inf)])).all()
            all_finite = finite if all_finite is None else all_finite & finite
        if all_finite is not None and k < len(losses) - 1:
            with torch.no_grad():
                current = {n: (torch.where(all_finite, p - (inner_lr / loss_scale) * grads[n], p) if n in grads
                               else p.detach()).requires_grad_() for n, p in current.items()}
        for n, g in grads.items():  # fresh tensors from autograd: accumulated in place
            total[n] = total[n].add_(g) if n in total else g
    if all_finite is None:
        all_finite = torch.ones((), dtype=torch.bool, device=next(iter(params.values())).device)
    if cosine is not None:
        cosine = torch.where(all_finite, cosine, math.nan)
    return total, cosine, all_finite


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


def deep_supervision_scales(pool_op_kernel_sizes) -> List[List[float]]:
    """nnU-Net's target scales: 1 / cumulative stride of every stage but the deepest (the first is 1)."""
    return [list(map(float, s)) for s in 1 / np.cumprod(np.vstack(pool_op_kernel_sizes), axis=0)][:-1]


def reference_loss(label_manager, batch_dice: bool, num_outputs: int) -> nn.Module:
    """nnU-Net's training loss for the reference labels, built as ``nnUNetTrainer._build_loss`` builds it:

        L_ref = sum_i w_i (Dice_i + CE_i)   (regions: soft Dice + BCE, background included),
        w_i proportional to 1 / 2^i over the outputs from full resolution down, w_last = 0, sum w_i = 1.

    The Dice is computed per process (``ddp`` off): gradients are averaged over processes afterwards.
    """
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    if label_manager.has_regions:
        loss = DC_and_BCE_loss({}, {'batch_dice': batch_dice, 'do_bg': True, 'smooth': 1e-5, 'ddp': False},
                               use_ignore_label=label_manager.ignore_label is not None,
                               dice_class=MemoryEfficientSoftDiceLoss)
    else:
        loss = DC_and_CE_loss({'batch_dice': batch_dice, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {},
                              weight_ce=1, weight_dice=1, ignore_label=label_manager.ignore_label,
                              dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(num_outputs)])
    weights[-1] = 0  # nnU-Net does not use the lowest output
    return DeepSupervisionWrapper(loss, weights / weights.sum())


class ReFs(DeSD):
    """ReFs's step: DeSD's views and loss for the SSL branch, plus a reference batch (``batch['reference']``:
    nnU-Net's {'data': (B, C, *patch), 'target': [(B, 1, *patch * scale) per output]}) for the reference branch.

    The planned network gets the reference's outputs: its decoder is the reference branch, optimised with the
    student. ``compute_gradients(trainer, batch)`` leaves the step's gradient in ``.grad`` of every trainable
    parameter (scaled by AMP's loss scale, if any) and returns (loss, metrics); the trainer then steps as for DeSD.
    """
    name = 'refs'
    exclusive_options = ('reference',)
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
        self.data = None  # the reference dataset (PreparedData), set by build
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
        from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
        from nnunetv2.paths import nnUNet_preprocessed
        from nnunetv2_desd.data.raw import resolve_dataset_name
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
        method.data = open_reference(cfg.reference, prepared.plans, prepared.plans_identifier, prepared.configuration,
                                     prepared.num_input_channels, plans_source=prepared.plans_source)
        method.reference = method.data.dataset_name
        method.reference_plans = method.data.plans_identifier
        method.batch_size = cfg.reference_batch_size or cfg.batch_size
        return method

    def num_outputs(self, prepared) -> int:
        return self.data.label_manager.num_segmentation_heads

    def sync_batchnorm(self) -> bool:
        return self.matching != 'cosine'  # SyncBatchNorm has no double backward

    def attach(self, trainer) -> None:
        """nnU-Net's loss for the reference labels, and the parameter names the steps work with."""
        cm = trainer.prepared.configuration_manager
        self.deep_supervision_scales = deep_supervision_scales(cm.pool_op_kernel_sizes)
        self.reference_loss = reference_loss(self.data.label_manager, self.data.configuration_manager.batch_dice,
                                             len(self.deep_supervision_scales)).to(trainer.device)
        encoder = trainer.student.encoder
        decoder = {n: p for n, p in trainer.network.named_parameters() if n.startswith('decoder.')}
        self.trainable_parameters = {n: p for n, p in {**dict(trainer.student.named_parameters()), **decoder}.items()
                                     if p.requires_grad}
        self.student_parameter_names = [n for n, _ in trainer.student.named_parameters()
                                        if n in self.trainable_parameters]
        self.network_parameter_names = [n for n, _ in trainer.network.named_parameters()
                                        if n in self.trainable_parameters]
        self.encoder_names = ['encoder.' + n for n, p in encoder.named_parameters() if p.requires_grad]
        self.matched_names = self.encoder_names if self.matching != 'cosine' else \
            ['encoder.' + n for n in matched_encoder_names(encoder, len(encoder.output_channels),
                                                           self.matching_stages)]

    def extra_parameters(self, trainer) -> list:
        return [p for n, p in trainer.network.named_parameters() if n.startswith('decoder.')]

    def loader(self, trainer, views, num_workers: int):
        """The view batches, each with a reference batch under 'reference'."""
        reference = build_reference_loader(self.data, trainer.patch_size, self.batch_size,
                                           self.deep_supervision_scales, num_workers,
                                           pin_memory=trainer.device.type == 'cuda')
        return WithReference(views, reference)

    def export_weights(self, trainer, weights):
        """The decoder trained on the reference task; its segmentation outputs (which nnU-Net never transfers)
        freshly initialised for the pre-training dataset's labels, so the export has the tensors and shapes of a
        DeSD export of the same plans."""
        from nnunetv2_desd.pretraining.network import build_planned_network
        prepared = trainer.prepared
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(trainer.cfg.seed)
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

    def compute_gradients(self, trainer, batch: dict) -> Tuple[Tensor, Dict[str, Tensor]]:
        reference = batch['reference']
        x = reference['data'].to(trainer.device, non_blocking=True)
        y = [t.to(trainer.device, non_blocking=True) for t in reference['target']]
        # the losses are scaled here, not by scaler.scale(loss); scaling a one makes the scaler set up its scale
        # tensor (lazily created there), which unscale_ and step need
        scale = trainer.scaler.scale(torch.ones((), device=trainer.device)).reshape(()) \
            if trainer.scaler is not None else 1.0  # a tensor: the scale is not read on the host
        if self.matching == 'fish':
            loss, metrics = self._fish(trainer, batch, x, y, scale)
        else:
            loss, metrics = self._cosine(trainer, batch, x, y, scale)
        if trainer.dist.enabled:
            average_gradients(trainer.optimized_parameters(), self.gradient_patterns)
        return loss, metrics

    def _fish(self, trainer, batch, x, y, scale):
        from torch.func import functional_call as call
        params, values = self.trainable_parameters, {}
        amp = trainer.scaler is not None
        guard = nan_unless_finite if amp else (lambda loss: loss)  # AMP: a non-finite loss skips the step
        # nnU-Net's blocks reach one module under two names (conv and all_modules.0), and the decoder reaches the
        # encoder: tie_weights=True would restore one name with the other's swapped-in tensor; every parameter is
        # given once, under its module's name, so no tying is needed
        functional_call = partial(call, tie_weights=False)

        def ssl(theta):
            student = {n: theta[n] for n in self.student_parameter_names}
            values['ssl'] = trainer.ssl_loss(batch, lambda *inputs: functional_call(trainer.student, student, inputs))
            return guard(values['ssl']) * scale

        def ref(theta):
            network = {n: theta[n] for n in self.network_parameter_names}
            with torch.autocast(trainer.device.type, enabled=trainer.amp):
                values['reference'] = self.reference_loss(functional_call(trainer.network, network, (x,)), y)
            return guard(values['reference']) * (scale * self.reference_weight)

        # the order from this process's seed and the step: no draw on the device, and the same after a resume
        ssl_first = derived_seed(trainer.cfg.seed, trainer.dist.rank, 'fish order', trainer.step) % 2 == 0
        grads, cosine, finite = fish_gradients_on_device(params, [ssl, ref] if ssl_first else [ref, ssl],
                                                         self.fish_inner_lr, scale, self.encoder_names)
        metrics = {'ssl_loss': values['ssl'].detach(), 'reference_loss': values['reference'].detach()}
        # AMP: a non-finite loss or gradient anywhere skips the step everywhere (the averaged gradients carry it)
        check_finite_everywhere({'SSL loss': metrics['ssl_loss'], 'reference loss': metrics['reference_loss'],
                                 'fish gradient': torch.where(finite, 0.0, math.nan)}, trainer.step, trainer.device,
                                skippable=('SSL loss', 'reference loss', 'fish gradient') if amp else ())
        for name, p in params.items():
            p.grad = grads.get(name)
        loss = (values['ssl'] + self.reference_weight * values['reference']).detach()
        if cosine is None:
            cosine = torch.full((), math.nan, device=trainer.device)
        return loss, {**metrics, 'gradient_cosine': cosine}

    def _cosine(self, trainer, batch, x, y, scale):
        amp = trainer.scaler is not None
        ssl = trainer.ssl_loss(batch, trainer.student)
        with torch.autocast(trainer.device.type, enabled=trainer.amp):
            ref = self.reference_loss(trainer.network(x), y)
        matched = [self.trainable_parameters[n] for n in self.matched_names]
        cosine = gradient_cosine(ssl * scale, ref * scale, matched, create_graph=self.matching_weight > 0)
        # AMP: a non-finite value skips the step (its NaN reaches every gradient); otherwise it raises
        check_finite_everywhere({'SSL loss': ssl, 'reference loss': ref, 'gradient cosine': cosine}, trainer.step,
                                trainer.device,
                                skippable=('SSL loss', 'reference loss', 'gradient cosine') if amp else ())
        loss = ssl + self.reference_weight * ref + self.matching_weight * (1 - cosine)
        ((nan_unless_finite(loss) if amp else loss) * scale).backward()
        metrics = {'ssl_loss': ssl.detach(), 'reference_loss': ref.detach(), 'gradient_cosine': cosine.detach()}
        return loss.detach(), metrics
