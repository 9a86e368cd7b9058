"""``desd_pretrain_benchmark``: speed and memory of DeSD pre-training next to nnU-Net's supervised step.

One run, one planned network, one patch and one batch size, three timed loops:

* DeSD, in memory: ``Pretrainer.train_step`` on a few view batches fetched beforehand and reused;
* DeSD, real loading: the same steps fed by ``build_view_loader`` (nnU-Net's loader and augmentation workers);
* nnU-Net supervised: ``nnUNetTrainer.train_step`` (nnU-Net's own network, Dice+CE deep-supervision loss,
  SGD, AMP on CUDA, gradient clipping) on random images and deep-supervision targets.

Reported: seconds per iteration, iterations/s, peak memory, and two ratios with their targets:
DeSD step / supervised step (target <= 1.5) and real-loading / in-memory throughput (target >= 0.9).
Warm-up iterations are not timed; on CUDA the clock is read after ``torch.cuda.synchronize``. Both real
training loops wait for the GPU at the end of every step anyway (desd_pretrain reads ``loss.item()``, nnU-Net
copies the loss to the CPU), so a clock per iteration changes nothing.
"""
import argparse
import contextlib
import csv
import dataclasses
import gc
import io
import itertools
import os
import platform
import resource
import sys
import tempfile
import time
from copy import deepcopy
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from nnunetv2_desd.common.errors import DesdError, command_errors
from nnunetv2_desd.cli import pretrain as cli
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.common.checkpoint import atomic_write, atomic_write_text
from nnunetv2_desd.pretraining.methods.cads import CADS as CADSInputs

DESD_TO_SUPERVISED_TARGET = 1.5       # one DeSD step costs at most 1.5 supervised steps
LOADING_TO_IN_MEMORY_TARGET = 0.9     # real loading keeps at least 90 % of the in-memory throughput
IN_MEMORY_BATCHES = 4                 # distinct pre-fetched batches the in-memory loop cycles through
BAR_COLORS = ('tab:blue', 'tab:orange', 'tab:red', 'tab:pink', 'tab:green')
BENCH_OPTIONS = ('warmup_iters', 'measure_iters', 'out', 'supervised_compile')
PHASES = (('desd_in_memory', 'DeSD, in memory'), ('desd_real_loading', 'DeSD, real loading'),
          ('supervised', 'nnU-Net supervised'))


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """``desd_pretrain``'s arguments plus the benchmark's own."""
    p = cli.build_parser()
    p.prog = 'desd_pretrain_benchmark'
    p.description = __doc__
    p.formatter_class = _HelpFormatter
    g = p.add_argument_group('benchmark')
    g.add_argument('--warmup-iters', type=int, default=5,
                   help='untimed iterations before each timed loop (and torch.compile, if any)')
    g.add_argument('--measure-iters', type=int, default=20, help='timed iterations per loop')
    g.add_argument('--out', default=None,
                   help='folder for benchmark.md/.csv/.png; None means nnUNet_results/<dataset>/desd_benchmark')
    g.add_argument('--supervised-compile', action='store_true',
                   help='let nnU-Net torch.compile the supervised network as it does by default on CUDA '
                        '(off: DeSD runs eager, so the ratio compares eager with eager)')
    return p


