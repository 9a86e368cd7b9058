"""The ReFs benchmark: one ReFs step against one DeSD step, and the memory of each matching form.

Run by ``desd_pretrain_benchmark -m refs`` (``nnunetv2_desd.cli.pretrain_benchmark``). DeSD, ReFs fish and ReFs
cosine (all matched stages, and the deepest only) on the same network, patch and pre-fetched batches. Reports
(refs_vs_desd.md/.csv/.png) seconds per step, memory (CUDA maximum; autograd's saved bytes on every device) and
ReFs / DeSD step, target <= 2.5. Details and measured results: docs/benchmark.md, docs/refs.md.
"""
import dataclasses
import itertools
import tempfile
from typing import Dict, List, Tuple

import torch

from nnunetv2_desd.benchmarks.timing import (IN_MEMORY_BATCHES, RATIO_TABLE_HEADER, Phase, activation_mib,
                                             bar_panels, device_name, free, memory_kind, method_batches,
                                             network_signature, peak_mib, prepare_pretraining, ratio_row,
                                             reset_peak, saved_tensors_peak_mib, setup_table, setup_title,
                                             time_steps, typical_step_pretrainer, write_report)
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.network import planned_patch

REFS_TO_DESD_STEP_TARGET = 2.5


@dataclasses.dataclass
class RefsComparison:
    setup: Dict[str, str]
    memory_kind: str
    phases: Dict[str, Phase]        # 'desd', 'fish', 'cosine', 'cosine_deepest'
    saved_peak: Dict[str, float]    # MiB, peak of what autograd keeps for backward
    saved_total: Dict[str, float]   # MiB, everything autograd saved during the step

    def step_ratio(self, name: str = 'fish') -> float:
        return self.phases[name].mean / self.phases['desd'].mean


def _loops(cfg: PretrainConfig) -> List[Tuple[str, str, PretrainConfig]]:
    cosine = dataclasses.replace(cfg, method='refs', matching='cosine')
    stages = 'all encoder stages' if cfg.matching_stages is None else f'deepest {cfg.matching_stages} stages'
    loops = [('desd', 'DeSD', dataclasses.replace(cfg, method='desd', reference=None)),
             ('fish', 'ReFs fish (default)', dataclasses.replace(cfg, method='refs', matching='fish')),
             ('cosine', f'ReFs cosine, {stages}', cosine)]
    if cfg.matching_stages != 1:
        loops.append(('cosine_deepest', 'ReFs cosine, deepest stage', dataclasses.replace(cosine, matching_stages=1)))
    return loops


def _reference_batches(cfg: PretrainConfig, prepared, ctx, log_dir: str) -> Tuple[List[dict], object]:
    """The pre-fetched batches, views and reference, from the method loader of a ReFs Pretrainer of ``cfg``
    (``-m refs``); and the reference dataset its method opened."""
    pretrainer = typical_step_pretrainer(cfg, prepared, ctx, log_dir)
    return method_batches(pretrainer), pretrainer.method.reference_dataset


