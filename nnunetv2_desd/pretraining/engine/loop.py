"""The pre-training loop: student/teacher, schedules, AMP, DDP, checkpoints, progress, export; the method's own
parts come from its hooks (``methods/base.py``)."""
import copy
import math
import os
import time
from typing import Iterator, Optional, Union

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from nnunetv2_desd.common.checkpoint import (atomic_save, capture_rng_state, cpu_state_dict, load_checkpoint,
                                             restore_rng_state, rng_state_of_process, tensor_digest)
from nnunetv2_desd.common.errors import DesdError, RunInterrupted
from nnunetv2_desd.common.export_record import ExportRecord
from nnunetv2_desd.common.nnssl import PLAN_KEY, adaptation_plan, citations
from nnunetv2_desd.common.pretrained_weights import PretrainedExport, initialise_encoder
from nnunetv2_desd.data.planning import PreparedData, PreparedPool, as_pool
from nnunetv2_desd.pretraining.config import PretrainConfig, option_name
from nnunetv2_desd.pretraining.distributed import DistContext, derived_seed, gather_objects
from nnunetv2_desd.pretraining.engine.ema import ema_update
from nnunetv2_desd.pretraining.engine.optim import clip_per_parameter_
from nnunetv2_desd.pretraining.engine.progress import ProgressLog, RunningMeans, stop_on_signals
from nnunetv2_desd.pretraining.engine.schedules import cosine, linear_warmup_constant, warmup_cosine
from nnunetv2_desd.pretraining.losses import DeepSelfDistillationLoss
from nnunetv2_desd.pretraining.methods.base import StepContext
from nnunetv2_desd.pretraining.methods.registry import METHODS
from nnunetv2_desd.pretraining.network import (MultiStageDistillationNetwork, build_planned_network, planned_encoder,
                                               planned_patch, resolve_stages)
from nnunetv2_desd.pretraining.views.loader import LOADER_ERROR

EXPORT_FILE = 'pretrained_export.pth'
LOG_EVERY_STEPS = 25     # the progress bar's loss is read (one host sync) this often
STOP_CHECK_STEPS = 10    # under DDP the processes agree on a stop signal this often (one all-reduce)
SCHEDULE_KEYS = ('epochs', 'iters_per_epoch')  # a change moves every schedule: refused on resume unless allowed
# a resumed run must build the same modules as the checkpoint (and keep the method's resume_keys)
ARCHITECTURE_KEYS = ('configuration', 'out_dim', 'sinkhorn_queue', 'stages', 'head_hidden_dim', 'head_bottleneck_dim',
                     'head_norm')


def output_folder_for(prepared: Union[PreparedPool, PreparedData], method: str) -> str:
    """``<nnUNet_results>/<first dataset>/<method>__<plans>__<configuration>[__pool_<ids of the others>]``."""
    if not nnUNet_results:
        raise DesdError('nnUNet_results must be set: checkpoints and the export are written there.')
    names = as_pool(prepared).dataset_names
    pool = '' if len(names) == 1 else '__pool_' + '_'.join(n[7:10] for n in names[1:])
    return os.path.join(nnUNet_results, prepared.dataset_name,
                        f'{method}__{prepared.plans_identifier}__{prepared.configuration}{pool}')


