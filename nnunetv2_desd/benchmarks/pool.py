"""The pool-size benchmark: how the cost of a pre-training run grows with the number of cases N in its pool.

Run by ``desd_pool_benchmark`` (``nnunetv2_desd.cli.pool_benchmark``). Each N gets nnU-Net folders of its own
(``<out>/pools/N<N>``) with a synthetic pool or the first N cases of a dataset. Measured per N: preparation per
case, start-up to the first batch, the loader workers' peak RSS and seconds per step (DeSD and CADS); the ratio of
the largest to the smallest N is compared with its target in ``MEASURES``. Report: pool_benchmark.md/.csv/.png/.json.
How each measure is taken, and the measured results: docs/scale.md.
"""
import contextlib
import csv
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_desd.common.checkpoint import atomic_write, atomic_write_json, atomic_write_text
from nnunetv2_desd.benchmarks.timing import device_name, setup_table, time_steps
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.raw import read_raw_dataset
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.pretraining.distributed import init_distributed
from nnunetv2_desd.pretraining.engine.loop import Pretrainer, output_folder_for
from nnunetv2_desd.pretraining.run import prepare_data
from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader

POOL_DATASET_ID = 990
POOL_DATASET_NAME = 'PoolBench'
CONFIGURATION = '3d_fullres'
METHODS = ('desd', 'cads')
SMALL_HEADS = ('--out-dim', '64', '--head-hidden-dim', '32', '--head-bottleneck-dim', '16')
REPORT = 'pool_benchmark'


@dataclasses.dataclass(frozen=True)
class Measure:
    key: str
    label: str
    unit: str
    target: float  # largest-N value / smallest-N value must stay at or below


MEASURES = (
    Measure('preparation_seconds_per_case', 'preparation per case (desd_pretrain --preprocess-only)', 's', 1.15),
    Measure('startup_seconds', 'start-up to the first batch, prepared (DeSD)', 's', 1.1),
    Measure('desd_worker_peak_rss_mib', 'loader worker peak RSS, DeSD', 'MiB', 1.1),
    Measure('cads_worker_peak_rss_mib', 'loader worker peak RSS, CADS', 'MiB', 1.1),
    Measure('desd_seconds_per_step', 'seconds per training step, DeSD', 's', 1.1),
    Measure('cads_seconds_per_step', 'seconds per training step, CADS', 's', 1.1),
)
STARTUP_PARTS = ('prepare_data', 'Pretrainer', 'loader', 'first_batch')


@dataclasses.dataclass
class Settings:
    sizes: List[int]
    out: str
    dataset: Optional[str] = None        # an existing dataset whose first N cases make each pool; None: synthetic
    shape: Tuple[int, int, int] = (32, 32, 32)
    shape_jitter: int = 4
    patch_size: Tuple[int, int, int] = (32, 32, 32)
    batch_size: int = 2
    num_workers: int = 2
    num_processes: int = 2
    warmup_steps: int = 2
    steps: int = 10
    device: str = 'cpu'
    keep: bool = False
    seed: int = 0

    def check(self) -> 'Settings':
        if not self.sizes or min(self.sizes) < 2:
            raise DesdError(f'--sizes {" ".join(map(str, self.sizes))}: give pool sizes of at least 2 cases.')
        if len(set(self.sizes)) != len(self.sizes):
            raise DesdError(f'--sizes {" ".join(map(str, self.sizes))}: each size once.')
        for name in ('batch_size', 'num_workers', 'num_processes', 'warmup_steps', 'steps'):
            if getattr(self, name) < 1:
                why = ' (the loader\'s worker processes are measured)' if name == 'num_workers' else ''
                option = '-np' if name == 'num_processes' else '--' + name.replace('_', '-')
                raise DesdError(f'{option} {getattr(self, name)}: must be at least 1{why}.')
        if self.shape_jitter < 0 or min(self.shape) - self.shape_jitter < 8:
            raise DesdError(f'--shape {" ".join(map(str, self.shape))} with --shape-jitter {self.shape_jitter}: '
                            f'each size minus the jitter must be at least 8 voxels.')
        if min(self.patch_size) < 1:
            raise DesdError(f'--patch-size {" ".join(map(str, self.patch_size))}: three positive sizes.')
        self.sizes = sorted(self.sizes)
        return self