def parse_args(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, dict]:
    """(PretrainConfig, benchmark options). desd_pretrain options that are no PretrainConfig field (say
    --preprocess-only) are accepted by the parser but only at their defaults."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    options = {k: args.pop(k) for k in BENCH_OPTIONS}
    config_keys = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in [k for k in args if k not in config_keys]:
        if args.pop(key) != parser.get_default(key):
            parser.error(f'--{key.replace("_", "-")} is a desd_pretrain option the benchmark does not use')
    return PretrainConfig.create(**args), options


@dataclasses.dataclass
class Phase:
    name: str
    label: str
    seconds: List[float]              # one per timed iteration
    peak_mib: float

    @property
    def mean(self) -> float:
        return float(np.mean(self.seconds))

    @property
    def std(self) -> float:
        return float(np.std(self.seconds))

    @property
    def iters_per_s(self) -> float:
        return 1.0 / self.mean


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
def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, measure: int, device: torch.device) -> List[float]:
    """Runs ``step`` warmup + measure times; returns the wall time of each timed call, GPU work included."""
    for _ in range(warmup):
        step()
    _sync(device)
    seconds = []
    for _ in range(measure):
        start = time.perf_counter()
        step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def _reset_peak(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process' peak RSS since start (it cannot be reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def _device_name(device: torch.device) -> str:
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    return f'CPU {model}, {torch.get_num_threads()} torch threads'


def loader_buffer_size(loader, num_workers: int) -> int:
    """Batches NonDetMultiThreadedAugmenter can hold ready: its two queues, the pinning thread, one per worker."""
    if num_workers == 0:
        return 0
    return 2 * loader.num_cached + 1 + num_workers


def _check_patch(patch: List[int], pool_op_kernel_sizes) -> None:
    divisor = np.prod(np.asarray(pool_op_kernel_sizes), axis=0)
    if any(p % int(d) for p, d in zip(patch, divisor)):
        raise DesdError(f'--patch-size {" ".join(map(str, patch))}: the network downsamples by '
                        f'{" x ".join(str(int(d)) for d in divisor)}; use multiples of these.')


# the supervised reference: nnU-Net's own trainer
@contextlib.contextmanager
def supervised_trainer(prepared, device: torch.device, compile_network: bool):
    """An initialised ``nnUNetTrainer`` (fold 0) on ``prepared``'s plans; its log folder is temporary.

    ``initialize()`` builds the network, SGD/poly-lr and the Dice+CE deep-supervision loss; it needs the
    preprocessed folder but no data loaders.
    """
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
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


def _network_signature(network: torch.nn.Module) -> Tuple[str, int]:
    network = getattr(network, '_orig_mod', network)  # under torch.compile
    return type(network).__name__, sum(p.numel() for p in network.parameters())


def _time_supervised(cfg: PretrainConfig, prepared, patch: List[int], device: torch.device, warmup: int,
                     measure: int, compile_network: bool) -> Tuple[Phase, Tuple[str, int], bool]:
    _free(device)
    _reset_peak(device)
    with supervised_trainer(prepared, device, compile_network) as trainer:
        batch = supervised_batch(trainer, cfg.batch_size, patch, cfg.seed, device.type == 'cuda')
        seconds = time_steps(lambda: trainer.train_step(batch), warmup, measure, device)
        phase = Phase('supervised', PHASES[2][1], seconds, _peak_mib(device))
        compiled = hasattr(trainer.network, '_orig_mod')
        return phase, _network_signature(trainer.network), compiled


def typical_step_pretrainer(cfg: PretrainConfig, prepared, ctx, log_dir: str):
    """A silently built ``Pretrainer`` at its typical step: past the first epoch(s), whose prototypes stay frozen."""
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer
    with contextlib.redirect_stdout(io.StringIO()):  # citation banner, device line
        pretrainer = Pretrainer(cfg, prepared, ctx, log_dir)
    pretrainer.step = cfg.freeze_last_layer_epochs * cfg.iters_per_epoch
    return pretrainer


def _time_desd(cfg: PretrainConfig, prepared, ctx, workers: int, warmup: int, measure: int
               ) -> Tuple[Phase, Phase, Tuple[str, int], List[int], int]:
    """In-memory then real-loading loop on one Pretrainer and one view loader."""
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    device = ctx.device
    _free(device)
    _reset_peak(device)
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:  # the Pretrainer's (empty) log
        pretrainer = typical_step_pretrainer(cfg, prepared, ctx, scratch)
        loader = build_view_loader(prepared, pretrainer.patch_size, cfg.batch_size, workers,
                                   pin_memory=device.type == 'cuda')
        try:
            fetched = [next(loader) for _ in range(min(IN_MEMORY_BATCHES, warmup + measure))]
            batches = itertools.cycle(fetched)
            seconds = time_steps(lambda: pretrainer.train_step(next(batches)), warmup, measure, device)
            in_memory = Phase('desd_in_memory', PHASES[0][1], seconds, _peak_mib(device))
            batches = fetched = None  # free them before the real-loading loop

            _reset_peak(device)
            buffered = loader_buffer_size(loader, workers)  # filled while the in-memory loop ran: drain it
            seconds = time_steps(lambda: pretrainer.train_step(next(loader)), warmup + buffered, measure,
                                 device)
            real = Phase('desd_real_loading', PHASES[1][1], seconds, _peak_mib(device))
        finally:
            if hasattr(loader, '_finish'):
                loader._finish()
        return in_memory, real, _network_signature(pretrainer.network), pretrainer.stages, buffered


def run_benchmark(cfg: PretrainConfig, warmup_iters: int, measure_iters: int,
                  supervised_compile: bool = False) -> Tuple[BenchmarkResult, object]:
    """Prepares the data, times the three loops; returns the result and the PreparedData."""
    from importlib.metadata import version

    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.distributed import init_distributed

    if warmup_iters < 0 or measure_iters < 1:
        raise DesdError(f'--warmup-iters {warmup_iters} --measure-iters {measure_iters}: '
                        f'need warm-up >= 0 and at least 1 timed iteration.')
    if cfg.continue_training:
        raise DesdError('--c: the benchmark starts from scratch and writes no checkpoints; leave --c out.')
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:
        raise DesdError('the benchmark runs in one process; start it without torchrun.')
    ctx = init_distributed(cfg.device)
    device = ctx.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True  # as nnU-Net's run_training, for both steps
    prepared = prepare_pretraining_data(cfg.dataset, cfg.configuration, cfg.plans, cfg.planner, cfg.plans_from,
                                        cfg.num_preprocessing_processes)
    cfg.plans = prepared.plans_identifier
    cm = prepared.configuration_manager
    patch = [int(p) for p in (cfg.patch_size or cm.patch_size)]
    _check_patch(patch, cm.pool_op_kernel_sizes)
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    memory_kind = 'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'

    # supervised first: on CPU the peak RSS cannot be reset, so the smaller step goes before the larger one
    supervised, supervised_net, compiled = _time_supervised(cfg, prepared, patch, device, warmup_iters,
                                                            measure_iters, supervised_compile)
    _free(device)
    in_memory, real, desd_net, stages, buffered = _time_desd(cfg, prepared, ctx, workers, warmup_iters,
                                                             measure_iters)
    _free(device)
    if desd_net != supervised_net:
        raise RuntimeError(f'the DeSD network {desd_net} differs from the supervised one {supervised_net}')

    setup = {
        'dataset': prepared.dataset_name,
        'device': _device_name(device),
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
        'peak memory': memory_kind + (' per loop' if device.type == 'cuda' else
                                      ' of the process so far; loops run supervised, in memory, real loading'),
    }
    phases = {p.name: p for p in (in_memory, real, supervised)}
    return BenchmarkResult(setup, memory_kind, phases), prepared


# CADS against DeSD: same network, patch, batch and pre-fetched batches
CADS_TO_DESD_STEP_TARGET = 0.5
CADS_TO_DESD_MEMORY_TARGET = 0.6


def activation_mib(step: Callable[[], object], parameters=()) -> float:
    """MiB of the tensors autograd keeps for the backward pass during ``step`` (``parameters`` excluded, shared
    storages counted once): the training memory that grows with the input, measured the same way on any device."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(storages.values()) / 2 ** 20


