"""Paired per-case Dice of two trainers, from nnU-Net's ``fold_X/validation/summary.json``.

nnU-Net 2.8.1 writes per validation case ``metric_per_case[i] = {'metrics': {label_key: {'Dice': ...}},
'reference_file': ...}``; label keys are ``str(label)`` (``str(tuple(region))`` for region-based datasets).
A case is identified by (base fold, reference file name); a fraction's fold validates on the base fold's cases,
so the two trainers' cases pair up. For every fraction and label, plus the per-case mean over labels
('foreground mean'), the report gives each trainer's mean +- sd over the paired cases of all chosen folds, the
paired difference tested - baseline and a two-sided Wilcoxon signed-rank p. A Dice of NaN (label absent from
reference and prediction) drops that pair.
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

from nnunetv2_desd.errors import DesdError
from nnunetv2_desd.pretraining.engine.checkpoint import atomic_write, atomic_write_text

FOREGROUND = 'foreground mean'
ROLES = ('baseline', 'tested')
CSV_FIELDS = ('fraction', 'label', 'baseline_mean', 'baseline_sd', 'tested_mean', 'tested_sd', 'diff_mean',
              'diff_sd', 'wilcoxon_p', 'n_pairs')


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run: a trainer (role 'baseline' or 'tested') on one labelled fraction of one base fold."""
    role: str
    trainer: str
    plans: str
    fold: int
    fraction: float
    fold_id: Optional[int]       # the nnU-Net fold; None while the fraction fold does not exist yet
    model_folder: Optional[str]  # nnUNet_results/<Dataset>/<trainer>__<plans>__<config>/fold_<fold_id>

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
        return f'{self.trainer} ({self.plans}), {fold}, fraction {self.fraction:g}'


@dataclasses.dataclass
class ReportMeta:
    dataset: str
    configuration: str
    tested_trainer: str
    tested_plans: str
    baseline_trainer: str
    baseline_plans: str
    folds: List[int]
    fractions: List[float]
    seed: int
    pretrained: Optional[str] = None  # '-w' file and its sha256, when given

    @property
    def stem(self) -> str:
        return f'{self.tested_trainer}_vs_{self.baseline_trainer}__{self.configuration}'


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
    """{reference file name: {label name: Dice, FOREGROUND: mean over the labels that are not NaN}}."""
    try:
        with open(summary_file) as f:
            summary = json.load(f)
        per_case = summary['metric_per_case']
    except (OSError, ValueError, KeyError) as e:
        raise DesdError(f'Cannot read per-case metrics from {summary_file}: {e}') from None
    cases = {}
    for entry in per_case:
        dice = {names.get(key, key): float(m['Dice']) for key, m in entry['metrics'].items()}
        values = [v for v in dice.values() if not math.isnan(v)]
        dice[FOREGROUND] = float(np.mean(values)) if values else math.nan
        cases[os.path.basename(entry['reference_file'])] = dice
    return cases


def _mean_sd(values: np.ndarray) -> Tuple[Optional[float], Optional[float]]:
    if len(values) == 0:
        return None, None
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) >= 2 else None)


def paired_statistics(baseline: Sequence[float], tested: Sequence[float]) -> dict:
    """Means +- sample sds (ddof=1) of both sides and of tested - baseline over the pairs without NaN, and the
    two-sided Wilcoxon signed-rank p (None where n < 2 or every difference is 0)."""
    from scipy.stats import wilcoxon

    b, t = np.asarray(baseline, dtype=float), np.asarray(tested, dtype=float)
    keep = ~(np.isnan(b) | np.isnan(t))
    b, t = b[keep], t[keep]
    diff = t - b
    p = None
    if len(diff) >= 2 and np.any(diff != 0):
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # scipy warns about ties / small n; the p it returns is still right
            p = float(wilcoxon(diff, alternative="two-sided").pvalue)
    (bm, bs), (tm, ts), (dm, ds) = _mean_sd(b), _mean_sd(t), _mean_sd(diff)
    return dict(baseline_mean=bm, baseline_sd=bs, tested_mean=tm, tested_sd=ts, diff_mean=dm, diff_sd=ds,
                wilcoxon_p=p, n_pairs=int(len(diff)))


def compare(cells: Sequence[Cell], names: Dict[str, str]) -> Tuple[List[dict], List[Cell]]:
    """Rows (one per fraction and label, then FOREGROUND) over the finished cells, and the missing cells."""
    missing = [c for c in cells if not c.done]
    dice = {(c.role, c.fold, c.fraction): read_case_dice(c.summary_file, names) for c in cells if c.done}
    labels = list(names.values())
    for per_case in dice.values():
        for case in per_case.values():
            labels += [k for k in case if k not in labels and k != FOREGROUND]
    rows = []
    for fraction in sorted({c.fraction for c in cells}):
        pairs = {label: ([], []) for label in labels + [FOREGROUND]}
        for fold in sorted({c.fold for c in cells}):
            base, test = dice.get(('baseline', fold, fraction)), dice.get(('tested', fold, fraction))
            if base is None or test is None:
                continue
            for case in sorted(set(base) & set(test)):
                for label, (b, t) in pairs.items():
                    b.append(base[case].get(label, math.nan))
                    t.append(test[case].get(label, math.nan))
        for label, (b, t) in pairs.items():
            rows.append({'fraction': fraction, 'label': label, **paired_statistics(b, t)})
    return rows, missing