@dataclasses.dataclass
class PoolResult:
    size: int
    values: Dict[str, float]             # MEASURES' keys
    details: Dict[str, object]           # the raw numbers: start-up parts, every step, every worker's peak, ...


# the pools
def pool_env(root: str) -> Dict[str, str]:
    """This process' environment with nnU-Net's three folders under ``root`` (created)."""
    env = dict(os.environ)
    for key, sub in (('nnUNet_raw', 'raw'), ('nnUNet_preprocessed', 'preprocessed'), ('nnUNet_results', 'results')):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
        env[key] = os.path.join(root, sub)
    env.update(nnUNet_compile='false', PYTHONUNBUFFERED='1')
    return env


def read_source(dataset: str):
    """The existing dataset (in this process' nnUNet_raw) the pools are cut from."""
    raw = read_raw_dataset(dataset)
    if not raw.cases:
        raise DesdError(f'{raw.folder} has no images in imagesTr.')
    return raw


def link_subset(raw, size: int, raw_root: str) -> str:
    """``raw_root/<raw's folder name>`` with symlinks to the images (and labels) of raw's first ``size`` cases."""
    if size > len(raw.cases):
        raise DesdError(f'--sizes {size}: {raw.name} has only {len(raw.cases)} cases.')
    folder = os.path.join(raw_root, raw.name)
    os.makedirs(os.path.join(folder, 'imagesTr'))
    ending, labelled = raw.dataset_json['file_ending'], raw.has_labels
    cases = sorted(raw.cases)[:size]
    for case in cases:
        for image in raw.cases[case]:
            os.symlink(os.path.abspath(image), os.path.join(folder, 'imagesTr', os.path.basename(image)))
        if labelled:
            os.makedirs(os.path.join(folder, 'labelsTr'), exist_ok=True)
            os.symlink(os.path.abspath(os.path.join(raw.folder, 'labelsTr', case + ending)),
                       os.path.join(folder, 'labelsTr', case + ending))
    atomic_write_json({**raw.dataset_json, 'numTraining': size}, os.path.join(folder, 'dataset.json'))
    return raw.name


def make_pool(settings: Settings, size: int, raw_root: str, source=None) -> str:
    """Writes the pool of ``size`` cases into ``raw_root``; returns the dataset to give ``-d``."""
    if source is not None:
        return link_subset(source, size, raw_root)
    return write_synthetic_dataset(raw_root, POOL_DATASET_ID, name=POOL_DATASET_NAME, n_cases=size,
                                   shape=settings.shape, shape_jitter=settings.shape_jitter, seed=settings.seed)


def pretrain_command() -> List[str]:
    """This environment's desd_pretrain (its console script, or the module where the script is not installed)."""
    script = os.path.join(os.path.dirname(sys.executable), 'desd_pretrain')
    return [script] if os.path.isfile(script) else [sys.executable, '-m', 'nnunetv2_desd.cli.pretrain']


def preparation_args(settings: Settings, dataset: str, method: str = 'desd') -> List[str]:
    """desd_pretrain's arguments for preparing the pool."""
    method_args = [] if method == 'desd' else ['-m', method]
    return ['-d', dataset, *method_args, '--preprocess-only', '-np', str(settings.num_processes), '-c', CONFIGURATION,
            '--patch-size', *map(str, settings.patch_size), '-device', settings.device]


def training_args(settings: Settings, dataset: str, method: str) -> List[str]:
    """desd_pretrain's arguments for training on the prepared pool."""
    return ['-d', dataset, '-m', method, '-c', CONFIGURATION, '-device', settings.device,
            '--patch-size', *map(str, settings.patch_size), '--batch-size', str(settings.batch_size),
            '--num-workers', str(settings.num_workers), '-np', str(settings.num_processes), *SMALL_HEADS]


def run_logged(command: List[str], env: Dict[str, str], log: str, what: str) -> float:
    """Runs ``command`` with its output in ``log``; returns its wall time in seconds (start to exit)."""
    with open(log, 'w') as f:
        f.write(' '.join(command) + '\n\n')
        f.flush()
        start = time.perf_counter()
        code = subprocess.call(command, env=env, stdout=f, stderr=subprocess.STDOUT)
        seconds = time.perf_counter() - start
    if code != 0:
        with open(log) as f:
            lines = [line.strip() for line in f if line.strip()]
        raise DesdError(f'{what} failed (exit {code}): {lines[-1] if lines else "no output"} (full output: {log})')
    return seconds


