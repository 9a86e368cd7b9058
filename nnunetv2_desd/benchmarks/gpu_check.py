"""gpu_check.md, the summary ``scripts/gpu_check.sh`` writes: steps, exit codes, benchmark tables, batch in 24 GiB,
host synchronisations per step.

``python -m nnunetv2_desd.cli.gpu_check_report --steps STEPS.tsv -o gpu_check.md ...`` (the script's call), or
``report_markdown`` from Python. STEPS.tsv: name, exit code, seconds, log path, command per line, tab-separated.
The batch in a budget is extrapolated in proportion to one measurement: floor(budget_MiB * batch / peak_MiB).
Nothing here imports torch or nnU-Net. Details: docs/benchmark.md.
"""
import csv
import dataclasses
import json
import math
import os
from typing import Iterable, List, Optional, Sequence, Tuple

BUDGET_GIB = 24.0


@dataclasses.dataclass
class Step:
    name: str
    command: str
    exit_code: int
    seconds: float
    log: str


def read_steps(path: str) -> List[Step]:
    """The steps of a STEPS.tsv (name, exit code, seconds, log, command per line)."""
    steps = []
    with open(path) as f:
        for line in f:
            if line.strip():
                name, code, seconds, log, command = line.rstrip('\n').split('\t', 4)
                steps.append(Step(name, command, int(code), float(seconds), log))
    return steps


def largest_batch(peak_mib: float, batch: int, budget_gib: float = BUDGET_GIB) -> int:
    """floor(budget_MiB * batch / peak_MiB): the batch at which a peak proportional to the batch fills the budget."""
    if peak_mib <= 0 or batch < 1:
        raise ValueError(f'need a positive peak and batch, got {peak_mib} MiB at batch {batch}')
    return math.floor(budget_gib * 1024 * batch / peak_mib)


def peak_rows(csv_path: str) -> List[Tuple[str, float, str]]:
    """(quantity, MiB, unit) of the ``*_peak_memory`` rows of a csv written by desd_pretrain_benchmark."""
    with open(csv_path, newline='') as f:
        return [(r['quantity'], float(r['value']), r['unit']) for r in csv.DictReader(f)
                if r['quantity'].endswith('_peak_memory') and r['unit'].startswith('MiB')]


def read_syncs(path: str) -> dict:
    """A host_syncs JSON: its method (with the ReFs matching form), per-step counts and sync sources."""
    with open(path) as f:
        data = json.load(f)
    counts = [int(c) for c in data['syncs_per_step']]
    if not counts:
        raise ValueError('no counted step')
    method = data['method'] + (f' ({data["matching"]})' if data.get('matching') else '')
    return {'method': method, 'counts': counts, 'sources': [s for s in data.get('sources', []) if s.get('sync')]}


def _cell(text: str) -> str:
    return str(text).replace('|', '\\|').replace('\n', ' ')


def _path(path: str, relative_to: Optional[str]) -> str:
    return os.path.relpath(path, relative_to) if relative_to and os.path.isabs(path) else path


