"""The pre-training loop: student/teacher, schedules, AMP, DDP, checkpoints, progress, export."""
import copy
import math
import os
import time
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nnunetv2_desd.errors import DesdError
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.data.drrs import drr_projection_axis
from nnunetv2_desd.pretraining.data.planning import PreparedData
from nnunetv2_desd.pretraining.engine.checkpoint import (atomic_save, capture_rng_state, cpu_state_dict,
                                                         load_checkpoint, restore_rng_state, rng_state_of_process,
                                                         tensor_digest)
from nnunetv2_desd.pretraining.engine.distributed import (DistContext, all_reduce_mean, check_finite_everywhere,
                                                          gather_objects)
from nnunetv2_desd.pretraining.engine.ema import ema_update
from nnunetv2_desd.pretraining.engine.nnssl import PLAN_KEY, adaptation_plan, citations
from nnunetv2_desd.pretraining.engine.optim import clip_per_parameter_
from nnunetv2_desd.pretraining.engine.pretrained_weights import ENCODER, PretrainedExport, plan_loading
from nnunetv2_desd.pretraining.engine.progress import ProgressLog
from nnunetv2_desd.pretraining.engine.schedules import cosine, linear_warmup_constant, warmup_cosine
from nnunetv2_desd.pretraining.methods.cads import CADS
from nnunetv2_desd.pretraining.methods.desd import DeSD, DeepSelfDistillationLoss
from nnunetv2_desd.pretraining.methods.refs import (ReFs, deep_supervision_scales, matched_encoder_names,
                                                   reference_loss)
from nnunetv2_desd.pretraining.models.network import (MultiStageDistillationNetwork, build_planned_network,
                                                      planned_encoder, resolve_stages)

EXPORT_FILE = 'pretrained_export.pth'
# a resumed run must build the same modules as the checkpoint
ARCHITECTURE_KEYS = ('configuration', 'out_dim', 'sinkhorn_queue', 'stages', 'head_hidden_dim', 'head_bottleneck_dim', 'head_norm',
                     'reference')


