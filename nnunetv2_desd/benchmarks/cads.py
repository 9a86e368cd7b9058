"""The CADS benchmark: one CADS pre-training step against one DeSD step, in time and memory.

Run by ``desd_pretrain_benchmark -m cads`` (``nnunetv2_desd.cli.pretrain_benchmark``). Same network, patch, batch
and pre-fetched CADS batches for both methods (DeSD ignores their DRRs); CADS packs each masked view to its kept
in-plane blocks. Reported (cads_vs_desd.md/.csv/.png): seconds per step, what autograd keeps for backward, the peak
memory, and CADS step / DeSD step (target <= 0.5) and CADS memory / DeSD memory (target <= 0.6; CUDA: peak
allocated, CPU: activations, since a CPU process' peak RSS cannot be reset between methods).
"""
import dataclasses
import itertools
import tempfile
from typing import Dict, Tuple

from nnunetv2_desd.benchmarks.timing import (IN_MEMORY_BATCHES, RATIO_TABLE_HEADER, Phase, activation_mib,
                                             bar_panels, device_name, free, memory_kind, method_batches,
                                             network_signature, peak_mib, prepare_pretraining, ratio_row,
                                             reset_peak, setup_table, setup_title, time_steps,
                                             typical_step_pretrainer, write_report)
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.network import planned_patch
from nnunetv2_desd.pretraining.methods.cads import CADS as CADSInputs

CADS_TO_DESD_STEP_TARGET = 0.5
CADS_TO_DESD_MEMORY_TARGET = 0.6
METHODS = ('desd', 'cads')            # the order of the tables and figures


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
    ctx, prepared = prepare_pretraining(cfg)
    device = ctx.device
    phases, activations, networks = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:
        batches = None
        for method in ('cads', 'desd'):  # CPU peak RSS only grows: the smaller step first
            free(device)
            reset_peak(device)
            pretrainer = typical_step_pretrainer(dataclasses.replace(cfg, method=method), prepared, ctx, scratch)
            if batches is None:
                batches = method_batches(pretrainer)
            cycle = itertools.cycle(batches)
            seconds = time_steps(lambda: pretrainer.train_step(next(cycle)), warmup, measure, device)
            phases[method] = Phase(method, method.upper() if method == 'cads' else 'DeSD', seconds, peak_mib(device))
            activations[method] = activation_mib(lambda: pretrainer.train_step(next(cycle)),
                                                 [*pretrainer.student.parameters(), *pretrainer.teacher.parameters()])
            networks[method] = network_signature(pretrainer.network)
            pretrainer = None  # freed before the next method is built
    patch = planned_patch(cfg.patch_size, prepared.configuration_manager)
    block = CADSInputs(cfg.mask_ratio, cfg.mask_patch).block
    setup = {
        'dataset': prepared.dataset_name,
        'device': device_name(device),
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
    return MethodComparison(setup, memory_kind(device), phases, activations), prepared


def comparison_markdown(result: MethodComparison) -> str:
    lines = setup_table('CADS vs DeSD pre-training step', result.setup)
    lines += ['', f'| method | s / iteration | activations kept for backward [MiB] | {result.memory_kind} [MiB] |',
              '|---|---|---|---|']
    for name in METHODS:
        ph = result.phases[name]
        lines.append(f'| {ph.label} | {ph.mean:.4g} ± {ph.std:.2g} | {result.activations[name]:,.1f} | '
                     f'{ph.peak_mib:,.0f} |')
    memory = 'CUDA peak' if result.memory_kind.startswith('CUDA') else 'activations'
    lines += ['', *RATIO_TABLE_HEADER,
              ratio_row('CADS step / DeSD step', result.step_ratio(), '<=', CADS_TO_DESD_STEP_TARGET),
              ratio_row(f'CADS memory / DeSD memory ({memory})', result.memory_ratio(), '<=',
                        CADS_TO_DESD_MEMORY_TARGET)]
    return '\n'.join(lines) + '\n'


def comparison_plot(result: MethodComparison, path: str) -> None:
    """Two panels: time per step and memory, DeSD next to CADS."""
    cuda = result.memory_kind.startswith('CUDA')
    panels = (('time per iteration [ms]', [1e3 * result.phases[n].mean for n in METHODS],
               f'CADS / DeSD = {result.step_ratio():.2f} (target <= {CADS_TO_DESD_STEP_TARGET})'),
              ('CUDA peak [MiB]' if cuda else 'activations for backward [MiB]',
               [result.phases[n].peak_mib if cuda else result.activations[n] for n in METHODS],
               f'CADS / DeSD = {result.memory_ratio():.2f} (target <= {CADS_TO_DESD_MEMORY_TARGET})'))
    bar_panels(path, [result.phases[n].label for n in METHODS], panels, setup_title(result.setup))


def write_comparison(result: MethodComparison, out: str) -> str:
    """cads_vs_desd.md/.csv/.png in ``out``; returns the Markdown."""
    quantities = [(f'{n}_seconds_per_iteration', result.phases[n].mean, 's', '') for n in METHODS]
    quantities += [(f'{n}_activations_for_backward', result.activations[n], 'MiB', '') for n in METHODS]
    quantities += [(f'{n}_peak_memory', result.phases[n].peak_mib, f'MiB ({result.memory_kind})', '')
                   for n in METHODS]
    quantities += [('cads_to_desd_step_ratio', result.step_ratio(), '', f'<= {CADS_TO_DESD_STEP_TARGET}'),
                   ('cads_to_desd_memory_ratio', result.memory_ratio(), '', f'<= {CADS_TO_DESD_MEMORY_TARGET}')]
    return write_report(out, 'cads_vs_desd', comparison_markdown(result), quantities,
                        lambda f: comparison_plot(result, f))
