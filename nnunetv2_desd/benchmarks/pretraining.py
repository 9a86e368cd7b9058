"""The DeSD pre-training benchmark: speed and memory of DeSD's step next to nnU-Net's supervised step.

Run by ``desd_pretrain_benchmark`` (``nnunetv2_desd.cli.pretrain_benchmark``) without ``-m`` or with ``-m desd``.
Three timed loops on one planned network, patch and batch: DeSD in memory, DeSD with real loading, and nnU-Net's
``nnUNetTrainer.train_step``. Reports (benchmark.md/.csv/.png) seconds per iteration, iterations/s, peak memory,
DeSD / supervised step (target <= 1.5) and real-loading / in-memory throughput (target >= 0.9).
Details: docs/benchmark.md.
"""
import contextlib
import dataclasses
import io
import itertools
import os
import tempfile
from copy import deepcopy
from importlib.metadata import version
from typing import Dict, List, Tuple

import torch
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_desd.benchmarks.timing import (IN_MEMORY_BATCHES, RATIO_TABLE_HEADER, Phase, device_name, free,
                                             memory_kind, network_signature, peak_mib, prepare_pretraining,
                                             ratio_row, reset_peak, setup_table, time_steps, typical_step_pretrainer,
                                             write_report)
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.wrappers import unwrapped
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.network import planned_patch
from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader

DESD_TO_SUPERVISED_TARGET = 1.5       # one DeSD step costs at most 1.5 supervised steps
LOADING_TO_IN_MEMORY_TARGET = 0.9     # real loading keeps at least 90 % of the in-memory throughput
PHASES = (('desd_in_memory', 'DeSD, in memory'), ('desd_real_loading', 'DeSD, real loading'),
          ('supervised', 'nnU-Net supervised'))


@dataclasses.dataclass
class BenchmarkResult:
    setup: Dict[str, str]             # what was measured, for the table
    memory_kind: str                  # 'CUDA max allocated' or 'process peak RSS'
    phases: Dict[str, Phase] = dataclasses.field(default_factory=dict)

    @property
    def desd_to_supervised(self) -> float:
        return self.phases['desd_in_memory'].mean / self.phases['supervised'].mean

    @property
    def loading_to_in_memory(self) -> float:
        return self.phases['desd_in_memory'].mean / self.phases['desd_real_loading'].mean


# measuring
def loader_buffer_size(loader, num_workers: int) -> int:
    """Batches NonDetMultiThreadedAugmenter can hold ready: its two queues, the pinning thread, one per worker."""
    if num_workers == 0:
        return 0
    return 2 * loader.num_cached + 1 + num_workers