def output_folder_for(prepared: PreparedData, method: str) -> str:
    from nnunetv2.paths import nnUNet_results
    if not nnUNet_results:
        raise DesdError('nnUNet_results must be set: checkpoints and the export are written there.')
    return os.path.join(nnUNet_results, prepared.dataset_name,
                        f'{method}__{prepared.plans_identifier}__{prepared.configuration}')


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, prepared: PreparedData, dist_ctx: DistContext, output_folder: str,
                 init: Optional[PretrainedExport] = None):
        """``init``: a PretrainedExport (``--init``) whose encoder starts student and teacher."""
        self.cfg, self.prepared, self.dist, self.output_folder = cfg, prepared, dist_ctx, output_folder
        self.initialised_from = None
        self.device = dist_ctx.device
        torch.manual_seed(cfg.seed)
        np.random.seed((cfg.seed + dist_ctx.rank) % 2 ** 32)

        cm = prepared.configuration_manager
        self.patch_size = [int(p) for p in (cfg.patch_size or cm.patch_size)]
        total_stride = np.prod(np.array(cm.pool_op_kernel_sizes), axis=0)
        if any(p % s for p, s in zip(self.patch_size, total_stride)):
            raise DesdError(f'--patch-size {self.patch_size} must be divisible by the encoder\'s total stride '
                            f'{total_stride.tolist()}.')
        label_manager = prepared.label_manager
        self.num_segmentation_heads = label_manager.num_segmentation_heads
        self.reference = self._open_reference() if cfg.method == 'refs' else None
        # ReFs: the planned network with the reference's outputs; its decoder is the reference branch
        self.network = build_planned_network(prepared.plans_manager, cm, prepared.num_input_channels,
                                             (self.reference.label_manager if self.reference is not None else
                                              label_manager).num_segmentation_heads)
        if init is not None:
            self._initialise_encoder(init)
        encoder = planned_encoder(self.network, drr_path=cfg.method == 'cads')
        self.stages = resolve_stages(len(encoder.output_channels), cfg.stages)
        head_args = (cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_norm)
        self.student = MultiStageDistillationNetwork(encoder, self.stages, *head_args).to(self.device)
        self.teacher = MultiStageDistillationNetwork(copy.deepcopy(encoder), self.stages[-1:], *head_args)
        self.teacher.heads[0].load_state_dict(self.student.heads[-1].state_dict())
        self.teacher.to(self.device).requires_grad_(False)
        self.loss = DeepSelfDistillationLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum,
                                             cfg.sinkhorn_queue).to(self.device)
        self.method = self._build_method(cm)

        self.student_forward: nn.Module = self.student
        if dist_ctx.enabled:
            # global batch statistics in the heads (SyncBN is CUDA-only in torch, and has no double backward)
            if self.device.type == 'cuda' and not (self.reference is not None and cfg.matching == 'cosine'):
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
            if self.reference is None:  # ReFs averages its gradients itself (its steps are no plain backward)
                self.student_forward = DDP(self.student, device_ids=[self.device.index]
                                           if self.device.type == 'cuda' else None)
        if self.reference is not None:
            self._build_reference_branch(cm)

        self.global_batch = cfg.batch_size * dist_ctx.world_size
        self.peak_lr = cfg.lr * self.global_batch / 256
        self.total_steps = cfg.epochs * cfg.iters_per_epoch
        self.optimizer = self._build_optimizer()
        # autocast: float16 on CUDA, bfloat16 on CPU; the GradScaler works on either
        self.amp = self.device.type == 'cuda' if cfg.amp is None else bool(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp else None
        self.step = 0
        self.metrics = {}  # extra per-step values of the method (ReFs: both losses, gradient cosine)
        self.progress = ProgressLog(output_folder, dist_ctx.is_main, name=cfg.method,
                                    reference_lines={'loss': (math.log(cfg.out_dim), 'ln K (uniform student)'),
                                                     'entropy': (math.log(cfg.out_dim), 'ln K')})

    def _open_reference(self):
        from nnunetv2_desd.pretraining.data.reference import open_reference
        if not self.cfg.reference:
            raise DesdError('-m refs needs --reference DATASET.')
        prepared = self.prepared
        return open_reference(self.cfg.reference, prepared.plans, prepared.plans_identifier, prepared.configuration,
                              prepared.num_input_channels, plans_source=prepared.plans_source)

    def _build_reference_branch(self, cm) -> None:
        """ReFs: nnU-Net's loss for the reference labels, and the parameter names its steps work with."""
        self.method.reference_plans = self.reference.plans_identifier
        self.deep_supervision_scales = deep_supervision_scales(cm.pool_op_kernel_sizes)
        self.reference_loss = reference_loss(self.reference.label_manager,
                                             self.reference.configuration_manager.batch_dice,
                                             len(self.deep_supervision_scales)).to(self.device)
        encoder = self.student.encoder
        decoder_only = {n: p for n, p in self.network.named_parameters() if n.startswith('decoder.')}
        self.trainable_parameters = {n: p for n, p in {**dict(self.student.named_parameters()), **decoder_only}.items()
                                     if p.requires_grad}
        self.student_parameter_names = [n for n, _ in self.student.named_parameters() if n in self.trainable_parameters]
        self.network_parameter_names = [n for n, _ in self.network.named_parameters() if n in self.trainable_parameters]
        self.encoder_names = ['encoder.' + n for n, p in encoder.named_parameters() if p.requires_grad]
        self.matched_names = self.encoder_names if self.cfg.matching != 'cosine' else \
            ['encoder.' + n for n in matched_encoder_names(encoder, len(encoder.output_channels),
                                                           self.cfg.matching_stages)]

    def with_reference_loader(self, loader, num_workers: int):
        """ReFs: ``loader``'s view batches, each with a reference batch under 'reference'."""
        from nnunetv2_desd.pretraining.data.reference import WithReference, build_reference_loader
        reference = build_reference_loader(self.reference, self.patch_size,
                                           self.cfg.reference_batch_size or self.cfg.batch_size,
                                           self.deep_supervision_scales, num_workers,
                                           pin_memory=self.device.type == 'cuda')
        return WithReference(loader, reference)

    def _build_method(self, cm):
        if self.cfg.method == 'desd':
            return DeSD()
        if self.cfg.method == 'cads':
            method = CADS(self.cfg.mask_ratio, self.cfg.mask_patch)
            drr_files = (self.prepared.drr_files or {}).values()
            axes = {drr_projection_axis(np.load(f, mmap_mode='r').shape) for f in drr_files}
            method.check(self.patch_size, cm.pool_op_kernel_sizes, sorted(axes))
            return method
        if self.cfg.method == 'refs':
            cfg = self.cfg
            return ReFs(self.reference.dataset_name, cfg.reference_weight, cfg.matching, cfg.matching_weight,
                        cfg.matching_stages, cfg.fish_inner_lr, cfg.reference_batch_size)
        raise DesdError(f'-m {self.cfg.method!r}: choose desd, cads or refs.')

    def optimized_parameters(self) -> list:
        """The student (encoder and heads); ReFs adds the decoder of its reference branch."""
        params = list(self.student.parameters())
        if self.reference is not None:
            params += [p for n, p in self.network.named_parameters() if n.startswith('decoder.')]
        return params

    def _build_optimizer(self) -> torch.optim.Optimizer:
        params = self.optimized_parameters()
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # biases and norms
        groups = [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0, 'no_decay': True}]
        if self.cfg.optimizer == 'sgd':
            return torch.optim.SGD(groups, lr=self.peak_lr, momentum=0.9, weight_decay=self.cfg.weight_decay)
        if self.cfg.optimizer == 'adamw':
            return torch.optim.AdamW(groups, lr=self.peak_lr, weight_decay=self.cfg.weight_decay)
        raise DesdError(f'--optimizer {self.cfg.optimizer!r}: choose sgd or adamw.')

    # schedules: pure functions of the global step
    @property
    def epoch(self) -> int:
        return self.step // self.cfg.iters_per_epoch

    def lr(self) -> float:
        return warmup_cosine(self.step, self.total_steps, self.cfg.warmup_epochs * self.cfg.iters_per_epoch,
                             self.peak_lr, self.cfg.min_lr)

    def teacher_momentum(self) -> float:
        return cosine(self.step, self.total_steps, self.cfg.teacher_momentum, self.cfg.teacher_momentum_end)

    def weight_decay(self) -> float:
        if self.cfg.weight_decay_end is None:
            return self.cfg.weight_decay
        return cosine(self.step, self.total_steps, self.cfg.weight_decay, self.cfg.weight_decay_end)

    def teacher_temp(self) -> float:
        return linear_warmup_constant(self.epoch, self.cfg.warmup_teacher_temp_epochs,
                                      self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def ssl_loss(self, batch: dict, student=None) -> torch.Tensor:
        """The self-distillation loss of a view batch (updates the loss's centre); ``student``: the forward to
        use instead of ``self.student_forward`` (ReFs: the student at other parameter values)."""
        teacher_input, student_inputs = self.method.inputs(batch, self.device)
        n_views, n_volumes = 2, teacher_input.shape[0] // 2
        with torch.autocast(self.device.type, enabled=self.amp):
            with torch.no_grad():
                teacher_logits = self.teacher(teacher_input)[0].view(n_views, n_volumes, -1)
            student_logits = (student or self.student_forward)(*student_inputs)
            student_logits = student_logits.view(student_logits.shape[0], self.method.n_student_inputs, n_volumes, -1)
        return self.loss(student_logits, teacher_logits, self.teacher_temp(), self.method.pairs)

    def train_step(self, batch: dict) -> torch.Tensor:
        """One iteration on a view-loader batch ({'data': (B, 2C, *patch)[, 'drr': ...][, 'reference': ...]});
        returns the (all-reduced) loss."""
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr()
            if not group.get('no_decay'):
                group['weight_decay'] = self.weight_decay()
        self.optimizer.zero_grad(set_to_none=True)
        if self.reference is None:
            loss = self.ssl_loss(batch)
            check_finite_everywhere({'loss': loss.item()}, self.step, self.device)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            method_metrics = {}
        else:
            loss, method_metrics = self.method.compute_gradients(self, batch)  # fills .grad
            if self.dist.enabled:
                average_gradients(self.optimized_parameters())
        self.metrics = {**method_metrics, **{k: float(v) for k, v in self.loss.diagnostics.items()}}
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.epoch < self.cfg.freeze_last_layer_epochs:
            for head in self.student.heads:
                head.prototypes.grad = None
        if self.cfg.clip_grad > 0:
            clip_per_parameter_(self.student.parameters(), self.cfg.clip_grad)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

        momentum = self.teacher_momentum()
        ema_update(self.teacher.encoder, self.student.encoder, momentum)
        ema_update(self.teacher.heads[0], self.student.heads[-1], momentum)
        self.step += 1
        if self.metrics and self.dist.enabled:
            values = all_reduce_mean(torch.tensor(list(self.metrics.values()), device=self.device))
            self.metrics = dict(zip(self.metrics, values.tolist()))
        return all_reduce_mean(loss.detach().to(self.device))

    def run(self, loader: Iterator[dict]) -> None:
        cfg = self.cfg
        if self.dist.is_main:
            self.progress.log(f'{cfg.method} pre-training of {self.prepared.dataset_name}: network '
                              f'{self.prepared.configuration_manager.network_arch_class_name}, distilled stages '
                              f'{self.stages}, patch {self.patch_size}, batch {cfg.batch_size} x '
                              f'{self.dist.world_size} process(es), peak lr {self.peak_lr:.3g}, device {self.device}')
            if self.initialised_from is not None and self.step == 0:
                origin = self.initialised_from
                self.progress.log(f'encoder initialised from {origin["file"]} ({origin["method"]}, sha256 '
                                  f'{origin["file_sha256"][:12]}): {origin["loaded_encoder_tensors"]} tensors')
        while self.epoch < cfg.epochs:
            epoch, start, losses, metrics = self.epoch, time.time(), [], {}
            lr, temp = self.lr(), self.teacher_temp()
            bar = tqdm(range(cfg.iters_per_epoch), desc=f'epoch {epoch + 1}/{cfg.epochs}',
                       disable=not self.dist.is_main, leave=False)
            for _ in bar:
                losses.append(self.train_step(next(loader)).item())
                for key, value in self.metrics.items():
                    metrics.setdefault(key, []).append(value)
                bar.set_postfix(loss=f'{losses[-1]:.4f}')
            if self.dist.is_main:
                values = dict(loss=_mean(losses), teacher_temp=temp, teacher_momentum=self.teacher_momentum(),
                              lr=lr, weight_decay=self.weight_decay(), epoch_time=time.time() - start,
                              **{key: _mean(v) for key, v in metrics.items()})
                self.progress.record(epoch, **values)
                self.progress.log(f'epoch {epoch + 1}/{cfg.epochs}: ' + ', '.join(f'{k} {v:.4g}'
                                                                                 for k, v in values.items()))
                self.progress.plot()
            self.save_checkpoint('checkpoint_latest.pth')  # every process: the RNG states are gathered
        if self.step == 0:  # the same on every process: all of them stop here
            raise DesdError('no training step was taken (0 epochs or iterations): nothing learnt, so no export is '
                            'written.')
        self.save_checkpoint('checkpoint_final.pth')
        if self.dist.is_main:
            path = self.save_export()
            self.progress.log(f'export written: {path}')
        self.dist.barrier()

    def _initialise_encoder(self, export: PretrainedExport) -> None:
        """Loads ``export``'s encoder into the planned network (the stem adapted to other input channels); a
        different encoder ends with the differing tensors."""
        plan = plan_loading(self.network, export.weights)
        mismatched = [m for m in plan.mismatched if m[0].startswith(ENCODER)]
        missing = [k for k in plan.missing if k.startswith(ENCODER)]
        if mismatched or missing:
            lines = [f'--init {export.file}: its encoder is not the one plans '
                     f'\'{self.prepared.plans_identifier}\' build for {self.prepared.dataset_name}:']
            lines += [f'{k}: checkpoint {a}, network {b}' for k, a, b in mismatched[:8]]
            if missing:
                lines.append(f'missing from the checkpoint: {", ".join(missing[:8])}')
            lines.append('Pre-train with the checkpoint\'s plans (nnssl ResEnc-L: -pl nnUNetPlannerResEncL, or '
                         'plans made like it with desd_plan_like_pretrained).')
            raise DesdError('; '.join(lines))
        self.network.encoder.load_state_dict(plan.encoder_tensors)
        meta = export.metadata
        self.initialised_from = {'file': export.file, 'file_sha256': export.file_sha256, 'method': export.method,
                                 'format': meta.get('format'), 'source_dataset': meta.get('source_dataset'),
                                 'loaded_encoder_tensors': plan.num_loaded, 'adapted_stem': plan.stem_key}

    # checkpoints
    def state_dict(self, rng_states: Optional[list] = None) -> dict:
        """``rng_states``: one RNG state per process (default: this process's only)."""
        return {'format': 'nnunetv2_desd.pretraining', 'version': 1, 'config': self.cfg.to_dict(),
                'network': cpu_state_dict(self.network), 'student_heads': cpu_state_dict(self.student.heads),
                'teacher': cpu_state_dict(self.teacher), 'loss': cpu_state_dict(self.loss),
                'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict() if self.scaler is not None else None,
                'step': self.step, 'rng': rng_states or [capture_rng_state()],
                'initialised_from': self.initialised_from,
                'progress': self.progress.state_dict()}

    def save_checkpoint(self, name: str) -> None:
        """Called by every process (one all_gather of the RNG states); process 0 writes."""
        rng_states = gather_objects(capture_rng_state())
        if self.dist.is_main:
            atomic_save(self.state_dict(rng_states), os.path.join(self.output_folder, name))

    def load_checkpoint(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get('format') != 'nnunetv2_desd.pretraining':
            raise DesdError(f'{path} is not a pre-training checkpoint of nnunetv2_desd.')
        saved, now = ckpt['config'], self.cfg.to_dict()
        changed = [f'{k}: {saved.get(k)} -> {now[k]}' for k in ARCHITECTURE_KEYS if saved.get(k) != now[k]]
        if changed:
            raise DesdError(f'--c: {path} was made with other settings ({"; ".join(changed)}); '
                            f'continue with the original ones.')
        try:
            self.network.load_state_dict(ckpt['network'])
            self.student.heads.load_state_dict(ckpt['student_heads'])
            self.teacher.load_state_dict(ckpt['teacher'])
        except RuntimeError as e:
            raise DesdError(f'--c: {path} does not fit this network (another architecture or plans?): '
                            f'{str(e).splitlines()[0]}') from None
        self.loss.load_state_dict(ckpt['loss'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.scaler is not None and ckpt['scaler'] is not None:
            self.scaler.load_state_dict(ckpt['scaler'])
        self.step = ckpt['step']
        self.initialised_from = ckpt.get('initialised_from')
        self.progress.load_state_dict(ckpt['progress'])
        state = rng_state_of_process(ckpt['rng'], self.dist.rank)
        if state is not None:
            restore_rng_state(state)
        self.progress.log(f'continuing from {path} at epoch {self.epoch}' +
                          ('' if state is not None else f'; no saved RNG state for process {self.dist.rank}'))

    def export(self) -> dict:
        """nnU-Net's pretrained-weights format: the whole planned network with the teacher encoder, plus metadata.

        ReFs: the decoder is the one trained on the reference task; its segmentation outputs (which nnU-Net never
        transfers) are replaced by freshly initialised ones for this dataset's labels, so the export has the
        tensors and shapes of a DeSD export of the same plans.
        """
        network = copy.deepcopy(self.network).cpu()
        network.encoder.load_state_dict(cpu_state_dict(self.teacher.encoder))
        weights = cpu_state_dict(network)
        pm, cm = self.prepared.plans_manager, self.prepared.configuration_manager
        if self.reference is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.cfg.seed)
                template = build_planned_network(pm, cm, self.prepared.num_input_channels,
                                                 self.num_segmentation_heads).state_dict()
            weights = {k: template[k].clone() if '.seg_layers.' in k else weights[k] for k in template}
        metadata = {
            'format': 'nnunetv2_desd.export', 'version': 1, 'method': self.cfg.method,
            'source_dataset': self.prepared.dataset_name, 'plans_source': self.prepared.plans_source,
            'plans_name': self.prepared.plans_identifier, 'configuration': self.prepared.configuration,
            'architecture': {'network_class_name': cm.network_arch_class_name,
                             'arch_kwargs': cm.network_arch_init_kwargs,
                             '_kw_requires_import': list(cm.network_arch_init_kwargs_req_import)},
            'num_input_channels': self.prepared.num_input_channels,
            'channel_names': self.prepared.dataset_json['channel_names'],
            'spacing': list(cm.spacing), 'transpose_forward': list(pm.transpose_forward),
            'normalization_schemes': list(cm.normalization_schemes), 'use_mask_for_norm': list(cm.use_mask_for_norm),
            'foreground_intensity_properties_per_channel': pm.foreground_intensity_properties_per_channel,
            'patch_size': self.patch_size, 'plans_patch_size': list(cm.patch_size),
            'distilled_stages': self.stages, 'epochs': self.epoch, 'steps': self.step,
            'method_settings': self.method.metadata(), 'initialised_from': self.initialised_from,
            'content_sha256': tensor_digest(weights),
        }
        plan = adaptation_plan(pm, cm, self.network, self.prepared.num_input_channels, self.patch_size,
                               self.prepared.dataset_name)
        return {'network_weights': weights, 'desd_export': metadata, 'citations': citations(self.cfg.method),
                **({PLAN_KEY: plan} if plan is not None else {})}

    def save_export(self, name: str = EXPORT_FILE) -> str:
        path = os.path.join(self.output_folder, name)
        atomic_save(self.export(), path)
        return path


def _mean(values) -> float:
    """Mean over the finite values (a step whose AMP scaler skipped it may report none), NaN if there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float('nan')


def average_gradients(parameters) -> None:
    """Averages ``.grad`` over the processes, as DDP does for a plain backward: one all-reduce of all gradients
    (a parameter without gradient counts as zeros where another process has one; None where none has)."""
    import torch.distributed as dist
    params = list(parameters)
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has_grad)
    params = [p for p, h in zip(params, has_grad.tolist()) if h > 0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