def measure_pool(settings: Settings, size: int, source=None, log=print) -> PoolResult:
    """Every measure at pool size ``size``, in fresh nnU-Net folders under ``<out>/pools/N<size>``."""
    root = os.path.join(os.path.abspath(settings.out), 'pools', f'N{size}')
    logs = os.path.join(os.path.abspath(settings.out), 'logs')
    os.makedirs(logs, exist_ok=True)
    shutil.rmtree(root, ignore_errors=True)  # a kept pool of an earlier run: start fresh
    env = pool_env(root)
    try:
        log(f'N = {size}: writing the pool')
        dataset = make_pool(settings, size, env['nnUNet_raw'], source)
        log(f'N = {size}: preparing (desd_pretrain --preprocess-only)')
        preparation = run_logged(pretrain_command() + preparation_args(settings, dataset), env,
                                 os.path.join(logs, f'N{size}_prepare.log'),
                                 f'N = {size}: desd_pretrain --preprocess-only')
        log(f'N = {size}: preparing CADS\'s DRRs (not a measure)')
        drrs = run_logged(pretrain_command() + preparation_args(settings, dataset, 'cads'), env,
                          os.path.join(logs, f'N{size}_prepare_cads.log'),
                          f'N = {size}: desd_pretrain -m cads --preprocess-only')
        runs = {}
        for method in METHODS:
            log(f'N = {size}: start-up and {settings.warmup_steps} + {settings.steps} steps of {method}')
            result = os.path.join(root, f'{method}_worker.json')
            command = [sys.executable, '-m', 'nnunetv2_desd.cli.pool_benchmark', '--worker', result,
                       '--warmup-steps', str(settings.warmup_steps), '--steps', str(settings.steps),
                       '--', *training_args(settings, dataset, method)]
            run_logged(command, env, os.path.join(logs, f'N{size}_{method}.log'), f'N = {size}: the {method} run')
            with open(result) as f:
                runs[method] = json.load(f)
    finally:
        if not settings.keep:
            shutil.rmtree(root, ignore_errors=True)
    values = {'preparation_seconds_per_case': preparation / size, 'startup_seconds': runs['desd']['startup_seconds']}
    for method in METHODS:
        values[f'{method}_worker_peak_rss_mib'] = max(runs[method]['worker_peak_rss_mib'])
        values[f'{method}_seconds_per_step'] = sum(runs[method]['step_seconds']) / len(runs[method]['step_seconds'])
    details = {'dataset': dataset, 'preparation_seconds': preparation, 'cads_preparation_seconds': drrs, **runs}
    return PoolResult(size, values, details)


def run_benchmark(settings: Settings, log=print) -> List[PoolResult]:
    """Measures every pool size, smallest first."""
    settings.check()
    source = read_source(settings.dataset) if settings.dataset is not None else None
    if source is not None and settings.sizes[-1] > len(source.cases):
        raise DesdError(f'--sizes {settings.sizes[-1]}: {source.name} has only {len(source.cases)} cases.')
    results = [measure_pool(settings, size, source, log) for size in settings.sizes]
    pools = os.path.join(os.path.abspath(settings.out), 'pools')
    if not settings.keep and os.path.isdir(pools) and not os.listdir(pools):
        os.rmdir(pools)
    return results


# the worker: one desd_pretrain run, measured in-process
def child_pids(pid: int) -> List[int]:
    """The processes ``pid`` started that are still running (``/proc/<pid>/task/*/children``)."""
    pids = set()
    for path in glob.glob(f'/proc/{pid}/task/*/children'):
        with contextlib.suppress(OSError), open(path) as f:
            pids.update(int(p) for p in f.read().split())
    if not pids and not glob.glob(f'/proc/{pid}/task/*/children'):  # kernels without the children file
        pids = {p.pid for p in multiprocessing.active_children()}
    return sorted(pids)


def peak_rss_mib(pid: int) -> float:
    """``VmHWM`` (the peak resident set size) of process ``pid``, in MiB."""
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmHWM:'):
                return int(line.split()[1]) / 1024  # kB
    raise DesdError(f'/proc/{pid}/status has no VmHWM line.')


