"""The encoder probe: its parts against values by hand, and the whole probe where the answer is known."""
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from nnunetv2_desd.evaluation.probe import (dice_scores, fit_linear_probe, probe_stage, sample_features,
                                            stratified_voxels)


def test_sample_features_equals_trilinear_upsampling_at_the_voxels():
    torch.manual_seed(0)
    low = torch.randn(3, 4, 5, 3)
    full = (8, 10, 12)
    upsampled = F.interpolate(low[None], size=full, mode='trilinear', align_corners=False)[0]
    voxels = torch.tensor([[0, 0, 0], [7, 9, 11], [3, 4, 5], [5, 0, 11], [1, 8, 2]])
    expected = torch.stack([upsampled[:, i, j, k] for i, j, k in voxels.tolist()])
    assert torch.allclose(sample_features(low, voxels, full), expected, atol=1e-5)


def test_dice_by_hand():
    prediction = torch.tensor([0, 1, 1, 2, 2, 0])
    label = torch.tensor([0, 1, 2, 2, 0, 0])
    # class 1: P={1,2}, L={1} -> 2*1/3; class 2: P={3,4}, L={2,3} -> 2*1/4; class 3 absent in both -> NaN
    scores = dice_scores(prediction, label, [1, 2, 3])
    assert scores[0] == pytest.approx(2 / 3) and scores[1] == pytest.approx(0.5) and np.isnan(scores[2])


def test_stratified_voxels_keep_class_frequencies():
    label = torch.zeros(4, 4, 4, dtype=torch.long)
    label[0, 0, :3] = 1          # 3 voxels of class 1, 61 of class 0
    voxels, targets, weights = stratified_voxels(label, [0, 1, 2], per_class=5, generator=torch.Generator())
    assert (targets == 0).sum() == 5 and (targets == 1).sum() == 3 and (targets == 2).sum() == 0
    assert weights[targets == 0].tolist() == pytest.approx([61 / 5] * 5) and weights[targets == 1].tolist() == [1.0] * 3
    assert all(int(label[tuple(v)]) == int(t) for v, t in zip(voxels.tolist(), targets.tolist()))


def test_weighted_logistic_regression_separates_separable_classes():
    x = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]])
    probe = fit_linear_probe(x, torch.tensor([0, 0, 1, 1]), torch.ones(4), num_classes=2, l2=1e-4)
    logits = probe.logits_map(x.T.reshape(1, 4, 1, 1), (4, 1, 1)).reshape(2, 4)
    assert logits.argmax(0).tolist() == [0, 0, 1, 1]


def _cases(n_cases=6, shape=(16, 16, 16), seed=0):
    """Label maps with two cubes of classes 1 and 2 at random places; -1 on a border slab (ignored)."""
    rng = np.random.default_rng(seed)
    labels = {}
    for i in range(n_cases):
        label = torch.zeros(shape, dtype=torch.long)
        for c in (1, 2):
            start = rng.integers(0, 10, 3)
            label[start[0]:start[0] + 5, start[1]:start[1] + 5, start[2]:start[2] + 5] = c
        label[:, :, -1] = -1
        labels[f'case_{i}'] = label
    return labels


def _folds(cases, k=3):
    names = sorted(cases)
    return [{'train': [n for j, n in enumerate(names) if j % k != f], 'val': names[f::k]} for f in range(k)]


def test_probe_finds_features_that_encode_the_label_and_not_noise():
    torch.manual_seed(0)
    labels = _cases()
    folds = _folds(labels)
    # informative: one-hot of the label at full resolution (what a perfect stage 0 would give), plus noise
    informative = {c: F.one_hot(l.clamp_min(0), 3).permute(3, 0, 1, 2).float() + 0.3 * torch.randn(3, 16, 16, 16)
                   for c, l in labels.items()}
    # the same one-hot averaged to half resolution: still informative, blurred at the edges
    coarse = {c: F.avg_pool3d(f[None], 2)[0] for c, f in informative.items()}
    noise = {c: torch.randn(8, 16, 16, 16) for c in labels}
    good = probe_stage(informative, labels, folds, num_classes=3, voxels_per_class=300)
    blurred = probe_stage(coarse, labels, folds, num_classes=3, voxels_per_class=300)
    bad = probe_stage(noise, labels, folds, num_classes=3, voxels_per_class=300)
    assert len(good) == len(bad) == 3
    assert min(d for d, _ in good) > 0.9 and min(a for _, a in good) > 0.97
    assert min(d for d, _ in blurred) > 0.7
    # noise: the probe can only predict background (the weighted prior); foreground Dice ~ 0
    assert max(d for d, _ in bad) < 0.2
    # accuracy of always-background = share of background among valid voxels (~0.93 here): noise cannot beat it
    background = np.mean([float((l == 0).sum() / (l >= 0).sum()) for l in labels.values()])
    assert max(a for _, a in bad) <= background + 0.02


# ------------------------------------------------------------------------------------------- the real command
def test_desd_probe_command_writes_table_csv_figure(finetune_datasets, tmp_path):
    import csv
    from conftest import run_command
    root, env, export = finetune_datasets
    out = tmp_path / 'probe'
    proc = run_command(['desd_probe', '-d', '901', '-w', export, export, '--labels', 'desd', 'desd', '--folds', '3',
                        '--random-seeds', '3', '--voxels-per-class', '50', '-device', 'cpu', '-o', out], env)
    rows = list(csv.DictReader(open(out / 'probe.csv')))
    stages = {int(r['stage']) for r in rows}
    encoders = {r['encoder'] for r in rows}
    # 2 exports + 3 random initialisations, every stage of the 901 network, 3 folds
    assert len(encoders) == 5 and {'random (seed 0)', 'random (seed 1)', 'random (seed 2)'} <= encoders
    assert len(rows) == 5 * len(stages) * 3 and stages == set(range(len(stages))) and len(stages) >= 3
    assert all(0 <= float(r['dice']) <= 1 and 0 <= float(r['accuracy']) <= 1 for r in rows)
    # the same export twice gives the same numbers; different random seeds do not
    by = {(r['encoder'], r['stage'], r['fold']): float(r['dice']) for r in rows}
    assert all(by[('desd #1', s, f)] == by[('desd #2', s, f)] for _, s, f in by if _ == 'desd #1')
    assert any(by[('random (seed 0)', s, f)] != by[('random (seed 1)', s, f)] for _, s, f in by if _ == 'desd #1')
    md = (out / 'probe.md').read_text()
    assert '| desd − best random (n = 2) |' in md and 'mean gain over distilled stages' in md
    assert (out / 'probe.png').read_bytes()[:4] == b'\x89PNG'
    assert 'table:' in proc.stdout


def test_desd_probe_refuses_plans_that_are_not_the_exports(finetune_datasets, tmp_path):
    from conftest import run_command
    root, env, export = finetune_datasets
    out = tmp_path / 'refused'
    # 902 was planned on its own (2 channels, its own CT statistics): not the export's plans
    proc = run_command(['desd_probe', '-d', '902', '-w', export, '-device', 'cpu', '-o', out], env, check=False)
    assert proc.returncode == 2 and not out.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('desd_probe: error: no plans of Dataset902')
    assert 'desd_plan_like_pretrained -d Dataset902_Synthetic -w' in lines[0]