@dataclasses.dataclass
class MethodComparison:
    setup: Dict[str, str]
    memory_kind: str
    phases: Dict[str, Phase]            # 'desd', 'cads'
    activations: Dict[str, float]       # MiB kept for backward, per method

    def step_ratio(self) -> float:
        return self.phases['cads'].mean / self.phases['desd'].mean

    def memory_ratio(self) -> float:
        """CUDA: peak allocated; CPU (whose peak RSS cannot be reset between loops): activations."""
        if self.memory_kind == 'CUDA max allocated':
            return self.phases['cads'].peak_mib / self.phases['desd'].peak_mib
        return self.activations['cads'] / self.activations['desd']


def compare_cads_with_desd(cfg: PretrainConfig, warmup: int, measure: int) -> Tuple[MethodComparison, object]:
    """Times ``Pretrainer.train_step`` of CADS and of DeSD (``cfg`` with method 'desd', all else equal) on the
    same pre-fetched CADS batches (DeSD ignores their DRRs)."""
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    from nnunetv2_desd.pretraining.distributed import init_distributed
    ctx = init_distributed(cfg.device)
    device = ctx.device
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    phases, activations, networks = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:
        batches = None
        for method in ('cads', 'desd'):  # CPU peak RSS only grows: the smaller step first
            _free(device)
            _reset_peak(device)
            pretrainer = typical_step_pretrainer(dataclasses.replace(cfg, method=method), prepared, ctx, scratch)
            if batches is None:
                loader = build_view_loader(prepared, pretrainer.patch_size, cfg.batch_size, 0,
                                           drr_files=prepared.drr_files)
                batches = [next(loader) for _ in range(IN_MEMORY_BATCHES)]
            cycle = itertools.cycle(batches)
            seconds = time_steps(lambda: pretrainer.train_step(next(cycle)), warmup, measure, device)
            phases[method] = Phase(method, method.upper() if method == 'cads' else 'DeSD', seconds, _peak_mib(device))
            activations[method] = activation_mib(lambda: pretrainer.train_step(next(cycle)),
                                                 [*pretrainer.student.parameters(), *pretrainer.teacher.parameters()])
            networks[method] = _network_signature(pretrainer.network)
            pretrainer = None  # freed before the next method is built
    memory_kind = 'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'
    patch = [int(p) for p in (cfg.patch_size or prepared.configuration_manager.patch_size)]
    block = CADSInputs(cfg.mask_ratio, cfg.mask_patch).block
    setup = {
        'dataset': prepared.dataset_name,
        'device': _device_name(device),
        'network': f'{networks["cads"][0]}, {networks["cads"][1]:,} parameters (the same for both methods)',
        'patch': ' x '.join(map(str, patch)),
        'batch': f'{cfg.batch_size} volumes x 2 views; CADS packs each view to '
                 f'{patch[0]} x {patch[1] // block} x {patch[2] // block} (mask ratio {cfg.mask_ratio:g}, patch '
                 f'{"x".join(map(str, cfg.mask_patch))}) and adds one DRR per volume',
        'heads': f'K = {cfg.out_dim}, hidden {cfg.head_hidden_dim}, bottleneck {cfg.head_bottleneck_dim}',
        'optimisation': f'{cfg.optimizer}, clip {cfg.clip_grad:g} (the same for both)',
        'iterations': f'{warmup} warm-up + {measure} timed per method, on {IN_MEMORY_BATCHES} pre-fetched batches',
        'memory': ('CUDA max allocated per method' if device.type == 'cuda' else
                   'activations kept for backward (the peak RSS of a CPU process cannot be reset between methods)'),
    }
    return MethodComparison(setup, memory_kind, phases, activations), prepared


