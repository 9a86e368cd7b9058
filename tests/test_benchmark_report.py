"""desd_benchmark without training: fraction folds in splits_final.json, the paired report, the CLI's decisions."""
import csv
import io
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

from nnunetv2_desd.errors import DesdError
from nnunetv2_desd.evaluation import benchmark
from nnunetv2_desd.evaluation.fractions import (REGISTRY_FILE, SPLITS_FILE, find_fraction_fold, fraction_fold,
                                                fraction_fold_info)
from nnunetv2_desd.evaluation.report import (FOREGROUND, Cell, ReportMeta, label_names, paired_statistics,
                                             read_case_dice, write_report)

CASES = [f'case_{i:02d}' for i in range(12)]
DATA_ID = 'nnUNetPlans_3d_fullres'


def fake_preprocessed(root: Path, cases=CASES) -> Path:
    """nnUNet_preprocessed/<Dataset> with a blosc2 data folder (file names are all that do_split looks at)."""
    folder = root / 'Dataset990_Fake'
    data = folder / DATA_ID
    data.mkdir(parents=True)
    for c in cases:
        for suffix in ('.b2nd', '_seg.b2nd', '.pkl'):
            (data / (c + suffix)).write_bytes(b'')
    return folder


def _splits(folder: Path) -> list:
    return json.loads((folder / SPLITS_FILE).read_text())


# ---------------------------------------------------------------- fraction folds

def test_missing_splits_are_nnunets_own_five_folds(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    pre = fake_preprocessed(tmp_path)
    assert fraction_fold(str(pre), str(pre / DATA_ID), 2, 1.0) == 2  # full fraction: the standard fold itself
    splits = _splits(pre)
    assert splits == [{'train': list(s['train']), 'val': list(s['val'])}
                      for s in generate_crossval_split(sorted(CASES), seed=12345, n_splits=5)]
    assert sorted(c for s in splits for c in s['val']) == CASES  # the vals partition the cases
    assert all(sorted(s['train'] + s['val']) == CASES for s in splits)
    assert not (pre / REGISTRY_FILE).exists()


def test_fraction_folds_are_nested_appended_and_keep_val(tmp_path):
    pre = fake_preprocessed(tmp_path)
    data = str(pre / DATA_ID)
    fraction_fold(str(pre), data, 0, 1.0)
    standard = _splits(pre)
    n = len(standard[1]['train'])  # 12 cases, 5 folds: fold 1 trains on 10 or 9
    ids = {f: fraction_fold(str(pre), data, 1, f) for f in (0.25, 0.5, 0.75)}
    assert sorted(ids.values()) == [5, 6, 7]
    splits = _splits(pre)
    assert splits[:5] == standard  # standard entries untouched
    subsets = {f: splits[i]['train'] for f, i in ids.items()}
    for f, subset in subsets.items():
        assert len(subset) == max(1, round(f * n))
        assert set(subset) <= set(standard[1]['train'])
        assert splits[ids[f]]['val'] == standard[1]['val']
    assert set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[0.75])
    registry = json.loads((pre / REGISTRY_FILE).read_text())
    assert registry[str(ids[0.5])] == {'base_fold': 1, 'fraction': 0.5, 'seed': 12345, 'n_train': round(0.5 * n)}

    # asking again reuses the entries and leaves both files byte for byte as they were
    before = ((pre / SPLITS_FILE).read_bytes(), (pre / REGISTRY_FILE).read_bytes())
    assert {f: fraction_fold(str(pre), data, 1, f) for f in (0.25, 0.5, 0.75)} == ids
    assert find_fraction_fold(str(pre), 1, 0.5) == ids[0.5] and find_fraction_fold(str(pre), 2, 0.5) is None
    assert ((pre / SPLITS_FILE).read_bytes(), (pre / REGISTRY_FILE).read_bytes()) == before

    # another seed draws another subset; another fold has its own permutation
    other_seed = fraction_fold(str(pre), data, 1, 0.5, seed=7)
    assert other_seed == 8 and set(_splits(pre)[8]['train']) != set(subsets[0.5])
    assert fraction_fold(str(pre), data, 0, 0.01) == 9 and len(_splits(pre)[9]['train']) == 1  # at least one case


