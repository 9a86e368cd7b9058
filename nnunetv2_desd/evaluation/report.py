"""Paired per-case Dice of the benchmark's trainers, from nnU-Net's ``fold_X/validation/summary.json``.

Cases pair up by (base fold, reference file name). Per comparison (tested - scratch, tested - vanilla), fraction
and label: Δ per case, one unit per (base fold, subset seed), and over the units the mean Δ, a 95% percentile
bootstrap CI (``BOOTSTRAP_RESAMPLES``, fixed seed) and the two-sided Wilcoxon signed-rank p with zeros dropped
(below n = 6 no p can reach 0.05, and the report says so). Details: docs/benchmark.md.
"""
import csv
import dataclasses
import io
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.checkpoint import atomic_write, atomic_write_text

FOREGROUND = 'foreground mean'
ROLES = ('tested', 'scratch', 'baseline')
ROLE_WORDS = {'tested': 'tested', 'scratch': 'same schedule from scratch', 'baseline': 'vanilla baseline'}
COMPARISONS = (('tested', 'scratch'), ('tested', 'baseline'))  # Δ = first − second
FIGURE_SOURCE = {'tested': ('tested - baseline', 'tested_mean'), 'scratch': ('tested - scratch', 'other_mean'),
                 'baseline': ('tested - baseline', 'other_mean')}  # role -> the rows and column its curve comes from
BOOTSTRAP_RESAMPLES = 10000
CONFIDENCE = 0.95
CSV_FIELDS = ('comparison', 'fraction', 'label', 'fold', 'seed', 'tested_mean', 'other_mean', 'diff_mean', 'diff_sd',
              'ci_low', 'ci_high', 'wilcoxon_p', 'n_units', 'n_nonzero', 'n_cases')


@dataclasses.dataclass(frozen=True)
class BenchmarkCell:
    """One run: a trainer in one role on one labelled fraction (and subset seed) of one base fold."""
    role: str
    trainer: str
    plans: str
    fold: int
    fraction: float
    fold_id: Optional[int]       # the nnU-Net fold; None while the fraction fold does not exist yet
    model_folder: Optional[str]  # nnUNet_results/<Dataset>/<trainer>__<plans>__<config>/fold_<fold_id>
    seed: Optional[int] = None   # subset seed; None for fraction 1 (one subset only)

    @property
    def summary_file(self) -> Optional[str]:
        return None if self.model_folder is None else os.path.join(self.model_folder, 'validation', 'summary.json')

    @property
    def done(self) -> bool:
        return self.summary_file is not None and os.path.isfile(self.summary_file)

    def describe(self) -> str:
        fold = f'fold {self.fold}'
        if self.fold_id not in (None, self.fold):
            fold += f' (nnU-Net fold {self.fold_id})'
        seed = '' if self.seed is None else f', subset seed {self.seed}'
        return f'{self.trainer} ({self.plans}), {fold}, fraction {self.fraction:g}{seed}'


@dataclasses.dataclass
class ReportMeta:
    dataset: str
    configuration: str
    trainers: Dict[str, str]  # role -> trainer, for the roles that run
    plans: Dict[str, str]
    folds: List[int]
    fractions: List[float]
    seeds: List[int]
    subset_sizes: Dict[float, str] = dataclasses.field(default_factory=dict)  # fraction -> 'k of n' per fold
    pretrained: Optional[str] = None  # '-w' file and its sha256, when given

    @property
    def stem(self) -> str:
        return f'{self.trainers["tested"]}_vs_{self.trainers["baseline"]}__{self.configuration}'


def label_names(dataset_json: dict) -> Dict[str, str]:
    """summary.json label key -> label name, from dataset.json 'labels' (background and ignore left out)."""
    names = {}
    for name, value in dataset_json['labels'].items():
        if name == 'ignore':
            continue
        if isinstance(value, (list, tuple)):
            if all(v == 0 for v in value):
                continue
            key = str(tuple(int(v) for v in value))
        else:
            if int(value) == 0:
                continue
            key = str(int(value))
        names[key] = name
    return names