def comparison_markdown(result: MethodComparison) -> str:
    lines = [f'## CADS vs DeSD pre-training step: {result.setup["dataset"]}', '', '| setting | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in result.setup.items() if k != 'dataset']
    lines += ['', f'| method | s / iteration | activations kept for backward [MiB] | {result.memory_kind} [MiB] |',
              '|---|---|---|---|']
    for name in ('desd', 'cads'):
        ph = result.phases[name]
        lines.append(f'| {ph.label} | {ph.mean:.4g} ± {ph.std:.2g} | {result.activations[name]:,.1f} | '
                     f'{ph.peak_mib:,.0f} |')
    met = {True: 'yes', False: 'no'}
    r1, r2 = result.step_ratio(), result.memory_ratio()
    lines += ['', '| ratio | value | target | met |', '|---|---|---|---|',
              f'| CADS step / DeSD step | {r1:.3f} | <= {CADS_TO_DESD_STEP_TARGET} | '
              f'{met[r1 <= CADS_TO_DESD_STEP_TARGET]} |',
              f'| CADS memory / DeSD memory ({"CUDA peak" if result.memory_kind.startswith("CUDA") else "activations"})'
              f' | {r2:.3f} | <= {CADS_TO_DESD_MEMORY_TARGET} | {met[r2 <= CADS_TO_DESD_MEMORY_TARGET]} |']
    return '\n'.join(lines) + '\n'


def bar_panels(path: str, labels: List[str], panels, suptitle: str, figsize=(8, 4), tick_size=None) -> None:
    """A PNG with one bar chart per panel: (y label, one value per label, title or None)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    for i, (ylabel, values, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        bars = ax.bar(labels, values, color=BAR_COLORS[:len(values)])
        ax.bar_label(bars, labels=[f'{v:,.0f}' if v >= 1000 else f'{v:.4g}' for v in values], padding=3)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.3 * max(values))
        if title:
            ax.set_title(title, fontsize=9)
        if tick_size:
            ax.tick_params(axis='x', labelsize=tick_size)
    fig.suptitle(suptitle, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format='png', dpi=120)


def setup_title(setup: dict) -> str:
    return f'{setup["dataset"]}, patch {setup["patch"]}; {setup["device"]}'


def comparison_plot(result: MethodComparison, path: str) -> None:
    """Two panels: time per step and memory, DeSD next to CADS."""
    names = ('desd', 'cads')
    cuda = result.memory_kind.startswith('CUDA')
    panels = (('time per iteration [ms]', [1e3 * result.phases[n].mean for n in names],
               f'CADS / DeSD = {result.step_ratio():.2f} (target <= {CADS_TO_DESD_STEP_TARGET})'),
              ('CUDA peak [MiB]' if cuda else 'activations for backward [MiB]',
               [result.phases[n].peak_mib if cuda else result.activations[n] for n in names],
               f'CADS / DeSD = {result.memory_ratio():.2f} (target <= {CADS_TO_DESD_MEMORY_TARGET})'))
    bar_panels(path, [result.phases[n].label for n in names], panels, setup_title(result.setup))


def write_report(out: str, name: str, text: str, quantities, draw: Callable[[str], None]) -> str:
    """``name``.md (``text``), ``name``.csv (rows quantity, value, unit, target) and ``name``.png (``draw(path)``)
    in ``out``, each written atomically; returns ``text``."""
    os.makedirs(out, exist_ok=True)
    atomic_write_text(text, os.path.join(out, name + '.md'))
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(('quantity', 'value', 'unit', 'target'))
    writer.writerows((q, repr(float(v)), u, t) for q, v, u, t in quantities)
    atomic_write_text(buffer.getvalue(), os.path.join(out, name + '.csv'))
    atomic_write(os.path.join(out, name + '.png'), draw)
    return text


def write_comparison(result: MethodComparison, out: str) -> str:
    """cads_vs_desd.md/.csv/.png in ``out``; returns the Markdown."""
    quantities = [(f'{n}_seconds_per_iteration', result.phases[n].mean, 's', '') for n in ('desd', 'cads')]
    quantities += [(f'{n}_activations_for_backward', result.activations[n], 'MiB', '') for n in ('desd', 'cads')]
    quantities += [(f'{n}_peak_memory', result.phases[n].peak_mib, f'MiB ({result.memory_kind})', '')
                   for n in ('desd', 'cads')]
    quantities += [('cads_to_desd_step_ratio', result.step_ratio(), '', f'<= {CADS_TO_DESD_STEP_TARGET}'),
                   ('cads_to_desd_memory_ratio', result.memory_ratio(), '', f'<= {CADS_TO_DESD_MEMORY_TARGET}')]
    return write_report(out, 'cads_vs_desd', comparison_markdown(result), quantities,
                        lambda f: comparison_plot(result, f))


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
    lines = [f'## DeSD pre-training benchmark: {result.setup["dataset"]}', '', '| setting | value |', '|---|---|']
    lines += [f'| {k} | {v} |' for k, v in result.setup.items() if k != 'dataset']
    lines += ['', f'| loop | s / iteration | iterations / s | {result.memory_kind} [MiB] |', '|---|---|---|---|']
    for name, label in PHASES:
        ph = result.phases[name]
        lines.append(f'| {label} | {ph.mean:.4g} ± {ph.std:.2g} | {ph.iters_per_s:.3g} | {ph.peak_mib:,.0f} |')
    r1, r2 = result.desd_to_supervised, result.loading_to_in_memory
    met = {True: 'yes', False: 'no'}
    lines += ['', '| ratio | value | target | met |', '|---|---|---|---|',
              f'| DeSD step / supervised step | {r1:.3f} | <= {DESD_TO_SUPERVISED_TARGET} | '
              f'{met[r1 <= DESD_TO_SUPERVISED_TARGET]} |',
              f'| real-loading / in-memory throughput | {r2:.3f} | >= {LOADING_TO_IN_MEMORY_TARGET} | '
              f'{met[r2 >= LOADING_TO_IN_MEMORY_TARGET]} |']
    return '\n'.join(lines) + '\n'


def plot(result: BenchmarkResult, path: str) -> None:
    """Bar chart of the three step times (ms, ± std) with the two ratios."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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


def default_out_folder(dataset_name: str) -> str:
    from nnunetv2.paths import nnUNet_results
    if not nnUNet_results:  # nnU-Net's _EnvPath: false when the variable is unset
        raise DesdError('nnUNet_results is not set: set it or give --out FOLDER.')
    return os.path.join(os.fspath(nnUNet_results), dataset_name, 'desd_benchmark')


def main(argv: Optional[List[str]] = None) -> None:
    cfg, options = parse_args(argv)
    with command_errors('desd_pretrain_benchmark'):
        if options['out'] is None:
            default_out_folder('')  # fail before measuring, not after
        if cfg.method == 'cads':
            comparison, prepared = compare_cads_with_desd(cfg, options['warmup_iters'], options['measure_iters'])
            out = options['out'] or default_out_folder(prepared.dataset_name)
            text = write_comparison(comparison, out)
        elif cfg.method == 'refs':
            from nnunetv2_desd.benchmarks.refs import compare_refs_with_desd, write_refs_comparison
            comparison, prepared = compare_refs_with_desd(cfg, options['warmup_iters'], options['measure_iters'])
            out = options['out'] or default_out_folder(prepared.dataset_name)
            text = write_refs_comparison(comparison, out)
        else:
            result, prepared = run_benchmark(cfg, options['warmup_iters'], options['measure_iters'],
                                             options['supervised_compile'])
            out = options['out'] or default_out_folder(prepared.dataset_name)
            text = write_outputs(result, out)
    print(text)
    print(f'written to {out}: ' + {'cads': 'cads_vs_desd', 'refs': 'refs_vs_desd'}.get(cfg.method, 'benchmark')
          + '.md/.csv/.png')


if __name__ == '__main__':
    main()