def syncs_lines(paths: Iterable[str], relative_to: Optional[str] = None) -> List[str]:
    """The table of host synchronisations per step (method, steps, mean, max) of host_syncs JSON files, then where
    the synchronisations came from; missing or unreadable files named as such."""
    lines = ['## Host synchronisations per step', '',
             'Counted on CUDA by `torch.cuda.set_sync_debug_mode(\'warn\')` after warm-up steps, on steps that do not '
             'log (`python -m nnunetv2_desd.cli.host_syncs`).', '',
             '| json | method | steps | mean syncs / step | max syncs / step |', '|---|---|---|---|---|']
    sources = []
    for path in paths:
        shown = _cell(_path(path, relative_to))
        if not os.path.isfile(path):
            lines.append(f'| {shown} | _not written_ | | | |')
            continue
        try:
            syncs = read_syncs(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            lines.append(f'| {shown} | _unreadable: {_cell(e)}_ | | | |')
            continue
        counts = syncs['counts']
        lines.append(f'| {shown} | {_cell(syncs["method"])} | {len(counts)} | {sum(counts) / len(counts):.2f} | '
                     f'{max(counts)} |')
        for source in syncs['sources']:
            code = f': `{source["code"]}`' if source.get('code') else ''
            sources.append(f'- {syncs["method"]}: {source["count"]} x `{source["where"]}`{code}')
    if sources:
        lines += ['', 'Where, over all counted steps (the Python line that made the call):', '', *sources]
    return lines


def report_markdown(steps: Sequence[Step], benchmark_md: Iterable[str] = (), benchmark_csv: Iterable[str] = (),
                    batch: Optional[int] = None, gpu_info: str = '', budget_gib: float = BUDGET_GIB,
                    relative_to: Optional[str] = None, syncs: Iterable[str] = ()) -> str:
    """The Markdown of gpu_check.md. ``batch``: the batch the benchmarks measured at (their csv files do not record
    it); without it there is no extrapolation. ``syncs``: host_syncs JSON files (no section without them). Missing
    benchmark and JSON files are named as missing. Paths are shown relative to ``relative_to`` (the report's folder)
    where given."""
    failed = [s.name for s in steps if s.exit_code != 0]
    lines = ['# GPU check', '']
    if gpu_info.strip():
        lines += ['GPU:', '', '```', gpu_info.strip(), '```', '']
    lines += [f'Result: all {len(steps)} steps exited 0.' if not failed else
              f'Result: {len(failed)} of {len(steps)} steps failed: {", ".join(failed)}.', '',
              '## Steps', '', '| step | exit code | seconds | log |', '|---|---|---|---|']
    lines += [f'| {_cell(s.name)} | {s.exit_code} | {s.seconds:.1f} | {_cell(_path(s.log, relative_to))} |'
              for s in steps]
    lines += ['', 'Commands, in order:', '', '```']
    lines += [f'{s.name}: {s.command}' for s in steps]
    lines += ['```', '', '## Benchmarks', '']
    for path in benchmark_md:
        lines.append(f'From `{_path(path, relative_to)}`:')
        lines.append('')
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read().strip()
            # the benchmark's own '## ' headings sit below this report's '## Benchmarks'
            lines += [('#' + line) if line.startswith('#') else line for line in text.splitlines()]
        else:
            lines.append('_not written (see the step\'s log)._')
        lines.append('')
    lines += [f'## Largest batch in {budget_gib:g} GiB (extrapolated)', '']
    if batch is None:
        lines += ['_no measured batch given: no extrapolation._']
    else:
        lines += [f'Extrapolated linearly from the peak measured at batch {batch}: '
                  f'floor({budget_gib:g} GiB x {batch} / peak). Weights and optimizer state do not grow with the '
                  'batch (conservative); CUDA context and allocator cache are not in the peak (optimistic).', '',
                  f'| csv | quantity | peak at batch {batch} [MiB] | largest batch in {budget_gib:g} GiB (extrapolated) |',
                  '|---|---|---|---|']
        for path in benchmark_csv:
            shown = _cell(_path(path, relative_to))
            if not os.path.isfile(path):
                lines.append(f'| {shown} | _not written_ | | |')
                continue
            for quantity, mib, unit in peak_rows(path):
                fits = largest_batch(mib, batch, budget_gib) if 'CUDA' in unit and mib > 0 else \
                    f'n/a ({_cell(unit)} is no CUDA peak)'
                lines.append(f'| {shown} | {quantity} | {mib:,.0f} | {fits} |')
    syncs = list(syncs)
    if syncs:
        lines += ['', *syncs_lines(syncs, relative_to)]
    return '\n'.join(lines) + '\n'


def write_gpu_check(out: str, steps_tsv: str, benchmark_md: Iterable[str] = (), benchmark_csv: Iterable[str] = (),
                    batch: Optional[int] = None, gpu_info_file: Optional[str] = None,
                    budget_gib: float = BUDGET_GIB, syncs: Iterable[str] = ()) -> str:
    """Writes gpu_check.md to ``out`` from the steps in ``steps_tsv``, the GPU lines in ``gpu_info_file`` (left out
    where it is missing) and the host_syncs JSON files ``syncs``, paths shown relative to ``out``'s folder; returns
    the Markdown."""
    gpu_info = ''
    if gpu_info_file and os.path.isfile(gpu_info_file):
        with open(gpu_info_file) as f:
            gpu_info = f.read()
    text = report_markdown(read_steps(steps_tsv), benchmark_md, benchmark_csv, batch, gpu_info, budget_gib,
                           relative_to=os.path.dirname(os.path.abspath(out)), syncs=syncs)
    with open(out, 'w') as f:
        f.write(text)
    return text