def test_fraction_fold_info_gives_the_left_out_pool(tmp_path):
    pre = fake_preprocessed(tmp_path)
    fold_id = fraction_fold(str(pre), str(pre / DATA_ID), 3, 0.5)
    splits = _splits(pre)
    info = fraction_fold_info(str(pre), fold_id)
    assert (info['base_fold'], info['fraction'], info['seed']) == (3, 0.5, 12345)
    assert info['train'] == splits[fold_id]['train'] and info['val'] == splits[3]['val']
    assert sorted(info['train'] + info['left_out']) == sorted(splits[3]['train'])
    assert not set(info['train']) & set(info['left_out']) and len(info['left_out']) > 0
    assert fraction_fold_info(str(pre), 3) is None  # standard fold


def test_bad_fractions_and_folds_are_refused(tmp_path):
    pre = fake_preprocessed(tmp_path)
    data = str(pre / DATA_ID)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(DesdError, match='fraction'):
            fraction_fold(str(pre), data, 0, bad)
    appended = fraction_fold(str(pre), data, 0, 0.5)
    with pytest.raises(DesdError, match='not a standard fold'):
        fraction_fold(str(pre), data, appended, 0.5)  # a fraction of a fraction
    with pytest.raises(DesdError, match='not a standard fold'):
        fraction_fold(str(pre), data, 11, 1.0)


def test_custom_splits_are_kept_and_a_replaced_file_is_detected(tmp_path):
    pre = fake_preprocessed(tmp_path)
    custom = [{'train': CASES[:8], 'val': CASES[8:]}, {'train': CASES[4:], 'val': CASES[:4]}]
    (pre / SPLITS_FILE).write_text(json.dumps(custom))
    assert fraction_fold(str(pre), str(pre / DATA_ID), 1, 0.5) == 2
    assert _splits(pre)[:2] == custom and len(_splits(pre)[2]['train']) == 4
    with pytest.raises(DesdError, match='not a standard fold'):
        fraction_fold(str(pre), str(pre / DATA_ID), 3, 1.0)
    (pre / SPLITS_FILE).write_text(json.dumps(custom))  # someone rewrote the splits; the registry is now stale
    with pytest.raises(DesdError, match='no longer holds fold 2'):
        fraction_fold(str(pre), str(pre / DATA_ID), 1, 0.5)


def _append(args):
    pre, fold, fraction = args
    return fraction_fold(pre, os.path.join(pre, DATA_ID), fold, fraction)


def test_concurrent_cells_append_distinct_entries(tmp_path):
    pre = fake_preprocessed(tmp_path)
    jobs = [(str(pre), fold, f) for fold in range(5) for f in (0.25, 0.5)] * 2  # each (fold, fraction) twice
    with multiprocessing.get_context('fork').Pool(4) as pool:
        ids = pool.map(_append, jobs)
    assert ids[:10] == ids[10:] and sorted(set(ids)) == list(range(5, 15))
    splits, registry = _splits(pre), json.loads((pre / REGISTRY_FILE).read_text())
    assert len(splits) == 15 and sorted(map(int, registry)) == list(range(5, 15))
    for (_, fold, f), fold_id in zip(jobs, ids):
        assert registry[str(fold_id)]['base_fold'] == fold and registry[str(fold_id)]['fraction'] == f
        assert splits[fold_id]['val'] == splits[fold]['val']


# ---------------------------------------------------------------- report on hand-written summary.json files