def compare_refs_with_desd(cfg: PretrainConfig, warmup: int, measure: int) -> Tuple[RefsComparison, object]:
    """Times ``Pretrainer.train_step`` of DeSD and of both ReFs forms (``cfg`` otherwise unchanged) on the same
    pre-fetched batches; the smaller steps first (a CPU process' peak RSS only grows)."""
    ctx, prepared = prepare_pretraining(cfg)
    device = ctx.device
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    patch = planned_patch(cfg.patch_size, prepared.configuration_manager)
    phases, peaks, totals, networks = {}, {}, {}, {}
    with tempfile.TemporaryDirectory(prefix='desd_benchmark_') as scratch:
        batches, reference = _reference_batches(cfg, prepared, ctx, scratch)  # DeSD ignores their 'reference'
        for name, label, loop_cfg in _loops(cfg):
            free(device)
            reset_peak(device)
            pretrainer = typical_step_pretrainer(loop_cfg, prepared, ctx, scratch)
            cycle = itertools.cycle(batches)
            parameters = [*pretrainer.optimized_parameters, *pretrainer.teacher.parameters()]
            phases[name] = Phase(name, label, time_steps(lambda: pretrainer.train_step(next(cycle)), warmup, measure,
                                                         device), peak_mib(device))
            peaks[name] = saved_tensors_peak_mib(lambda: pretrainer.train_step(next(cycle)), parameters)
            totals[name] = activation_mib(lambda: pretrainer.train_step(next(cycle)), parameters)
            networks[name] = network_signature(pretrainer.network)
            pretrainer = None
    setup = {
        'dataset': prepared.dataset_name,
        'reference': f'{reference.dataset_name} ({len(reference.identifiers)} cases, plans '
                     f'\'{reference.plans_identifier}\', {reference.label_manager.num_segmentation_heads} outputs)',
        'device': device_name(device),
        'network': f'{networks["desd"][0]}, {networks["desd"][1]:,} parameters (ReFs: '
                   f'{networks["fish"][1]:,}, the decoder\'s outputs sized for the reference)',
        'patch': ' x '.join(map(str, patch)),
        'batch': f'{cfg.batch_size} volumes x 2 views; ReFs adds {cfg.reference_batch_size or cfg.batch_size} '
                 f'reference cases',
        'heads': f'K = {cfg.out_dim}, hidden {cfg.head_hidden_dim}, bottleneck {cfg.head_bottleneck_dim}',
        'ReFs': f'lambda_ref {cfg.reference_weight:g}; fish alpha {cfg.fish_inner_lr:g}; cosine lambda_match '
                f'{cfg.matching_weight:g}',
        'iterations': f'{warmup} warm-up + {measure} timed per loop, on {IN_MEMORY_BATCHES} pre-fetched batches',
        'memory': ('CUDA max allocated per loop' if device.type == 'cuda' else
                   'a CPU process\' peak RSS cannot be reset between loops: compare the saved-tensor columns'),
    }
    return RefsComparison(setup, memory_kind(device), phases, peaks, totals), prepared


def refs_markdown(result: RefsComparison) -> str:
    lines = setup_table('ReFs vs DeSD pre-training step', result.setup)
    lines += ['', f'| loop | s / step | step / DeSD step | peak saved for backward [MiB] | all saved for backward '
                  f'[MiB] | {result.memory_kind} [MiB] |', '|---|---|---|---|---|---|']
    for name, ph in result.phases.items():
        lines.append(f'| {ph.label} | {ph.mean:.4g} ± {ph.std:.2g} | {result.step_ratio(name):.2f} | '
                     f'{result.saved_peak[name]:,.1f} | {result.saved_total[name]:,.1f} | {ph.peak_mib:,.0f} |')
    lines += ['', *RATIO_TABLE_HEADER,
              ratio_row('ReFs (fish, default) step / DeSD step', result.step_ratio('fish'), '<=',
                        REFS_TO_DESD_STEP_TARGET)]
    return '\n'.join(lines) + '\n'


def refs_plot(result: RefsComparison, path: str) -> None:
    names = list(result.phases)
    cuda = result.memory_kind.startswith('CUDA')
    panels = (('time per step [ms]', [1e3 * result.phases[n].mean for n in names],
               f'ReFs fish / DeSD = {result.step_ratio("fish"):.2f} (target <= {REFS_TO_DESD_STEP_TARGET})'),
              ('CUDA max allocated [MiB]' if cuda else 'peak saved for backward [MiB]',
               [result.phases[n].peak_mib if cuda else result.saved_peak[n] for n in names], None))
    labels = [result.phases[n].label.replace('ReFs ', 'ReFs\n').replace(', ', ',\n') for n in names]
    bar_panels(path, labels, panels, setup_title(result.setup), figsize=(10, 4.2), tick_size=7)


def write_refs_comparison(result: RefsComparison, out: str) -> str:
    """refs_vs_desd.md/.csv/.png in ``out``; returns the Markdown."""
    quantities = []
    for name, ph in result.phases.items():
        quantities += [(f'{name}_seconds_per_step', ph.mean, 's', ''),
                       (f'{name}_saved_for_backward_peak', result.saved_peak[name], 'MiB', ''),
                       (f'{name}_saved_for_backward_total', result.saved_total[name], 'MiB', ''),
                       (f'{name}_peak_memory', ph.peak_mib, f'MiB ({result.memory_kind})', '')]
    quantities += [(f'{name}_to_desd_step_ratio', result.step_ratio(name), '',
                    f'<= {REFS_TO_DESD_STEP_TARGET}' if name == 'fish' else '') for name in result.phases
                   if name != 'desd']
    return write_report(out, 'refs_vs_desd', refs_markdown(result), quantities, lambda f: refs_plot(result, f))