def measure_run(cfg, warmup_steps: int, steps: int) -> dict:
    """Start-up, step times and the loader workers' peak RSS of one desd_pretrain run whose data are prepared,
    following ``pretraining.run.run`` call by call."""
    marks = [time.perf_counter()]
    ctx = init_distributed(cfg.device)
    prepared = prepare_data(cfg, ctx)  # finds everything prepared
    cfg.plans = prepared.plans_identifier
    marks.append(time.perf_counter())
    folder = output_folder_for(prepared, cfg.method)
    os.makedirs(folder, exist_ok=True)
    trainer = Pretrainer(cfg, prepared, ctx, folder)
    marks.append(time.perf_counter())
    before = set(child_pids(os.getpid()))
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    loader = trainer.method_loader(build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                                                     pin_memory=ctx.device.type == 'cuda',
                                                     drr_files=prepared.drr_files), workers)
    marks.append(time.perf_counter())
    try:
        batch = next(loader)
        marks.append(time.perf_counter())
        loader_pids = sorted(set(child_pids(os.getpid())) - before)
        if not loader_pids:
            raise DesdError('the loader started no worker process: give --num-workers 1 or more.')
        # the typical step: past the epochs whose prototypes stay frozen (as the other benchmarks)
        trainer.step = cfg.freeze_last_layer_epochs * cfg.iters_per_epoch
        trainer.train_step(batch)  # the first warm-up step
        seconds = time_steps(lambda: trainer.train_step(next(loader)), warmup_steps - 1, steps, ctx.device)
        worker_peaks = [peak_rss_mib(pid) for pid in loader_pids]
    finally:
        finish_loader(loader)
    cases = prepared.cases() if hasattr(prepared, 'cases') else prepared.identifiers  # a pool, or one dataset
    return {'device': device_name(ctx.device), 'cases': len(cases),
            'startup_seconds': marks[-1] - marks[0],
            'startup_parts': {part: b - a for part, a, b in zip(STARTUP_PARTS, marks, marks[1:])},
            'step_seconds': seconds, 'worker_pids': loader_pids, 'worker_peak_rss_mib': worker_peaks,
            'main_peak_rss_mib': peak_rss_mib(os.getpid())}


# the report
def ratio(result_values: Sequence[float]) -> float:
    """Value at the largest N / value at the smallest (results sorted by N); NaN for a single size."""
    return result_values[-1] / result_values[0] if len(result_values) > 1 else float('nan')


def _ratio_cells(value: float, target: float) -> str:
    if value != value:  # NaN: one size only
        return f'n/a | <= {target} | - |'
    return f'{value:.3f} | <= {target} | {"yes" if value <= target else "no"} |'


def environment_line() -> str:
    cpus = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else cpus
    return (f'{cpus} CPUs ({usable} usable), torch {torch.__version__}, Python {platform.python_version()}, '
            f'{platform.system()} {platform.release()}')


def setup(settings: Settings, results: List[PoolResult]) -> Dict[str, str]:
    if settings.dataset is None:
        shape = ' x '.join(map(str, settings.shape))
        pools = f'synthetic CT-like pools ({shape} voxels, +-{settings.shape_jitter} per axis)'
    else:
        pools = f'the first N cases of {results[0].details["dataset"]}'
    return {'dataset': pools,
            'device': results[0].details['desd']['device'],
            'patch': ' x '.join(map(str, settings.patch_size)),
            'run': f'{CONFIGURATION}, batch {settings.batch_size}, {settings.num_workers} loader worker(s), '
                   f'-np {settings.num_processes}, heads {" ".join(SMALL_HEADS)}',
            'steps': f'{settings.warmup_steps} warm-up (the first on the start-up batch) + {settings.steps} timed, '
                     f'real loading',
            'sizes': ', '.join(map(str, settings.sizes))}


def _number(value: float) -> str:
    return f'{value:.4g}'


