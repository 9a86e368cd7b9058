"""desd_benchmark end to end: stock nnUNetv2_train runs of the tiny trainers (tested, its from-scratch twin, vanilla),
the paired report, reuse, commands.

Fold 0 at two fractions (6 cells; each tiny nnUNetv2_train costs ~20-40 s on 2 CPU cores: imports, and nnU-Net's
validation starts two spawned worker pools; the vanilla cell at 0.5 is shared with test_dmd_e2e through conftest's
benchmark_workspace); fold 2's cells appear through --print-commands.
"""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_command
from nnunetv2_desd.data.fractions import find_fraction_fold
from nnunetv2_desd.common.checkpoint import file_sha256
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE
from nnunetv2_desd.trainers.finetune import DEFAULT_FINETUNE_PRESET, FINETUNE_PRESETS

pytestmark = pytest.mark.e2e

DATASET = 'Dataset901_Synthetic'
TESTED, SCRATCH, BASELINE = 'nnUNetTrainerDeSDTiny', 'nnUNetTrainerDeSDTiny_scratch', 'nnUNetTrainerTiny'
LABELS = ('bone', 'lung')


def _case_dice(summary: Path) -> dict:
    """{case file: [bone, lung]} read from nnU-Net's summary.json."""
    return {Path(e['reference_file']).name: [e['metrics'][key]['Dice'] for key in ('1', '2')]
            for e in json.loads(summary.read_text())['metric_per_case']}


def _hand_value(cases: dict, column: int, other: dict) -> float:
    """One side's case value: a label's Dice, or (column 2) the mean over the labels both sides have."""
    if column < 2:
        return cases[column]
    common = [i for i in (0, 1) if not (np.isnan(cases[i]) or np.isnan(other[i]))]
    return float(np.mean([cases[i] for i in common]))


