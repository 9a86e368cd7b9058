"""What the benchmarks share: timed steps, peak and activation memory, the device line, the typical pre-training
step and its batches, and the report files (Markdown tables, bar charts; md/csv/png written atomically).

Timing: warm-up calls are not timed; on CUDA the clock is read after ``torch.cuda.synchronize``. Memory: on CUDA
the max allocated since the last reset; on CPU the process' peak RSS (it cannot be reset, so the benchmarks run
their smaller steps first), and, the same way on any device, what autograd keeps for backward.
"""
import contextlib
import csv
import dataclasses
import gc
import io
import os
import platform
import resource
import sys
import time
import weakref
from typing import Callable, Dict, Iterable, List, Tuple

import numpy as np
import torch
from nnunetv2.paths import nnUNet_results

from nnunetv2_desd.common.checkpoint import atomic_write, atomic_write_text
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.wrappers import unwrapped
from nnunetv2_desd.pretraining.distributed import init_distributed
from nnunetv2_desd.pretraining.engine.loop import Pretrainer
from nnunetv2_desd.pretraining.run import prepare_data
from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader

IN_MEMORY_BATCHES = 4                 # distinct pre-fetched batches an in-memory loop cycles through
BAR_COLORS = ('tab:blue', 'tab:orange', 'tab:red', 'tab:pink', 'tab:green')
RATIO_TABLE_HEADER = ('| ratio | value | target | met |', '|---|---|---|---|')


@dataclasses.dataclass
class Phase:
    """One timed loop: its seconds per iteration and the peak memory it reached."""
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


# measuring
def sync(device: torch.device) -> None:
    """Waits for the device's queued work (CUDA); nothing to wait for on CPU."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], warmup: int, measure: int, device: torch.device) -> List[float]:
    """Runs ``step`` warmup + measure times; returns the wall time of each timed call, GPU work included."""
    for _ in range(warmup):
        step()
    sync(device)
    seconds = []
    for _ in range(measure):
        start = time.perf_counter()
        step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def reset_peak(device: torch.device) -> None:
    """Starts a new CUDA peak; a CPU process' peak RSS cannot be reset."""
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float:
    """CUDA: max allocated since the last reset. CPU: the process' peak RSS since start (it cannot be reset)."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def memory_kind(device: torch.device) -> str:
    """What ``peak_mib`` reads on ``device``."""
    return 'CUDA max allocated' if device.type == 'cuda' else 'process peak RSS'


def free(device: torch.device) -> None:
    """Collects garbage and empties CUDA's cache, so that the next loop starts from the memory it needs."""
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def device_name(device: torch.device) -> str:
    """The GPU with its CUDA version, or the CPU model with torch's thread count."""
    if device.type == 'cuda':
        return f'{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), model)
    return f'CPU {model}, {torch.get_num_threads()} torch threads'


def network_signature(network: torch.nn.Module) -> Tuple[str, int]:
    """(class name, number of parameters), of the network itself under torch.compile."""
    network = unwrapped(network)
    return type(network).__name__, sum(p.numel() for p in network.parameters())


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


def saved_tensors_peak_mib(step: Callable[[], object], parameters=()) -> float:
    """Peak MiB of the tensors autograd holds for backward at one time during ``step`` (``parameters`` excluded,
    a storage saved several times counted once): the activation memory of a training step, double-backward
    graphs included, measured the same way on any device."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    live: Dict[int, List[int]] = {}  # storage -> [references held by autograd, bytes]
    state = {'current': 0, 'peak': 0}

    def release(ptr: int) -> None:
        entry = live[ptr]
        entry[0] -= 1
        if entry[0] == 0:
            state['current'] -= entry[1]
            del live[ptr]

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr in excluded or ptr == 0:
            return t
        held = t.detach()  # an object of its own: freed when autograd frees what it saved
        if ptr in live:
            live[ptr][0] += 1
        else:
            live[ptr] = [1, t.untyped_storage().nbytes()]
            state['current'] += live[ptr][1]
            state['peak'] = max(state['peak'], state['current'])
        weakref.finalize(held, release, ptr)
        return held

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return state['peak'] / 2 ** 20


# the pre-training step the benchmarks time
def prepare_pretraining(cfg) -> Tuple[object, object]:
    """(DistContext, PreparedData) for ``cfg`` (a PretrainConfig), prepared as desd_pretrain prepares them;
    ``cfg.plans`` is set to the plans the data got."""
    ctx = init_distributed(cfg.device)
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    return ctx, prepared


def typical_step_pretrainer(cfg, prepared, ctx, log_dir: str):
    """A silently built ``Pretrainer`` at its typical step: past the first epoch(s), whose prototypes stay frozen."""
    with contextlib.redirect_stdout(io.StringIO()):  # citation banner, device line
        pretrainer = Pretrainer(cfg, prepared, ctx, log_dir)
    pretrainer.step = cfg.freeze_last_layer_epochs * cfg.iters_per_epoch
    return pretrainer


def method_batches(pretrainer, count: int = IN_MEMORY_BATCHES) -> List[dict]:
    """``count`` training batches of ``pretrainer``'s method, loaded in-process as desd_pretrain loads them: the view
    loader (with the DRRs the data have) through the method's loader hook (ReFs adds the reference batches)."""
    prepared = pretrainer.prepared
    loader = pretrainer.method_loader(build_view_loader(prepared, pretrainer.patch_size, pretrainer.cfg.batch_size, 0,
                                                        drr_files=prepared.drr_files), 0)
    try:
        return [next(loader) for _ in range(count)]
    finally:
        finish_loader(loader)


# reporting
def setup_table(title: str, setup: Dict[str, str]) -> List[str]:
    """The Markdown heading ``## title: dataset`` and the table of every other setting."""
    lines = [f'## {title}: {setup["dataset"]}', '', '| setting | value |', '|---|---|']
    return lines + [f'| {k} | {v} |' for k, v in setup.items() if k != 'dataset']


def ratio_row(label: str, value: float, comparison: str, target: float) -> str:
    """A row of the ratio table: the value, its target (``comparison`` '<=' or '>=') and whether it is met."""
    met = value <= target if comparison == '<=' else value >= target
    return f'| {label} | {value:.3f} | {comparison} {target} | {"yes" if met else "no"} |'


def bar_panels(path: str, labels: List[str], panels, suptitle: str, figsize=(8, 4), tick_size=None) -> None:
    """A PNG with one bar chart per panel: (y label, one value per label, title or None)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy, and for the figure only
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
    """A figure's title: dataset, patch and device."""
    return f'{setup["dataset"]}, patch {setup["patch"]}; {setup["device"]}'


def write_report(out: str, name: str, text: str, quantities: Iterable[Tuple[str, float, str, str]],
                 draw: Callable[[str], None]) -> str:
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


def default_out_folder(dataset_name: str) -> str:
    """nnUNet_results/<dataset>/desd_benchmark, where desd_pretrain_benchmark writes without --out."""
    if not nnUNet_results:  # nnU-Net's _EnvPath: false when the variable is unset
        raise DesdError('nnUNet_results is not set: set it or give --out FOLDER.')
    return os.path.join(os.fspath(nnUNet_results), dataset_name, 'desd_benchmark')