LABELS = {'background': 0, 'liver': 1, 'tumour': 2}
NAN = float('nan')
# (role, fold, fraction) -> {case: (liver Dice, tumour Dice)}
DICE = {
    ('baseline', 0, 1.0): {'a': (0.80, NAN), 'b': (0.70, 0.50)},
    ('tested', 0, 1.0): {'a': (0.85, 0.30), 'b': (0.80, 0.42)},
    ('baseline', 1, 1.0): {'c': (0.60, 0.40)},
    ('tested', 1, 1.0): {'c': (0.75, 0.60)},
    ('baseline', 0, 0.5): {'a': (0.50, 0.10), 'b': (0.60, 0.20)},
    ('tested', 0, 0.5): {'a': (0.70, 0.10), 'b': (0.90, 0.20)},
    ('baseline', 1, 0.5): {'c': (0.10, 0.10)},  # its tested partner is missing: fold 1 drops out at 0.5
}
FOLD_IDS = {(0, 1.0): 0, (1, 1.0): 1, (0, 0.5): 5, (1, 0.5): 6}
TRAINERS = {'baseline': 'nnUNetTrainer', 'tested': 'nnUNetTrainerDeSD'}


def write_summary(path: Path, cases: dict) -> None:
    """The layout nnU-Net 2.8.1's compute_metrics_on_folder writes (NaN as the bare token NaN)."""
    per_case = [{'metrics': {'1': {'Dice': liver, 'IoU': 0.0}, '2': {'Dice': tumour, 'IoU': 0.0}},
                 'prediction_file': f'/x/validation/{case}.nii.gz',
                 'reference_file': f'/somewhere/gt_segmentations/{case}.nii.gz'}
                for case, (liver, tumour) in cases.items()]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({'foreground_mean': {'Dice': 0.0}, 'mean': {}, 'metric_per_case': per_case}))


def hand_cells(root: Path) -> list:
    cells = []
    for fraction in (0.5, 1.0):
        for fold in (0, 1):
            for role in ('tested', 'baseline'):
                fid = FOLD_IDS[(fold, fraction)]
                folder = root / f'{TRAINERS[role]}__nnUNetPlans__3d_fullres' / f'fold_{fid}'
                if (role, fold, fraction) in DICE:
                    write_summary(folder / 'validation' / 'summary.json', DICE[(role, fold, fraction)])
                cells.append(Cell(role, TRAINERS[role], 'nnUNetPlans', fold, fraction, fid, str(folder)))
    return cells


META = ReportMeta(dataset='Dataset990_Fake', configuration='3d_fullres', tested_trainer='nnUNetTrainerDeSD',
                  tested_plans='nnUNetPlans', baseline_trainer='nnUNetTrainer', baseline_plans='nnUNetPlans',
                  folds=[0, 1], fractions=[0.5, 1.0], seed=12345)


def test_label_keys_follow_nnunets_summary_keys():
    assert label_names({'labels': LABELS}) == {'1': 'liver', '2': 'tumour'}
    regions = {'background': 0, 'whole': [1, 2], 'core': [2], 'ignore': 3}
    assert label_names({'labels': regions}) == {'(1, 2)': 'whole', '(2,)': 'core'}


def test_read_case_dice_adds_the_per_case_foreground_mean(tmp_path):
    write_summary(tmp_path / 's.json', DICE[('baseline', 0, 1.0)])
    cases = read_case_dice(str(tmp_path / 's.json'), {'1': 'liver', '2': 'tumour'})
    assert set(cases) == {'a.nii.gz', 'b.nii.gz'}
    assert math.isnan(cases['a.nii.gz']['tumour']) and cases['a.nii.gz'][FOREGROUND] == pytest.approx(0.80)
    assert cases['b.nii.gz'][FOREGROUND] == pytest.approx((0.70 + 0.50) / 2)


def test_paired_statistics_small_n():
    one = paired_statistics([0.5], [0.7])
    assert one['n_pairs'] == 1 and one['diff_mean'] == pytest.approx(0.2)
    assert one['baseline_sd'] is None and one['diff_sd'] is None and one['wilcoxon_p'] is None
    none = paired_statistics([NAN], [0.7])
    assert none['n_pairs'] == 0 and none['baseline_mean'] is None