def test_benchmark_runs_reports_and_reuses(finetune_datasets, benchmark_workspace):
    export = finetune_datasets[2]
    root, env = benchmark_workspace  # test_dmd_e2e may have trained the vanilla cell at 0.5 already: it is reused
    common = ['desd_benchmark', '-d', '901', '-w', export, '-tr', TESTED, '--baseline', BASELINE]
    args = [*common, '--folds', '0', '--fractions', '0.5', '1.0', '-device', 'cpu']
    run_command(args, env, timeout=900)

    pre, results = root / 'preprocessed' / DATASET, root / 'results' / DATASET
    out = results / 'desd_benchmark'
    splits = json.loads((pre / 'splits_final.json').read_text())
    half = find_fraction_fold(str(pre), 0, 0.5)
    # 6 cases in 5 folds: fold 0 validates on 2 and trains on 4; half of 4 is 2
    assert half >= 5 and splits[half]['val'] == splits[0]['val'] and len(splits[0]['val']) == 2
    assert len(splits[0]['train']) == 4 and len(splits[half]['train']) == 2

    # every cell was trained by stock nnU-Net; the tested runs loaded this export, the scratch twin loaded nothing
    dice = {}
    for fraction, fold_id in ((0.5, half), (1.0, 0)):
        for trainer in (TESTED, SCRATCH, BASELINE):
            folder = results / f'{trainer}__nnUNetPlans__3d_fullres' / f'fold_{fold_id}'
            dice[(trainer, fraction)] = _case_dice(folder / 'validation' / 'summary.json')
            assert (out / 'logs' / f'{trainer}__fold_{fold_id}.log').is_file()
            log = next(folder.glob('training_log_*.txt')).read_text()
            if trainer == TESTED:
                provenance = json.loads((folder / PROVENANCE_FILE).read_text())
                assert provenance['file_sha256'] == file_sha256(str(export))
                recipe = FINETUNE_PRESETS[DEFAULT_FINETUNE_PRESET]  # the default recipe, as applied
                assert provenance['recipe']['name'] == DEFAULT_FINETUNE_PRESET
                assert provenance['recipe']['peak_lr'] == recipe['initial_lr']
                assert provenance['recipe']['deep_supervision'] is recipe['enable_deep_supervision']
                assert 'loaded ' in log and 'encoder tensors' in log
            if trainer == SCRATCH:
                assert not (folder / PROVENANCE_FILE).exists() and 'encoder tensors' not in log
                recipe = FINETUNE_PRESETS[DEFAULT_FINETUNE_PRESET]
                assert f"fine-tuning recipe '{DEFAULT_FINETUNE_PRESET}': sgd, peak lr {recipe['initial_lr']}, deep " \
                       f"supervision {'on' if recipe['enable_deep_supervision'] else 'off'}, warm-up 1 of 2 epochs" in log
                assert 'from scratch' in log

    stem = f'{TESTED}_vs_{BASELINE}__3d_fullres'
    table = [r for r in csv.DictReader((out / f'{stem}.csv').open()) if r['fold'] == 'all']
    comparisons = {'tested - scratch': SCRATCH, 'tested - baseline': BASELINE}
    assert [(r['comparison'], r['fraction'], r['label']) for r in table] == \
        [(c, f, label) for c in comparisons for f in ('0.5', '1.0') for label in (*LABELS, 'foreground mean')]
    for row in table:
        fraction, column = float(row['fraction']), (*LABELS, 'foreground mean').index(row['label'])
        test, other = dice[(TESTED, fraction)], dice[(comparisons[row['comparison']], fraction)]
        assert sorted(test) == sorted(other)
        t = np.array([_hand_value(test[c], column, other[c]) for c in sorted(test)])
        o = np.array([_hand_value(other[c], column, test[c]) for c in sorted(test)])
        keep = ~(np.isnan(t) | np.isnan(o))
        assert row['n_units'] == '1' and row['n_cases'] == str(keep.sum())  # one unit: fold 0
        assert float(row['tested_mean']) == pytest.approx(t[keep].mean())
        assert float(row['other_mean']) == pytest.approx(o[keep].mean())
        assert float(row['diff_mean']) == pytest.approx((t[keep] - o[keep]).mean())
        assert row['ci_low'] == 'n/a'  # one unit has no interval
    md = (out / f'{stem}.md').read_text()
    assert '| 1 | foreground mean |' in md and '| 0.5 | bone |' in md and 'Missing cells' not in md
    assert f'## {TESTED} − {SCRATCH} (same schedule from scratch)' in md and 'no result here can reach p < 0.05' in md
    assert file_sha256(str(export)) in md and 'fold 0: 2 of 4' in md
    assert (out / f'{stem}.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

    # a second call reuses every run: no new logs, no training, the same table
    logs = {p.name: p.stat().st_mtime_ns for p in (out / 'logs').iterdir()}
    proc = run_command(args, env)
    assert {p.name: p.stat().st_mtime_ns for p in (out / 'logs').iterdir()} == logs
    assert 'training' not in proc.stderr
    assert [r for r in csv.DictReader((out / f'{stem}.csv').open()) if r['fold'] == 'all'] == table

    # for a cluster: the cells of fold 2 still to run, one stock command each
    proc = run_command([*common, '--folds', '0', '2', '--fractions', '0.5', '1.0', '--print-commands'], env)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith('export nnUNet_extTrainer=')
    half_2 = find_fraction_fold(str(pre), 2, 0.5)
    assert lines[1:] == [
        f'nnUNetv2_train {DATASET} 3d_fullres {half_2} -tr {TESTED} -p nnUNetPlans -device cuda '
        f'-pretrained_weights {export}',
        f'nnUNetv2_train {DATASET} 3d_fullres {half_2} -tr {SCRATCH} -p nnUNetPlans -device cuda',
        f'nnUNetv2_train {DATASET} 3d_fullres {half_2} -tr {BASELINE} -p nnUNetPlans -device cuda',
        f'nnUNetv2_train {DATASET} 3d_fullres 2 -tr {TESTED} -p nnUNetPlans -device cuda -pretrained_weights {export}',
        f'nnUNetv2_train {DATASET} 3d_fullres 2 -tr {SCRATCH} -p nnUNetPlans -device cuda',
        f'nnUNetv2_train {DATASET} 3d_fullres 2 -tr {BASELINE} -p nnUNetPlans -device cuda',
    ]