def read_case_dice(summary_file: str, names: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """{reference file name: {label name: Dice}}."""
    try:
        with open(summary_file) as f:
            per_case = json.load(f)['metric_per_case']
        return {os.path.basename(entry['reference_file']):
                {names.get(key, key): float(m['Dice']) for key, m in entry['metrics'].items()} for entry in per_case}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DesdError(f'Cannot read per-case metrics from {summary_file}: {e}') from None


def paired_case_values(first: Dict[str, float], second: Dict[str, float], label: str) -> Optional[Tuple[float, float]]:
    """(first, second) Dice of one case for ``label``; FOREGROUND averages the labels not NaN on both sides.
    None where nothing pairs."""
    if label == FOREGROUND:
        common = [k for k in first if k in second and not (math.isnan(first[k]) or math.isnan(second[k]))]
        if not common:
            return None
        return float(np.mean([first[k] for k in common])), float(np.mean([second[k] for k in common]))
    a, b = first.get(label, math.nan), second.get(label, math.nan)
    return None if math.isnan(a) or math.isnan(b) else (a, b)


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = 0) -> Optional[Tuple[float, float]]:
    """Percentile bootstrap interval of the mean: quantiles (1 ± confidence) / 2 of the means of ``resamples``
    resamples with replacement. None for fewer than 2 values."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return None
    means = x[np.random.default_rng(seed).integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def signed_rank_test(differences: Sequence[float]) -> Tuple[Optional[float], int]:
    """(two-sided Wilcoxon signed-rank p, n): zero differences are dropped first, n counts the others (exact p
    without ties, the normal approximation with ties). p is None where n is 0."""
    from scipy.stats import wilcoxon  # here: scipy.stats is slow to import

    d = np.asarray(differences, dtype=float)
    d = d[d != 0]
    if len(d) == 0:
        return None, 0
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # scipy warns about small n; the p it returns is still right
        return float(wilcoxon(d, alternative='two-sided').pvalue), int(len(d))


def smallest_possible_p(n: int) -> float:
    """The smallest two-sided exact Wilcoxon p for n non-zero differences: all of one sign, 2 / 2^n."""
    return 2.0 ** (1 - n)


def _sd(x: np.ndarray) -> Optional[float]:
    return float(np.std(x, ddof=1)) if len(x) >= 2 else None


def unit_statistics(units: List[dict]) -> dict:
    """Over the (fold, seed) units: mean Dice of both sides, mean Δ, its sd, bootstrap CI and Wilcoxon."""
    diffs = np.array([u['diff_mean'] for u in units], dtype=float)
    ci = bootstrap_ci(diffs)
    p, n_nonzero = signed_rank_test(diffs)
    mean = (lambda key: float(np.mean([u[key] for u in units])) if units else None)
    return dict(tested_mean=mean('tested_mean'), other_mean=mean('other_mean'), diff_mean=mean('diff_mean'),
                diff_sd=_sd(diffs), ci_low=None if ci is None else ci[0], ci_high=None if ci is None else ci[1],
                wilcoxon_p=p, n_units=len(units), n_nonzero=n_nonzero, n_cases=sum(u['n_cases'] for u in units))


def _unit_key(cell: BenchmarkCell) -> Tuple[int, int]:
    return cell.fold, -1 if cell.seed is None else cell.seed


def compare(cells: Sequence[BenchmarkCell], names: Dict[str, str]
            ) -> Tuple[List[dict], List[dict], List[BenchmarkCell]]:
    """(aggregate rows, per-(fold, seed) rows, missing cells). Rows exist per comparison whose roles both run,
    fraction, and label (then FOREGROUND)."""
    missing = [c for c in cells if not c.done]
    dice = {(c.role, c.fraction, _unit_key(c)): read_case_dice(c.summary_file, names) for c in cells if c.done}
    labels = list(names.values())
    for per_case in dice.values():
        for case in per_case.values():
            labels += [k for k in case if k not in labels]
    roles = {c.role for c in cells}
    rows, unit_rows = [], []
    for first, second in COMPARISONS:
        if first not in roles or second not in roles:
            continue
        comparison = f'{first} - {second}'
        for fraction in sorted({c.fraction for c in cells}):
            keys = sorted({_unit_key(c) for c in cells if c.fraction == fraction})
            for label in labels + [FOREGROUND]:
                units = []
                for key in keys:
                    a, b = dice.get((first, fraction, key)), dice.get((second, fraction, key))
                    if a is None or b is None:
                        continue
                    pairs = [v for case in sorted(set(a) & set(b))
                             if (v := paired_case_values(a[case], b[case], label)) is not None]
                    if not pairs:
                        continue
                    x = np.array(pairs)
                    units.append(dict(comparison=comparison, fraction=fraction, label=label, fold=key[0],
                                      seed=None if key[1] < 0 else key[1], tested_mean=float(x[:, 0].mean()),
                                      other_mean=float(x[:, 1].mean()), diff_mean=float((x[:, 0] - x[:, 1]).mean()),
                                      n_cases=len(pairs)))
                unit_rows += units
                rows.append(dict(comparison=comparison, fraction=fraction, label=label, fold=None, seed=None,
                                 **unit_statistics(units)))
    return rows, unit_rows, missing


def _number_or_na(value: Optional[float], spec: str = '.4f') -> str:
    return 'n/a' if value is None else format(value, spec)


def _confidence_interval_text(row: dict) -> str:
    return 'n/a' if row['ci_low'] is None else f'[{row["ci_low"]:+.4f}, {row["ci_high"]:+.4f}]'


def markdown(rows: List[dict], unit_rows: List[dict], missing: List[BenchmarkCell], meta: ReportMeta) -> str:
    t = meta.trainers
    lines = [f'# {t["tested"]} vs {" and ".join(t[r] for r in ROLES[1:] if r in t)}: {meta.dataset}, '
             f'{meta.configuration}', '', f'- dataset: {meta.dataset}; configuration: {meta.configuration}']
    lines += [f'- {ROLE_WORDS[r]}: {t[r]} with plans {meta.plans[r]}' for r in ROLES if r in t]
    lines.append(f'- folds: {" ".join(map(str, meta.folds))}; labelled fractions: '
                 f'{" ".join(format(f, "g") for f in meta.fractions)}; subset seeds: '
                 f'{" ".join(map(str, meta.seeds))} (fraction 1 has one subset)')
    for fraction, sizes in meta.subset_sizes.items():
        lines.append(f'- fraction {fraction:g}: max(1, ceil({fraction:g} n)) training cases per fold: {sizes}')
    if meta.pretrained:
        lines.append(f'- pre-trained weights: {meta.pretrained}')
    lines += ['', 'These are our measurements: per-case Dice read from nnU-Net\'s validation summary.json of each run '
              'listed here, not numbers from a publication. Δ = tested − other per validation case, averaged per '
              f'(fold, subset seed) unit; the table gives the mean over units, a {CONFIDENCE:.0%} bootstrap '
              'confidence interval of that mean, the two-sided Wilcoxon signed-rank p over the unit differences '
              '(zeros dropped; n = units / non-zero differences / validation cases). "foreground mean" averages per '
              'case the labels that both sides have.']
    for first, second in COMPARISONS:
        mine = [r for r in rows if r['comparison'] == f'{first} - {second}']
        if not mine:
            continue
        lines += ['', f'## {t[first]} − {t[second]} ({ROLE_WORDS[second]})', '',
                  f'| fraction | label | {t[first]} | {t[second]} | Δ Dice | {CONFIDENCE:.0%} CI | p (Wilcoxon) | n |',
                  '|---:|---|---|---|---|---|---:|---|']
        for r in mine:
            lines.append(f'| {r["fraction"]:g} | {r["label"]} | {_number_or_na(r["tested_mean"])} '
                         f'| {_number_or_na(r["other_mean"])} | {_number_or_na(r["diff_mean"], "+.4f")} '
                         f'| {_confidence_interval_text(r)} | {_number_or_na(r["wilcoxon_p"], ".4g")} | '
                         f'{r["n_units"]} / {r["n_nonzero"]} / {r["n_cases"]} |')
        for r in mine:
            if r['label'] == FOREGROUND and smallest_possible_p(r['n_nonzero']) >= 0.05:
                lines.append(f'\nFraction {r["fraction"]:g}: {r["n_nonzero"]} non-zero unit differences; the smallest '
                             f'p the Wilcoxon test can give is 2^(1 − n) = {smallest_possible_p(r["n_nonzero"]):.3g}, '
                             f'so no result here can reach p < 0.05 (n ≥ 6 is needed).')
    if unit_rows:
        lines += ['', '## Per fold and subset seed (foreground mean)', '',
                  '| comparison | fraction | fold | seed | tested | other | Δ | cases |', '|---|---:|---:|---:|---|---|---|---:|']
        lines += [f'| {u["comparison"]} | {u["fraction"]:g} | {u["fold"]} | {"—" if u["seed"] is None else u["seed"]} '
                  f'| {u["tested_mean"]:.4f} | {u["other_mean"]:.4f} | {u["diff_mean"]:+.4f} | {u["n_cases"]} |'
                  for u in unit_rows if u['label'] == FOREGROUND]
    if missing:
        lines += ['', f'Missing cells ({len(missing)}; left out of the table):', '']
        lines += [f'- {c.role}: {c.describe()}' for c in missing]
    return '\n'.join(lines) + '\n'


def csv_text(rows: List[dict], unit_rows: List[dict]) -> str:
    """Aggregate rows (fold and seed 'all'), then the per-(fold, seed) rows (statistics 'n/a')."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for i, r in enumerate(rows + unit_rows):
        record = {k: r.get(k) for k in CSV_FIELDS}
        if i < len(rows):
            record.update(fold='all', seed='all')
        writer.writerow({k: ('n/a' if v is None else repr(v) if isinstance(v, float) else v)
                         for k, v in record.items()})
    return out.getvalue()