# the supervised reference: nnU-Net's own trainer
@contextlib.contextmanager
def supervised_trainer(prepared, device: torch.device, compile_network: bool):
    """An initialised ``nnUNetTrainer`` (fold 0) on ``prepared``'s plans; its log folder is temporary.

    ``initialize()`` builds the network, SGD/poly-lr and the Dice+CE deep-supervision loss; it needs the
    preprocessed folder but no data loaders.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # heavy: imported when timed
    plans = deepcopy(prepared.plans)
    plans['continue_training'] = False  # nnUNetTrainer pops it (run_training sets it)
    previous = os.environ.get('nnUNet_results')
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:
        os.environ['nnUNet_results'] = scratch  # the trainer makes its output folder and log file at construction
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # citation banner, device line
                trainer = nnUNetTrainer(plans, prepared.configuration, 0, prepared.dataset_json, device)
        finally:
            if previous is None:
                del os.environ['nnUNet_results']
            else:
                os.environ['nnUNet_results'] = previous
        if not compile_network:
            trainer._do_i_compile = lambda: False
        trainer.initialize()
        yield trainer


def supervised_batch(trainer, batch_size: int, patch: List[int], seed: int, pin: bool) -> dict:
    """Random images (B, C, *patch) and int16 deep-supervision targets, one per output scale, as nnU-Net's
    loader delivers them: (B, 1, *round(patch * scale)) labels, or (B, R, ...) 0/1 maps for regions."""
    g = torch.Generator().manual_seed(seed)
    lm = trainer.label_manager
    data = torch.randn((batch_size, trainer.num_input_channels, *patch), generator=g)
    channels, high = (lm.num_segmentation_heads, 2) if lm.has_regions else (1, lm.num_segmentation_heads)
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        shape = [round(p * s) for p, s in zip(patch, scale)]
        targets.append(torch.randint(0, high, (batch_size, channels, *shape), generator=g, dtype=torch.int16))
    if pin:
        data, targets = data.pin_memory(), [t.pin_memory() for t in targets]
    return {'data': data, 'target': targets}


def _time_supervised(cfg: PretrainConfig, prepared, patch: List[int], device: torch.device, warmup: int,
                     measure: int, compile_network: bool) -> Tuple[Phase, Tuple[str, int], bool]:
    free(device)
    reset_peak(device)
    with supervised_trainer(prepared, device, compile_network) as trainer:
        batch = supervised_batch(trainer, cfg.batch_size, patch, cfg.seed, device.type == 'cuda')
        seconds = time_steps(lambda: trainer.train_step(batch), warmup, measure, device)
        phase = Phase('supervised', PHASES[2][1], seconds, peak_mib(device))
        compiled = unwrapped(trainer.network) is not trainer.network  # one process: no DDP, so torch.compile's
        return phase, network_signature(trainer.network), compiled


def _time_desd(cfg: PretrainConfig, prepared, ctx, workers: int, warmup: int, measure: int
               ) -> Tuple[Phase, Phase, Tuple[str, int], List[int], int]:
    """In-memory then real-loading loop on one Pretrainer and one view loader."""
    device = ctx.device
    free(device)
    reset_peak(device)
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:  # the Pretrainer's (empty) log
        pretrainer = typical_step_pretrainer(cfg, prepared, ctx, scratch)
        loader = build_view_loader(prepared, pretrainer.patch_size, cfg.batch_size, workers,
                                   pin_memory=device.type == 'cuda')
        try:
            fetched = [next(loader) for _ in range(min(IN_MEMORY_BATCHES, warmup + measure))]
            batches = itertools.cycle(fetched)
            seconds = time_steps(lambda: pretrainer.train_step(next(batches)), warmup, measure, device)
            in_memory = Phase('desd_in_memory', PHASES[0][1], seconds, peak_mib(device))
            batches = fetched = None  # free them before the real-loading loop

            reset_peak(device)
            buffered = loader_buffer_size(loader, workers)  # filled while the in-memory loop ran: drain it
            seconds = time_steps(lambda: pretrainer.train_step(next(loader)), warmup + buffered, measure,
                                 device)
            real = Phase('desd_real_loading', PHASES[1][1], seconds, peak_mib(device))
        finally:
            finish_loader(loader)
        return in_memory, real, network_signature(pretrainer.network), pretrainer.stages, buffered


def run_benchmark(cfg: PretrainConfig, warmup_iters: int, measure_iters: int,
                  supervised_compile: bool = False) -> Tuple[BenchmarkResult, object]:
    """Prepares the data, times the three loops; returns the result and the PreparedData."""
    if warmup_iters < 0 or measure_iters < 1:
        raise DesdError(f'--warmup-iters {warmup_iters} --measure-iters {measure_iters}: '
                        f'need warm-up >= 0 and at least 1 timed iteration.')
    if cfg.continue_training:
        raise DesdError('--c: the benchmark starts from scratch and writes no checkpoints; leave --c out.')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise DesdError('the benchmark runs in one process; start it without torchrun.')
    ctx, prepared = prepare_pretraining(cfg)
    device = ctx.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training, for both steps
    patch = planned_patch(cfg.patch_size, prepared.configuration_manager)
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    kind = memory_kind(device)

    # supervised first: on CPU the peak RSS cannot be reset, so the smaller step goes before the larger one
    supervised, supervised_net, compiled = _time_supervised(cfg, prepared, patch, device, warmup_iters,
                                                            measure_iters, supervised_compile)
    free(device)
    in_memory, real, desd_net, stages, buffered = _time_desd(cfg, prepared, ctx, workers, warmup_iters,
                                                             measure_iters)
    free(device)
    if desd_net != supervised_net:
        raise RuntimeError(f'the DeSD network {desd_net} differs from the supervised one {supervised_net}')

    setup = {
        'dataset': prepared.dataset_name,
        'device': device_name(device),
        'torch / nnU-Net': f'{torch.__version__} / {version("nnunetv2")}',
        'configuration / plans': f'{prepared.configuration} / {prepared.plans_identifier}',
        'network': f'{desd_net[0]}, {desd_net[1]:,} parameters (the same planned network for both steps)',
        'patch': ' x '.join(map(str, patch)),
        'batch': f'{cfg.batch_size} x {prepared.num_input_channels} channel(s); DeSD: 2 views each, so student '
                 f'and teacher see {2 * cfg.batch_size} crops',
        'DeSD heads': f'stages {stages}, K = {cfg.out_dim}, hidden {cfg.head_hidden_dim}, '
                      f'bottleneck {cfg.head_bottleneck_dim}',
        'augmentation workers': f'{workers}' + (' (in-process)' if workers == 0 else ''),
        'mixed precision': 'yes (both steps)' if device.type == 'cuda' else 'no (CPU)',
        'cudnn.benchmark': 'on, as in nnU-Net\'s run_training (both steps)' if device.type == 'cuda' else 'n/a',
        'supervised torch.compile': 'yes' if compiled else 'no',
        'iterations': f'{warmup_iters} warm-up + {measure_iters} timed per loop; real loading first drains '
                      f'{buffered} buffered batches',
        'peak memory': kind + (' per loop' if device.type == 'cuda' else
                               ' of the process so far; loops run supervised, in memory, real loading'),
    }
    phases = {p.name: p for p in (in_memory, real, supervised)}
    return BenchmarkResult(setup, kind, phases), prepared


# reporting
def rows(result: BenchmarkResult) -> List[Tuple[str, float, str, str]]:
    """(quantity, value, unit, target) for benchmark.csv."""
    out = []
    for name, _ in PHASES:
        ph = result.phases[name]
        out += [(f'{name}_seconds_per_iteration', ph.mean, 's', ''),
                (f'{name}_seconds_per_iteration_std', ph.std, 's', ''),
                (f'{name}_iterations_per_second', ph.iters_per_s, '1/s', ''),
                (f'{name}_peak_memory', ph.peak_mib, f'MiB ({result.memory_kind})', '')]
    out += [('desd_to_supervised_step_ratio', result.desd_to_supervised, '', f'<= {DESD_TO_SUPERVISED_TARGET}'),
            ('real_loading_to_in_memory_throughput_ratio', result.loading_to_in_memory, '',
             f'>= {LOADING_TO_IN_MEMORY_TARGET}')]
    return out


def markdown(result: BenchmarkResult) -> str:
    lines = setup_table('DeSD pre-training benchmark', result.setup)
    lines += ['', f'| loop | s / iteration | iterations / s | {result.memory_kind} [MiB] |', '|---|---|---|---|']
    for name, label in PHASES:
        ph = result.phases[name]
        lines.append(f'| {label} | {ph.mean:.4g} ± {ph.std:.2g} | {ph.iters_per_s:.3g} | {ph.peak_mib:,.0f} |')
    lines += ['', *RATIO_TABLE_HEADER,
              ratio_row('DeSD step / supervised step', result.desd_to_supervised, '<=', DESD_TO_SUPERVISED_TARGET),
              ratio_row('real-loading / in-memory throughput', result.loading_to_in_memory, '>=',
                        LOADING_TO_IN_MEMORY_TARGET)]
    return '\n'.join(lines) + '\n'


def plot(result: BenchmarkResult, path: str) -> None:
    """Bar chart of the three step times (ms, ± std) with the two ratios."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, and for the figure only
    from matplotlib.figure import Figure
    order = ('desd_in_memory', 'desd_real_loading', 'supervised')
    ms = [1e3 * result.phases[n].mean for n in order]
    err = [1e3 * result.phases[n].std for n in order]
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bars = ax.bar([result.phases[n].label for n in order], ms, yerr=err, capsize=5,
                  color=['tab:blue', 'tab:cyan', 'tab:gray'])
    ax.bar_label(bars, labels=[f'{m:.4g} ms' for m in ms], padding=3)
    ax.set_ylabel('time per iteration [ms]')
    ax.set_ylim(0, 1.35 * max(m + e for m, e in zip(ms, err)))
    ax.set_title(f'{result.setup["dataset"]}: patch {result.setup["patch"]}, batch '
                 f'{result.setup["batch"].split(" ")[0]}\n{result.setup["device"]}', fontsize=9)
    ax.text(0.02, 0.97, f'DeSD / supervised step: {result.desd_to_supervised:.2f} '
                        f'(target <= {DESD_TO_SUPERVISED_TARGET})\nreal loading / in memory throughput: '
                        f'{result.loading_to_in_memory:.2f} (target >= {LOADING_TO_IN_MEMORY_TARGET})',
            transform=ax.transAxes, va='top', fontsize=8)
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format='png', dpi=120)


def write_outputs(result: BenchmarkResult, out: str) -> str:
    """benchmark.md, benchmark.csv and benchmark.png in ``out``; returns the Markdown."""
    return write_report(out, 'benchmark', markdown(result), rows(result), lambda f: plot(result, f))