def test_report_numbers_by_hand(tmp_path):
    cells = hand_cells(tmp_path / 'results')
    result = write_report(str(tmp_path / 'out'), cells, label_names({'labels': LABELS}), META)
    rows = {(r['fraction'], r['label']): r for r in result['rows']}
    assert list(rows) == [(0.5, 'liver'), (0.5, 'tumour'), (0.5, FOREGROUND),
                          (1.0, 'liver'), (1.0, 'tumour'), (1.0, FOREGROUND)]

    # fraction 1, liver: baseline .80 .70 .60, tested .85 .80 .75 -> differences .05 .10 .15, all positive:
    # exact two-sided Wilcoxon p = 2 * P(W+ = 6) = 2 / 2^3 = 0.25
    liver = rows[(1.0, 'liver')]
    assert liver['n_pairs'] == 3
    assert (liver['baseline_mean'], liver['baseline_sd']) == pytest.approx((0.70, 0.10))
    assert (liver['tested_mean'], liver['tested_sd']) == pytest.approx((0.80, 0.05))
    assert (liver['diff_mean'], liver['diff_sd']) == pytest.approx((0.10, 0.05))
    assert liver['wilcoxon_p'] == pytest.approx(0.25)

    # fraction 1, tumour: case a is NaN for the baseline, so pairs (.50, .42), (.40, .60): differences -.08, +.20;
    # sd of the differences sqrt(2 * .14^2 / 1); W+ = 2 (rank of .20), W- = 1: p = 2 * P(T <= 1) = 2 * 2/4 = 1
    tumour = rows[(1.0, 'tumour')]
    assert tumour['n_pairs'] == 2
    assert (tumour['baseline_mean'], tumour['baseline_sd']) == pytest.approx((0.45, math.sqrt(2 * 0.05 ** 2)))
    assert (tumour['tested_mean'], tumour['tested_sd']) == pytest.approx((0.51, math.sqrt(2 * 0.09 ** 2)))
    assert (tumour['diff_mean'], tumour['diff_sd']) == pytest.approx((0.06, math.sqrt(2 * 0.14 ** 2)))
    assert tumour['wilcoxon_p'] == pytest.approx(1.0)

    # fraction 1, per-case foreground mean: baseline a .80 (tumour NaN left out), b .60, c .50;
    # tested a .575, b .61, c .675; differences -.225, +.01, +.175: W+ = 1 + 2 = 3 = W-, p = 2 * 5/8 -> 1
    fg = rows[(1.0, FOREGROUND)]
    assert fg['n_pairs'] == 3
    assert fg['baseline_mean'] == pytest.approx((0.80 + 0.60 + 0.50) / 3)
    assert fg['tested_mean'] == pytest.approx((0.575 + 0.61 + 0.675) / 3)
    diffs = [-0.225, 0.01, 0.175]
    mean = sum(diffs) / 3
    assert fg['diff_mean'] == pytest.approx(mean)
    assert fg['diff_sd'] == pytest.approx(math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2))
    assert fg['wilcoxon_p'] == pytest.approx(1.0)

    # fraction 0.5: only fold 0 pairs (fold 1's tested run is missing); liver differences .2, .3: p = 2 * 1/4;
    # tumour differences are all 0: no test
    half_liver, half_tumour = rows[(0.5, 'liver')], rows[(0.5, 'tumour')]
    assert half_liver['n_pairs'] == 2 and half_liver['wilcoxon_p'] == pytest.approx(0.5)
    assert (half_liver['diff_mean'], half_liver['diff_sd']) == pytest.approx((0.25, math.sqrt(2 * 0.05 ** 2)))
    assert half_tumour['diff_mean'] == 0 and half_tumour['wilcoxon_p'] is None
    assert [(c.role, c.fold, c.fraction) for c in result['missing']] == [('tested', 1, 0.5)]

    md = Path(result['md']).read_text()
    assert Path(result['md']).name == 'nnUNetTrainerDeSD_vs_nnUNetTrainer__3d_fullres.md'
    assert 'dataset: Dataset990_Fake' in md and 'folds: 0 1' in md and 'subset seed: 12345' in md
    assert 'These are our measurements' in md
    assert '| 1 | liver | 0.7000 ± 0.1000 | 0.8000 ± 0.0500 | +0.1000 ± 0.0500 | 0.25 | 3 |' in md
    assert '| 0.5 | tumour | 0.1500 ± 0.0707 | 0.1500 ± 0.0707 | +0.0000 ± 0.0000 | n/a | 2 |' in md
    assert '- tested: nnUNetTrainerDeSD (nnUNetPlans), fold 1 (nnU-Net fold 6), fraction 0.5' in md

    table = list(csv.DictReader(io.StringIO(Path(result['csv']).read_text())))
    assert [(float(r['fraction']), r['label']) for r in table] == list(rows)
    first = next(r for r in table if r['fraction'] == '1.0' and r['label'] == 'liver')
    assert float(first['diff_mean']) == pytest.approx(0.10) and float(first['wilcoxon_p']) == pytest.approx(0.25)
    assert first['n_pairs'] == '3'
    assert next(r for r in table if r['label'] == 'tumour' and r['fraction'] == '0.5')['wilcoxon_p'] == 'n/a'

    png = Path(result['png'])
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 5000