def _fmt(value: Optional[float], spec: str = '.4f') -> str:
    return 'n/a' if value is None else format(value, spec)


def _mean_pm_sd(mean: Optional[float], sd: Optional[float], sign: str = '') -> str:
    if mean is None:
        return 'n/a'
    return f'{_fmt(mean, sign + ".4f")} ± {_fmt(sd)}'


def markdown(rows: List[dict], missing: List[Cell], meta: ReportMeta) -> str:
    lines = [f'# {meta.tested_trainer} vs {meta.baseline_trainer}: {meta.dataset}, {meta.configuration}', '',
             f'- dataset: {meta.dataset}; configuration: {meta.configuration}',
             f'- tested: {meta.tested_trainer} with plans {meta.tested_plans}',
             f'- baseline: {meta.baseline_trainer} with plans {meta.baseline_plans}',
             f'- folds: {" ".join(map(str, meta.folds))}; labelled fractions: '
             f'{" ".join(format(f, "g") for f in meta.fractions)}; subset seed: {meta.seed}']
    if meta.pretrained:
        lines.append(f'- pre-trained weights: {meta.pretrained}')
    lines += ['',
              'These are our measurements: per-case Dice read from nnU-Net\'s validation summary.json of each run '
              'listed here, not numbers from a publication. Means ± sample sd over the validation cases of the '
              'chosen folds that both trainers have; Δ = tested − baseline per case; p: two-sided Wilcoxon '
              'signed-rank test on the paired cases. "foreground mean" is the per-case mean over labels.', '',
              '| fraction | label | baseline Dice | tested Dice | Δ Dice | p (Wilcoxon) | n pairs |',
              '|---:|---|---|---|---|---:|---:|']
    for r in rows:
        lines.append(f'| {r["fraction"]:g} | {r["label"]} | {_mean_pm_sd(r["baseline_mean"], r["baseline_sd"])} | '
                     f'{_mean_pm_sd(r["tested_mean"], r["tested_sd"])} | '
                     f'{_mean_pm_sd(r["diff_mean"], r["diff_sd"], "+")} | {_fmt(r["wilcoxon_p"], ".4g")} | '
                     f'{r["n_pairs"]} |')
    if missing:
        lines += ['', f'Missing cells ({len(missing)}; left out of the table):', '']
        lines += [f'- {c.role}: {c.describe()}' for c in missing]
    return '\n'.join(lines) + '\n'


def csv_text(rows: List[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS, lineterminator='\n')
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ('n/a' if r[k] is None else repr(r[k]) if isinstance(r[k], float) else r[k])
                         for k in CSV_FIELDS})
    return out.getvalue()


def figure(rows: List[dict], meta: ReportMeta, path: str) -> None:
    """Mean Dice +- sd against the labelled fraction: one panel per label and the foreground mean."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r['label'] for r in rows))
    fig, axes = plt.subplots(1, max(1, len(labels)), figsize=(4 * max(1, len(labels)), 3.6), squeeze=False)
    for ax, label in zip(axes[0], labels):
        mine = [r for r in rows if r['label'] == label and r['n_pairs'] > 0]
        for role, trainer, marker in (('baseline', meta.baseline_trainer, 's'), ('tested', meta.tested_trainer, 'o')):
            x = [r['fraction'] for r in mine]
            y = [r[f'{role}_mean'] for r in mine]
            err = [r[f'{role}_sd'] or 0.0 for r in mine]
            ax.errorbar(x, y, yerr=err, marker=marker, capsize=3, label=trainer)
        ax.set_xscale('log')
        ax.set_xticks(meta.fractions)
        ax.set_xticklabels([format(f, 'g') for f in meta.fractions])
        ax.minorticks_off()
        ax.set_title(label)
        ax.set_xlabel('labelled fraction')
        ax.set_ylabel('Dice')
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize='small')
    fig.suptitle(f'{meta.dataset}, {meta.configuration}: mean Dice ± sd over validation cases')
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=100))
    plt.close(fig)


def write_report(output_folder: str, cells: Sequence[Cell], names: Dict[str, str], meta: ReportMeta) -> dict:
    """Writes <stem>.md, .csv and .png into output_folder (atomically: concurrent cluster cells may all report).
    Returns {'md', 'csv', 'png': path, 'rows', 'missing', 'text': the Markdown}."""
    rows, missing = compare(cells, names)
    os.makedirs(output_folder, exist_ok=True)
    paths = {ext: os.path.join(output_folder, f'{meta.stem}.{ext}') for ext in ('md', 'csv', 'png')}
    text = markdown(rows, missing, meta)
    atomic_write_text(text, paths['md'])
    atomic_write_text(csv_text(rows), paths['csv'])
    figure(rows, meta, paths['png'])
    return {**paths, 'rows': rows, 'missing': missing, 'text': text}