def markdown(settings: Settings, results: List[PoolResult], command: str) -> str:
    sizes = [r.size for r in results]
    lines = ['# Pool-size benchmark', '', f'command: `{command}`', '', f'environment: {environment_line()}', '',
             *setup_table('pools', setup(settings, results)), '',
             '| measure | unit | ' + ' | '.join(f'N = {n}' for n in sizes) + ' | ratio | target | met |',
             '|---|---|' + '---|' * len(sizes) + '---|---|---|']
    for m in MEASURES:
        values = [r.values[m.key] for r in results]
        lines.append(f'| {m.label} | {m.unit} | ' + ' | '.join(_number(v) for v in values) + ' | ' +
                     _ratio_cells(ratio(values), m.target))
    lines += ['', f'ratio: value at N = {sizes[-1]} / value at N = {sizes[0]}.', '', '### Details (no targets)', '',
              '| quantity | unit | ' + ' | '.join(f'N = {n}' for n in sizes) + ' |',
              '|---|---|' + '---|' * len(sizes)]
    details = [(f'start-up part: {part}', 's', [r.details['desd']['startup_parts'][part] for r in results])
               for part in STARTUP_PARTS]
    details += [('CADS DRR preparation per case (desd_pretrain -m cads --preprocess-only)', 's',
                 [r.details['cads_preparation_seconds'] / r.size for r in results])]
    details += [(f'training process peak RSS, {m.upper() if m == "cads" else "DeSD"}', 'MiB',
                 [r.details[m]['main_peak_rss_mib'] for r in results]) for m in METHODS]
    lines += [f'| {label} | {unit} | ' + ' | '.join(_number(v) for v in values) + ' |'
              for label, unit, values in details]
    lines += ['', 'Preparation: wall time of the desd_pretrain process on a fresh pool, start to exit, / N. Start-up: '
              'in-process, from init_distributed (after the imports) to the first batch in hand, data prepared. Worker '
              'RSS: the largest VmHWM among the loader\'s augmentation processes after the timed steps. Step: '
              'train_step(next(loader)), mean of the timed steps.']
    return '\n'.join(lines) + '\n'


def csv_text(results: List[PoolResult]) -> str:
    """One row per measure: measure, unit, one column per N, ratio, target."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(['measure', 'unit', *[f'N={r.size}' for r in results], 'ratio', 'target'])
    for m in MEASURES:
        values = [r.values[m.key] for r in results]
        writer.writerow([m.key, m.unit, *map(repr, map(float, values)), repr(ratio(values)), f'<= {m.target}'])
    return buffer.getvalue()


def draw(results: List[PoolResult], title: str, f) -> None:
    """One panel per measure against N (log x); the dashed line is the largest N's limit (smallest N x target)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, for the figure only
    from matplotlib.figure import Figure
    fig = Figure(figsize=(12, 7))
    FigureCanvasAgg(fig)
    sizes = [r.size for r in results]
    for i, m in enumerate(MEASURES):
        ax = fig.add_subplot(2, 3, i + 1)
        values = [r.values[m.key] for r in results]
        ax.plot(sizes, values, marker='o')
        ax.axhline(values[0] * m.target, color='tab:red', linestyle='--', linewidth=1,
                   label=f'limit: N = {sizes[0]} x {m.target}')
        ax.set_xscale('log')
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_ylim(0, 1.3 * max(max(values), values[0] * m.target))
        ax.set_xlabel('cases in the pool (N)')
        ax.set_ylabel(m.unit)
        ax.set_title(f'{m.label}\nratio {ratio(values):.3f} (target <= {m.target})', fontsize=8)
        ax.legend(fontsize=7, loc='lower right')
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(f, format='png', dpi=110)


def write_outputs(settings: Settings, results: List[PoolResult], command: str) -> str:
    """pool_benchmark.md/.csv/.png/.json in ``settings.out``; returns the Markdown."""
    out = settings.out
    os.makedirs(out, exist_ok=True)
    text = markdown(settings, results, command)
    atomic_write_text(text, os.path.join(out, REPORT + '.md'))
    atomic_write_text(csv_text(results), os.path.join(out, REPORT + '.csv'))
    info = setup(settings, results)
    atomic_write(os.path.join(out, REPORT + '.png'),
                 lambda f: draw(results, f'{info["dataset"]}, patch {info["patch"]}; {info["device"]}', f))
    atomic_write_json({'command': command, 'environment': environment_line(), 'settings': dataclasses.asdict(settings),
                       'results': [dataclasses.asdict(r) for r in results]}, os.path.join(out, REPORT + '.json'))
    return text