# ---------------------------------------------------------------- the command, without training

@pytest.fixture
def fake_nnunet(tmp_path, monkeypatch):
    """nnU-Net folders with a planned (fake) Dataset990_Fake; nnunetv2.paths reads them at call time."""
    for key, sub in (('nnUNet_raw', 'raw'), ('nnUNet_preprocessed', 'preprocessed'), ('nnUNet_results', 'results')):
        (tmp_path / sub).mkdir()
        monkeypatch.setenv(key, str(tmp_path / sub))
    pre = fake_preprocessed(tmp_path / 'preprocessed')
    (pre / 'nnUNetPlans.json').write_text(json.dumps({'configurations': {
        '3d_fullres': {'data_identifier': DATA_ID}, '3d_big': {'inherits_from': '3d_fullres'}}}))
    (pre / 'dataset.json').write_text(json.dumps({'labels': LABELS}))
    weights = tmp_path / 'export.pth'
    weights.write_bytes(b'weights')
    return tmp_path, weights


def _cli(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        benchmark.main(list(argv))
    return e.value.code, capsys.readouterr()


def test_bad_inputs_give_one_clear_error(fake_nnunet, capsys):
    tmp, weights = fake_nnunet
    code, out = _cli(capsys, '-d', '991', '--collect-only')
    assert code == 2 and out.err.startswith("desd_benchmark: error: Unknown dataset '991'")
    code, out = _cli(capsys, '-d', '990', '-p', 'nnUNetResEncUNetMPlans', '--collect-only')
    assert code == 2 and 'nnUNetResEncUNetMPlans.json' in out.err and 'not found' in out.err
    code, out = _cli(capsys, '-d', '990', '-w', str(tmp / 'nope.pth'), '--collect-only')
    assert code == 2 and 'nope.pth not found' in out.err
    code, out = _cli(capsys, '-d', '990', '-c', '2d', '--collect-only')
    assert code == 2 and "'2d' is not in" in out.err
    code, out = _cli(capsys, '-d', '990', '--fractions', '0', '--collect-only')
    assert code == 2 and 'fraction must lie in (0, 1]' in out.err
    code, out = _cli(capsys, '-d', '990', '-tr', 'nnUNetTrainer', '--collect-only')
    assert code == 2 and 'share their model folders' in out.err


def test_print_commands_and_collect_only(fake_nnunet, capsys):
    tmp, weights = fake_nnunet
    args = ['-d', '990', '-w', str(weights), '--folds', '0', '1', '--fractions', '0.5', '1.0', '-c', '3d_big']
    benchmark.main(args + ['--collect-only'])  # nothing exists: every cell is missing; no fraction fold is made
    out = capsys.readouterr().out
    assert out.count('fraction 0.5') == 4 and 'Missing cells (8' in out
    assert not (tmp / 'preprocessed' / 'Dataset990_Fake' / SPLITS_FILE).exists()

    # fold 0 at 1.0: tested trained (validate), baseline interrupted (continue); the rest fresh
    results = tmp / 'results' / 'Dataset990_Fake'
    (results / 'nnUNetTrainerDeSD__nnUNetPlans__3d_big' / 'fold_0').mkdir(parents=True)
    (results / 'nnUNetTrainerDeSD__nnUNetPlans__3d_big' / 'fold_0' / 'checkpoint_final.pth').write_bytes(b'')
    (results / 'nnUNetTrainer__nnUNetPlans__3d_big' / 'fold_0').mkdir(parents=True)
    (results / 'nnUNetTrainer__nnUNetPlans__3d_big' / 'fold_0' / 'checkpoint_latest.pth').write_bytes(b'')
    benchmark.main(args + ['--print-commands'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('export nnUNet_extTrainer=') and 'trainers/ext' in lines[0]
    common = 'nnUNetv2_train Dataset990_Fake 3d_big'
    assert lines[1:] == [
        f'{common} 5 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 5 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
        f'{common} 6 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 6 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
        f'{common} 0 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda --val',
        f'{common} 0 -tr nnUNetTrainer -p nnUNetPlans -device cuda --c',
        f'{common} 1 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 1 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
    ]
    assert len(_splits(tmp / 'preprocessed' / 'Dataset990_Fake')) == 7  # the commands' fraction folds exist now

    benchmark.main(args + ['--print-commands', '--only', 'baseline', '--folds', '1', '--fractions', '0.5'])
    assert capsys.readouterr().out.strip().splitlines()[1:] == \
        [f'{common} 6 -tr nnUNetTrainer -p nnUNetPlans -device cuda']


def test_a_run_from_another_export_is_refused(fake_nnunet, capsys):
    tmp, weights = fake_nnunet
    fold = tmp / 'results' / 'Dataset990_Fake' / 'nnUNetTrainerDeSD__nnUNetPlans__3d_fullres' / 'fold_0'
    write_summary(fold / 'validation' / 'summary.json', {'a': (0.5, 0.5)})
    (fold / 'pretrained_weights.json').write_text(json.dumps({'file': '/old/export.pth', 'file_sha256': 'ab' * 32}))
    code, out = _cli(capsys, '-d', '990', '-w', str(weights), '--folds', '0', '--collect-only')
    import hashlib
    assert code == 2 and 'ab' * 32 in out.err and hashlib.sha256(b'weights').hexdigest() in out.err


def test_a_failing_run_reports_its_log(fake_nnunet, capsys, monkeypatch):
    tmp, weights = fake_nnunet
    script = tmp / 'fake_train'
    script.write_text(f'#!{sys.executable}\nimport sys\nprint("\\n".join(f"line {{i}}" for i in range(50)))\n'
                      f'print("RuntimeError: boom", file=sys.stderr)\nsys.exit(3)\n')
    script.chmod(0o755)
    monkeypatch.setattr(benchmark, 'nnunet_train_executable', lambda: str(script))
    code, out = _cli(capsys, '-d', '990', '--folds', '2', '--only', 'tested', '-device', 'cpu')
    log = tmp / 'results' / 'Dataset990_Fake' / 'desd_benchmark' / 'logs' / 'nnUNetTrainerDeSD__fold_2.log'
    assert code == 2 and 'exited with code 3' in out.err and str(log) in out.err
    assert 'RuntimeError: boom' in out.err and 'line 49' in out.err and 'line 5\n' not in out.err
    assert log.read_text().startswith('# ') and f'{script} Dataset990_Fake 3d_fullres 2 -tr nnUNetTrainerDeSD' in \
        log.read_text()