class Pretrainer:
    def __init__(self, cfg: PretrainConfig, prepared: Union[PreparedPool, PreparedData], dist_ctx: DistContext,
                 output_folder: str, init: Optional[PretrainedExport] = None):
        """``init``: a PretrainedExport (``--init``) whose encoder starts student and teacher."""
        self.cfg, self.prepared, self.dist, self.output_folder = cfg.check(), as_pool(prepared), dist_ctx, output_folder
        prepared = self.prepared
        self.initialised_from = None
        self.device = dist_ctx.device
        torch.manual_seed(cfg.seed)

        cm = prepared.configuration_manager
        self.patch_size = planned_patch(cfg.patch_size, cm)
        if cfg.method not in METHODS:
            raise DesdError(f'-m {cfg.method!r}: choose {", ".join(METHODS)}.')
        self.method = METHODS[cfg.method].build(cfg, prepared, self.patch_size)
        self.network = build_planned_network(prepared.plans_manager, cm, prepared.num_input_channels,
                                             self.method.num_outputs(prepared))
        if init is not None:
            self.initialised_from = initialise_encoder(self.network, init, prepared.plans_identifier,
                                                       prepared.dataset_name)
        encoder = planned_encoder(self.network, drr_path=self.method.drr_path)
        self.stages = resolve_stages(len(encoder.output_channels), cfg.stages)
        head_args = (cfg.out_dim, cfg.head_hidden_dim, cfg.head_bottleneck_dim, cfg.head_norm)
        self.student = MultiStageDistillationNetwork(encoder, self.stages, *head_args)
        self.teacher = MultiStageDistillationNetwork(copy.deepcopy(encoder), self.stages[-1:], *head_args)
        self.teacher.heads[0].load_state_dict(self.student.heads[-1].state_dict())
        self.teacher.requires_grad_(False)
        self.loss = DeepSelfDistillationLoss(cfg.out_dim, cfg.student_temp, cfg.center_momentum,
                                             cfg.sinkhorn_queue)
        self.to(self.device)
        # the networks start alike on every process (the same seed above); from here each process draws its own
        torch.manual_seed(derived_seed(cfg.seed, dist_ctx.rank))
        np.random.seed(derived_seed(cfg.seed, dist_ctx.rank, 'numpy'))

        self.student_forward: nn.Module = self.student
        if dist_ctx.enabled:
            # global batch statistics in the heads of student and teacher alike (SyncBN is CUDA-only in torch)
            if self.device.type == 'cuda' and self.method.sync_batchnorm():
                self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
                self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
            if self.method.ddp_wrapper:
                self.student_forward = DDP(self.student, device_ids=[self.device.index]
                                           if self.device.type == 'cuda' else None)

        self.global_batch = cfg.batch_size * dist_ctx.world_size
        self.peak_lr = cfg.lr * self.global_batch / 256  # a resumed run keeps its own (load_checkpoint)
        self.epoch_sums = RunningMeans(self.device)  # the current epoch's per-step values, summed on the device
        self.stop_signal: Optional[str] = None
        self.total_steps = cfg.epochs * cfg.iters_per_epoch
        # the student (encoder and heads), plus the method's own
        self.optimized_parameters = list(self.student.parameters()) + self.method.extra_parameters(self.network)
        self.optimizer = self._build_optimizer()
        # autocast: float16 on CUDA, bfloat16 on CPU; the GradScaler works on either
        self.amp = self.device.type == 'cuda' if cfg.amp is None else bool(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp else None
        self.step = 0
        self.method.attach(self.context)
        self.metrics = {}  # extra per-step values of the method (e.g. its losses)
        self.progress = ProgressLog(output_folder, dist_ctx.is_main, name=cfg.method,
                                    reference_lines={'loss': (math.log(cfg.out_dim), 'ln K (uniform student)'),
                                                     'entropy': (math.log(cfg.out_dim), 'ln K')})

    def to(self, target) -> 'Pretrainer':
        """Moves (or casts) every module the engine runs: the whole planned network (the decoder too, which a method
        may train), the student's heads, the teacher and the loss's state."""
        for module in (self.network, self.student, self.teacher, self.loss):
            module.to(target)
        return self

    @property
    def context(self) -> StepContext:
        """What the method's hooks see of the engine, at the current step."""
        return StepContext(self.dist, self.cfg.seed, self.amp, self.scaler, self.student, self.network, self.ssl_loss,
                           self.optimized_parameters, self.step, self.cfg.deterministic)

    def method_loader(self, views, num_workers: int):
        """The training batches of the method: ``views`` (the view loader's batches), or more."""
        return self.method.loader(self.context, views, num_workers)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay = [p for p in self.optimized_parameters if p.ndim > 1]
        no_decay = [p for p in self.optimized_parameters if p.ndim <= 1]  # biases and norms
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

    def lr(self, step: Optional[int] = None) -> float:
        return warmup_cosine(self.step if step is None else step, self.total_steps,
                             self.cfg.warmup_epochs * self.cfg.iters_per_epoch, self.peak_lr, self.cfg.min_lr)

    def teacher_momentum(self, step: Optional[int] = None) -> float:
        return cosine(self.step if step is None else step, self.total_steps, self.cfg.teacher_momentum,
                      self.cfg.teacher_momentum_end)

    def weight_decay(self, step: Optional[int] = None) -> float:
        if self.cfg.weight_decay_end is None:
            return self.cfg.weight_decay
        return cosine(self.step if step is None else step, self.total_steps, self.cfg.weight_decay,
                      self.cfg.weight_decay_end)

    def teacher_temp(self, step: Optional[int] = None) -> float:
        epoch = (self.step if step is None else step) // self.cfg.iters_per_epoch
        return linear_warmup_constant(epoch, self.cfg.warmup_teacher_temp_epochs,
                                      self.cfg.warmup_teacher_temp, self.cfg.teacher_temp)

    def ssl_loss(self, batch: dict, student=None) -> torch.Tensor:
        """The self-distillation loss of a view batch (updates the loss's centre); ``student``: the forward to
        use instead of ``self.student_forward`` (e.g. the student at other parameter values)."""
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
        returns this process's loss, on the device (``train_epoch`` averages it over processes at logging time)."""
        if LOADER_ERROR in batch:
            raise DesdError(batch[LOADER_ERROR])
        for group in self.optimizer.param_groups:
            group['lr'] = self.lr()
            if not group.get('no_decay'):
                group['weight_decay'] = self.weight_decay()
        self.optimizer.zero_grad(set_to_none=True)
        loss, method_metrics = self.method.compute_gradients(self.context, batch)  # fills .grad
        self.metrics = {**method_metrics, **self.loss.diagnostics}  # tensors: read at logging time
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        for head in self.student.heads:
            head.cancel_prototype_gradients(self.epoch, self.cfg.freeze_last_layer_epochs)
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
        return loss.detach()

    def run(self, loader: Iterator[dict]) -> None:
        cfg = self.cfg
        if self.dist.is_main:
            self.progress.log('pool: ' + '; '.join(
                f'{d["dataset"]} {d["cases"]} cases' + (f' (weight {d["weight"]:g})' if d['weight'] else '') +
                (f', {len(d["excluded_cases"])} bad cases left out: {", ".join(d["excluded_cases"])}'
                 if d['excluded_cases'] else '') for d in self.prepared.summary()))
            self.progress.log(f'{cfg.method} pre-training of {", ".join(self.prepared.dataset_names)}: network '
                              f'{self.prepared.configuration_manager.network_arch_class_name}, distilled stages '
                              f'{self.stages}, patch {self.patch_size}, batch {cfg.batch_size} x '
                              f'{self.dist.world_size} process(es), peak lr {self.peak_lr:.3g}, device {self.device}')
            if self.initialised_from is not None and self.step == 0:
                origin = self.initialised_from
                self.progress.log(f'encoder initialised from {origin["file"]} ({origin["method"]}, sha256 '
                                  f'{origin["file_sha256"][:12]}): {origin["loaded_encoder_tensors"]} tensors')
        with stop_on_signals(self):
            while self.epoch < cfg.epochs:
                self.train_epoch(loader)
        if self.step == 0:  # the same on every process: all of them stop here
            raise DesdError('no training step was taken (0 epochs or iterations): nothing learnt, so no export is '
                            'written.')
        self.save_checkpoint('checkpoint_final.pth')
        if self.dist.is_main:
            path = self.save_export()
            self.progress.log(f'export written: {path}')
        self.dist.barrier()

    def train_epoch(self, loader: Iterator[dict]) -> None:
        """The rest of the current epoch (all of it, unless resumed mid-epoch), its log line and checkpoint; stops
        at a step boundary on every process when a stop signal arrived (``stop_on_signals``)."""
        cfg, epoch = self.cfg, self.epoch
        first = epoch * cfg.iters_per_epoch
        start = time.time() - float(self.epoch_sums.seconds)
        bar = tqdm(total=cfg.iters_per_epoch, initial=self.step - first, desc=f'epoch {epoch + 1}/{cfg.epochs}',
                   disable=not self.dist.is_main, leave=False)
        while self.step < first + cfg.iters_per_epoch:
            self.epoch_sums.add(loss=self.train_step(next(loader)), **self.metrics)
            bar.update()
            if self.dist.is_main and self.step % LOG_EVERY_STEPS == 0:  # one host sync per interval
                bar.set_postfix(loss=f'{self.epoch_sums.local_mean("loss"):.4f}')
            if self.stop_requested():
                self.epoch_sums.seconds = time.time() - start
                bar.close()
                self.stop()
        bar.close()
        means = self.epoch_sums.means()  # every process: one all-reduce, one host sync
        if self.dist.is_main:
            values = dict(loss=means.pop('loss'), teacher_temp=self.teacher_temp(first),
                          teacher_momentum=self.teacher_momentum(first + cfg.iters_per_epoch),
                          lr=self.lr(first), weight_decay=self.weight_decay(first), epoch_time=time.time() - start,
                          **means)
            self.progress.record(epoch, **values)
            self.progress.log(f'epoch {epoch + 1}/{cfg.epochs}: ' +
                              ', '.join(f'{k} {v:.4g}' for k, v in values.items()))
            self.progress.plot()
        self.epoch_sums = RunningMeans(self.device)
        self.save_checkpoint('checkpoint_latest.pth')  # every process: the RNG states are gathered
        if self.stop_requested(every_step=True):
            self.stop()

    def stop_requested(self, every_step: bool = False) -> bool:
        """Whether a stop signal reached any process: agreed by one all-reduce every STOP_CHECK_STEPS steps under
        DDP (a host sync), read from this process's flag alone otherwise."""
        if not self.dist.enabled:
            return self.stop_signal is not None
        if not every_step and self.step % STOP_CHECK_STEPS:
            return False
        flag = torch.tensor([float(self.stop_signal is not None)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def stop(self) -> None:
        """Writes checkpoint_latest at this step (every process) and ends the run with RunInterrupted."""
        self.save_checkpoint('checkpoint_latest.pth')
        message = (f'{self.stop_signal or "a stop signal on another process"} received: checkpoint_latest.pth written '
                   f'at step {self.step} (epoch {self.epoch + 1}, step {self.step % self.cfg.iters_per_epoch} of '
                   f'{self.cfg.iters_per_epoch}); continue with the same command and --c.')
        self.progress.log(message)
        raise RunInterrupted(message)

    # checkpoints
    def state_dict(self, rng_states: Optional[list] = None) -> dict:
        """``rng_states``: one RNG state per process (default: this process's only)."""
        return {'format': 'nnunetv2_desd.pretraining', 'version': 1, 'config': self.cfg.to_dict(),
                'network': cpu_state_dict(self.network), 'student_heads': cpu_state_dict(self.student.heads),
                'teacher': cpu_state_dict(self.teacher), 'loss': cpu_state_dict(self.loss),
                'optimizer': self.optimizer.state_dict(),
                'scaler': self.scaler.state_dict() if self.scaler is not None else None,
                'step': self.step, 'rng': rng_states or [capture_rng_state()],
                'world_size': self.dist.world_size, 'peak_lr': self.peak_lr, 'epoch_sums': self.epoch_sums.state_dict(),
                'initialised_from': self.initialised_from,
                'progress': self.progress.state_dict()}

    def save_checkpoint(self, name: str) -> None:
        """Called by every process (one all_gather of the RNG states); process 0 writes."""
        rng_states = gather_objects(capture_rng_state())
        state = self.state_dict(rng_states)  # every process: the epoch's sums are all-reduced
        if self.dist.is_main:
            atomic_save(state, os.path.join(self.output_folder, name))

    def load_checkpoint(self, path: str) -> None:
        ckpt = load_checkpoint(path)
        if ckpt.get('format') != 'nnunetv2_desd.pretraining':
            raise DesdError(f'{path} is not a pre-training checkpoint of nnunetv2_desd.')
        saved, now = ckpt['config'], self.cfg.to_dict()
        changed = [f'{k}: {saved.get(k)} -> {now[k]}' for k in ARCHITECTURE_KEYS + self.method.resume_keys
                   if saved.get(k) != now[k]]
        if changed:
            raise DesdError(f'--c: {path} was made with other settings ({"; ".join(changed)}); '
                            f'continue with the original ones.')
        schedule = [f'{option_name(k)} {saved.get(k)} -> {now[k]}' for k in SCHEDULE_KEYS if saved.get(k) != now[k]]
        if schedule and not self.cfg.allow_schedule_change:
            raise DesdError(f'--c: {path} was made with {"; ".join(schedule)}: that changes the lr, teacher and '
                            f'weight-decay schedules mid-run. Continue with the original values, or add '
                            f'--allow-schedule-change.')
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
        self.epoch_sums.load_state_dict(ckpt.get('epoch_sums'), self.dist.rank)
        notes = [f'schedule changed ({"; ".join(schedule)}), allowed by --allow-schedule-change'] if schedule else []
        saved_world = ckpt.get('world_size', self.dist.world_size)
        if saved_world != self.dist.world_size and 'peak_lr' in ckpt:
            self.peak_lr = float(ckpt['peak_lr'])
            notes.append(f'{saved_world} process(es) before, {self.dist.world_size} now: the global batch is '
                         f'{self.global_batch} instead of {ckpt["peak_lr"] * 256 / self.cfg.lr:.0f}; the run keeps its '
                         f'peak lr {self.peak_lr:.3g}')
        state = rng_state_of_process(ckpt['rng'], self.dist.rank)
        if state is not None:
            restore_rng_state(state)
        if state is None:
            notes.append(f'no saved RNG state for process {self.dist.rank}')
        self.progress.log(f'continuing from {path} at step {self.step} (epoch {self.epoch + 1})' +
                          ''.join(f'; {note}' for note in notes))

    def export(self) -> dict:
        """nnU-Net's pretrained-weights format: the whole planned network with the teacher encoder (then what the
        method changes, ``export_weights``), plus metadata."""
        network = copy.deepcopy(self.network).cpu()
        network.encoder.load_state_dict(cpu_state_dict(self.teacher.encoder))
        weights = self.method.export_weights(self.context, cpu_state_dict(network))
        pm, cm = self.prepared.plans_manager, self.prepared.configuration_manager
        record = ExportRecord(
            method=self.cfg.method, source_dataset=self.prepared.dataset_name,
            plans_source=self.prepared.plans_source, pool=self.prepared.summary(),
            plans_name=self.prepared.plans_identifier, configuration=self.prepared.configuration,
            architecture={'network_class_name': cm.network_arch_class_name,
                          'arch_kwargs': cm.network_arch_init_kwargs,
                          '_kw_requires_import': list(cm.network_arch_init_kwargs_req_import)},
            num_input_channels=self.prepared.num_input_channels,
            channel_names=self.prepared.dataset_json['channel_names'],
            spacing=list(cm.spacing), transpose_forward=list(pm.transpose_forward),
            normalization_schemes=list(cm.normalization_schemes), use_mask_for_norm=list(cm.use_mask_for_norm),
            foreground_intensity_properties_per_channel=pm.foreground_intensity_properties_per_channel,
            patch_size=self.patch_size, plans_patch_size=list(cm.patch_size),
            distilled_stages=self.stages, epochs=self.epoch, steps=self.step,
            method_settings=self.method.metadata(), initialised_from=self.initialised_from,
            content_sha256=tensor_digest(weights),
        )
        plan = adaptation_plan(pm, cm, self.network, self.prepared.num_input_channels, self.patch_size,
                               '+'.join(self.prepared.dataset_names))
        return {'network_weights': weights, 'desd_export': record.to_dict(), 'citations': citations(self.cfg.method),
                **({PLAN_KEY: plan} if plan is not None else {})}

    def save_export(self, name: str = EXPORT_FILE) -> str:
        path = os.path.join(self.output_folder, name)
        atomic_save(self.export(), path)
        return path