def figure(rows: List[dict], unit_rows: List[dict], meta: ReportMeta, path: str) -> None:
    """Per label: mean Dice over units against the labelled fraction for each trainer; last panel: Δ foreground
    mean with its confidence interval, per comparison."""
    import matplotlib  # here: slow to import, and the backend is set before pyplot loads
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r['label'] for r in rows))
    fig, axes = plt.subplots(1, len(labels) + 1, figsize=(4 * (len(labels) + 1), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        for role, marker in zip(ROLES, 'os^'):
            comparison, key = FIGURE_SOURCE[role]
            mine = [r for r in rows if r['label'] == label and r['n_units'] > 0 and r['comparison'] == comparison]
            if not mine or role not in meta.trainers:
                continue
            ax.plot([r['fraction'] for r in mine], [r[key] for r in mine], marker=marker, label=meta.trainers[role])
        ax.set_title(label)
        ax.set_ylabel('Dice (mean over folds and seeds)')
    ax = axes[0][-1]
    for shift, (first, second) in zip((-0.03, 0.03), COMPARISONS):
        mine = [r for r in rows if r['comparison'] == f'{first} - {second}' and r['label'] == FOREGROUND and
                r['n_units'] > 0]
        if not mine:
            continue
        x = [r['fraction'] * (1 + shift) for r in mine]
        y = [r['diff_mean'] for r in mine]
        err = [[r['diff_mean'] - (r['ci_low'] if r['ci_low'] is not None else r['diff_mean']) for r in mine],
               [(r['ci_high'] if r['ci_high'] is not None else r['diff_mean']) - r['diff_mean'] for r in mine]]
        ax.errorbar(x, y, yerr=err, marker='o', capsize=3, linestyle='none', label=f'− {ROLE_WORDS[second]}')
    ax.axhline(0, color='grey', lw=0.8)
    ax.set_title(f'Δ foreground mean, {CONFIDENCE:.0%} CI')
    ax.set_ylabel('Δ Dice')
    for ax in axes[0]:
        ax.set_xscale('log')
        ax.set_xticks(meta.fractions)
        ax.set_xticklabels([format(f, 'g') for f in meta.fractions])
        ax.minorticks_off()
        ax.set_xlabel('labelled fraction')
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize='small')
    fig.suptitle(f'{meta.dataset}, {meta.configuration}: validation Dice, averaged per fold and subset seed')
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def write_report(output_folder: str, cells: Sequence[BenchmarkCell], names: Dict[str, str], meta: ReportMeta) -> dict:
    """Writes <stem>.md, .csv and .png into output_folder (atomically: concurrent cluster cells may all report).
    Returns {'md', 'csv', 'png': path, 'rows', 'unit_rows', 'missing', 'text': the Markdown}."""
    rows, unit_rows, missing = compare(cells, names)
    os.makedirs(output_folder, exist_ok=True)
    paths = {ext: os.path.join(output_folder, f'{meta.stem}.{ext}') for ext in ('md', 'csv', 'png')}
    text = markdown(rows, unit_rows, missing, meta)
    atomic_write_text(text, paths['md'])
    atomic_write_text(csv_text(rows, unit_rows), paths['csv'])
    figure(rows, unit_rows, meta, paths['png'])
    return {**paths, 'rows': rows, 'unit_rows': unit_rows, 'missing': missing, 'text': text}
