"""desd_benchmark end to end: stock nnUNetv2_train runs of the tiny trainers, the paired report, reuse, commands.

Two folds at two fractions (8 runs; each tiny nnUNetv2_train costs ~30-45 s on 2 CPU cores: imports, and nnU-Net's
validation starts two spawned worker pools); fold 2's cells appear through --print-commands.
"""
import csv
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import wilcoxon

from conftest import nnunet_env, run_command
from nnunetv2_desd.evaluation.fractions import find_fraction_fold
from nnunetv2_desd.pretraining.engine.checkpoint import file_sha256
from nnunetv2_desd.trainers import PROVENANCE_FILE, with_ext_trainers

pytestmark = pytest.mark.e2e

DATASET = 'Dataset901_Synthetic'
TESTED, BASELINE = 'nnUNetTrainerDeSDTiny', 'nnUNetTrainerTiny'
LABELS = ('bone', 'lung')


def _case_dice(summary: Path) -> dict:
    """{case file: [bone, lung, mean of both]} recomputed from nnU-Net's summary.json."""
    cases = {}
    for entry in json.loads(summary.read_text())['metric_per_case']:
        dice = [entry['metrics'][key]['Dice'] for key in ('1', '2')]
        cases[Path(entry['reference_file']).name] = dice + [float(np.nanmean(dice))]
    return cases


def test_benchmark_runs_reports_and_reuses(finetune_datasets, tmp_path):
    shared_root, _, export = finetune_datasets
    env = with_ext_trainers(nnunet_env(tmp_path))
    # the shared fixture must stay unchanged: train on a copy of its preprocessed dataset
    shutil.copytree(shared_root / 'preprocessed' / DATASET, tmp_path / 'preprocessed' / DATASET)
    common = ['desd_benchmark', '-d', '901', '-w', export, '-tr', TESTED, '--baseline', BASELINE]
    args = [*common, '--folds', '0', '1', '--fractions', '0.5', '1.0', '-device', 'cpu']
    run_command(args, env, timeout=900)

    pre, results = tmp_path / 'preprocessed' / DATASET, tmp_path / 'results' / DATASET
    out = results / 'desd_benchmark'
    splits = json.loads((pre / 'splits_final.json').read_text())
    halves = {fold: find_fraction_fold(str(pre), fold, 0.5) for fold in (0, 1)}
    for fold, half in halves.items():
        assert half >= 5 and splits[half]['val'] == splits[fold]['val']
        assert len(splits[half]['train']) == round(0.5 * len(splits[fold]['train']))
    n_val = len(splits[0]['val']) + len(splits[1]['val'])
    assert n_val == 3  # 6 cases in 5 folds: fold 0 validates on 2, fold 1 on 1

    # every cell was trained by stock nnU-Net; the tested runs loaded this export
    summaries = {}
    for fraction in (0.5, 1.0):
        for trainer in (TESTED, BASELINE):
            cases = {}
            for fold in (0, 1):
                fold_id = halves[fold] if fraction == 0.5 else fold
                folder = results / f'{trainer}__nnUNetPlans__3d_fullres' / f'fold_{fold_id}'
                cases.update(_case_dice(folder / 'validation' / 'summary.json'))
                assert (out / 'logs' / f'{trainer}__fold_{fold_id}.log').is_file()
                if trainer == TESTED:
                    provenance = json.loads((folder / PROVENANCE_FILE).read_text())
                    assert provenance['file_sha256'] == file_sha256(str(export))
            summaries[(trainer, fraction)] = cases

    stem = f'{TESTED}_vs_{BASELINE}__3d_fullres'
    table = list(csv.DictReader((out / f'{stem}.csv').open()))
    assert [(r['fraction'], r['label']) for r in table] == \
        [(f, label) for f in ('0.5', '1.0') for label in (*LABELS, 'foreground mean')]
    for row in table:
        base, test = summaries[(BASELINE, float(row['fraction']))], summaries[(TESTED, float(row['fraction']))]
        column = (*LABELS, 'foreground mean').index(row['label'])
        b = np.array([base[c][column] for c in sorted(base)])
        t = np.array([test[c][column] for c in sorted(base)])
        assert row['n_pairs'] == str(n_val) and sorted(base) == sorted(test)
        assert float(row['baseline_mean']) == pytest.approx(b.mean())
        assert float(row['baseline_sd']) == pytest.approx(b.std(ddof=1))
        assert float(row['tested_mean']) == pytest.approx(t.mean())
        assert float(row['tested_sd']) == pytest.approx(t.std(ddof=1))
        assert float(row['diff_mean']) == pytest.approx((t - b).mean())
        assert float(row['diff_sd']) == pytest.approx((t - b).std(ddof=1))
        assert float(row['wilcoxon_p']) == pytest.approx(wilcoxon(t - b).pvalue)
    md = (out / f'{stem}.md').read_text()
    assert '| 1 | foreground mean |' in md and '| 0.5 | bone |' in md and 'Missing cells' not in md
    assert file_sha256(str(export)) in md
    assert (out / f'{stem}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # a second call reuses every run: no new logs, no training, the same table
    logs = {p.name: p.stat().st_mtime_ns for p in (out / 'logs').iterdir()}
    start = time.time()
    proc = run_command(args, env)
    assert time.time() - start < 60
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'logs').iterdir()} == logs
    assert 'training' not in proc.stderr and list(csv.DictReader((out / f'{stem}.csv').open())) == table

    # for a cluster: the cells of fold 2 still to run, one stock command each
    proc = run_command([*common, '--folds', '0', '1', '2', '--fractions', '0.5', '1.0', '--print-commands'], env)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith('export nnUNet_extTrainer=')
    half_2 = find_fraction_fold(str(pre), 2, 0.5)
    assert lines[1:] == [
        f'nnUNetv2_train {DATASET} 3d_fullres {half_2} -tr {TESTED} -p nnUNetPlans -device cuda '
        f'-pretrained_weights {export}',
        f'nnUNetv2_train {DATASET} 3d_fullres {half_2} -tr {BASELINE} -p nnUNetPlans -device cuda',
        f'nnUNetv2_train {DATASET} 3d_fullres 2 -tr {TESTED} -p nnUNetPlans -device cuda -pretrained_weights {export}',
        f'nnUNetv2_train {DATASET} 3d_fullres 2 -tr {BASELINE} -p nnUNetPlans -device cuda',
    ]
