"""desd_benchmark without training: fraction folds in splits_final.json, the paired report, the CLI's decisions."""
import csv
import hashlib
import io
import json
import math
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

from nnunetv2_desd.cli import benchmark as benchmark_cli
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.evaluation import benchmark
from nnunetv2_desd.data.fractions import (REGISTRY_FILE, SPLITS_FILE, find_fraction_fold, fraction_fold,
                                          fraction_fold_info, subset_size)
from nnunetv2_desd.evaluation.report import (FOREGROUND, BenchmarkCell, ReportMeta, bootstrap_ci, label_names,
                                             paired_case_values, read_case_dice, signed_rank_test, write_report)

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
    from nnunetv2.utilities.crossval_split import generate_crossval_split  # here: it imports sklearn (seconds)
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
    # 12 cases in 5 folds: the first two folds validate on 3, so fold 1 trains on 9
    assert len(standard[1]['train']) == 9
    ids = {f: fraction_fold(str(pre), data, 1, f) for f in (0.25, 0.5, 0.75)}
    assert sorted(ids.values()) == [5, 6, 7]
    splits = _splits(pre)
    assert splits[:5] == standard  # standard entries untouched
    subsets = {f: splits[i]['train'] for f, i in ids.items()}
    assert {f: len(subset) for f, subset in subsets.items()} == {0.25: 3, 0.5: 5, 0.75: 7}  # ceil(2.25, 4.5, 6.75)
    for f, subset in subsets.items():
        assert set(subset) <= set(standard[1]['train'])
        assert splits[ids[f]]['val'] == standard[1]['val']
    assert set(subsets[0.25]) < set(subsets[0.5]) < set(subsets[0.75])
    registry = json.loads((pre / REGISTRY_FILE).read_text())
    assert registry[str(ids[0.5])] == {'base_fold': 1, 'fraction': 0.5, 'seed': 12345, 'n_train': 5}

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


def test_subset_sizes_on_awkward_counts():
    # max(1, ceil(f n)): 0.5 of 11 is 6 and of 9 is 5 (banker's rounding gave 4 for 4.5)
    assert [subset_size(0.5, n) for n in (1, 2, 9, 11)] == [1, 1, 5, 6]
    assert subset_size(0.3, 10) == 3  # 0.3 * 10 is 3.0000000000000004 in floating point
    assert subset_size(0.1, 8) == 1 and subset_size(0.01, 3) == 1 and subset_size(0.7, 10) == 7
    assert subset_size(1 / 3, 9) == 3 and subset_size(0.34, 9) == 4 and subset_size(1.0, 7) == 7


def test_old_rounding_entries_are_not_reused_for_the_new_size(tmp_path):
    pre = fake_preprocessed(tmp_path)
    first = fraction_fold(str(pre), str(pre / DATA_ID), 1, 0.5)
    registry = json.loads((pre / REGISTRY_FILE).read_text())
    registry[str(first)]['n_train'] = 4  # as round(4.5) recorded it before
    (pre / REGISTRY_FILE).write_text(json.dumps(registry))
    again = fraction_fold(str(pre), str(pre / DATA_ID), 1, 0.5)
    assert again == first + 1 and len(_splits(pre)[again]['train']) == 5


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
# (role, fraction, fold, subset seed) -> {case: (liver Dice, tumour Dice)}
DICE = {
    ('baseline', 1.0, 0, None): {'a': (0.80, NAN), 'b': (0.70, 0.50)},
    ('tested', 1.0, 0, None): {'a': (0.85, 0.30), 'b': (0.80, 0.42)},
    ('scratch', 1.0, 0, None): {'a': (0.80, 0.30), 'b': (0.80, 0.42)},
    ('baseline', 1.0, 1, None): {'c': (0.60, 0.40)},
    ('tested', 1.0, 1, None): {'c': (0.75, 0.60)},
    ('scratch', 1.0, 1, None): {'c': (0.75, 0.60)},
    ('baseline', 0.5, 0, 7): {'a': (0.50, 0.10), 'b': (0.60, 0.20)},
    ('tested', 0.5, 0, 7): {'a': (0.70, 0.10), 'b': (0.90, 0.20)},
    ('scratch', 0.5, 0, 7): {'a': (0.60, 0.10), 'b': (0.70, 0.20)},
    ('baseline', 0.5, 1, 7): {'c': (0.10, 0.10)},
    ('tested', 0.5, 1, 7): {'c': (0.10, 0.10)},  # a zero difference
    ('baseline', 0.5, 0, 8): {'a': (0.40, 0.30), 'b': (0.40, 0.30)},
    ('tested', 0.5, 0, 8): {'a': (0.50, 0.30), 'b': (0.50, 0.30)},
    ('baseline', 0.5, 1, 8): {'c': (0.30, 0.30)},  # its tested partner is missing: this unit drops out
}
FOLD_IDS = {(1.0, 0, None): 0, (1.0, 1, None): 1, (0.5, 0, 7): 5, (0.5, 1, 7): 6, (0.5, 0, 8): 7, (0.5, 1, 8): 8}
TRAINERS = {'baseline': 'nnUNetTrainer', 'tested': 'nnUNetTrainerDeSD', 'scratch': 'nnUNetTrainerDeSD_scratch'}


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
    for (fraction, fold, seed), fid in FOLD_IDS.items():
        for role in ('tested', 'scratch', 'baseline'):
            folder = root / f'{TRAINERS[role]}__nnUNetPlans__3d_fullres' / f'fold_{fid}'
            if (role, fraction, fold, seed) in DICE:
                write_summary(folder / 'validation' / 'summary.json', DICE[(role, fraction, fold, seed)])
            cells.append(BenchmarkCell(role, TRAINERS[role], 'nnUNetPlans', fold, fraction, fid, str(folder), seed))
    return cells


META = ReportMeta(dataset='Dataset990_Fake', configuration='3d_fullres', trainers=TRAINERS,
                  plans={r: 'nnUNetPlans' for r in TRAINERS}, folds=[0, 1], fractions=[0.5, 1.0], seeds=[7, 8],
                  subset_sizes={0.5: 'fold 0: 1 of 2, fold 1: 1 of 1'})


def test_label_keys_follow_nnunets_summary_keys():
    assert label_names({'labels': LABELS}) == {'1': 'liver', '2': 'tumour'}
    regions = {'background': 0, 'whole': [1, 2], 'core': [2], 'ignore': 3}
    assert label_names({'labels': regions}) == {'(1, 2)': 'whole', '(2,)': 'core'}


def test_the_foreground_mean_averages_the_labels_both_sides_have(tmp_path):
    write_summary(tmp_path / 's.json', DICE[('baseline', 1.0, 0, None)])
    cases = read_case_dice(str(tmp_path / 's.json'), {'1': 'liver', '2': 'tumour'})
    assert set(cases) == {'a.nii.gz', 'b.nii.gz'} and math.isnan(cases['a.nii.gz']['tumour'])
    tested = {'liver': 0.85, 'tumour': 0.30}
    # the baseline has no tumour Dice for case a: both sides are averaged over liver only
    assert paired_case_values(tested, cases['a.nii.gz'], FOREGROUND) == pytest.approx((0.85, 0.80))
    assert paired_case_values(tested, cases['b.nii.gz'], FOREGROUND) == pytest.approx((0.575, 0.60))
    assert paired_case_values(tested, cases['a.nii.gz'], 'tumour') is None
    assert paired_case_values({'liver': NAN}, {'liver': NAN}, FOREGROUND) is None


def test_bootstrap_interval_on_small_tables_by_hand():
    # two units a < b: resample means are a (1/4), (a+b)/2 (1/2), b (1/4): the 2.5% and 97.5% quantiles are a and b
    assert bootstrap_ci([0.075, 0.15]) == pytest.approx((0.075, 0.15))
    # [0, 0, 3]: P(mean 0) = 8/27 > 2.5%, P(mean 3) = 1/27 = 3.7% > 2.5%: the interval is [0, 3]
    assert bootstrap_ci([0.0, 0.0, 3.0]) == pytest.approx((0.0, 3.0))
    # a zero among three: [0, .1, .25] -> P(mean 0) = P(mean .25) = 1/27: [0, .25]
    assert bootstrap_ci([0.25, 0.0, 0.10]) == pytest.approx((0.0, 0.25))
    assert bootstrap_ci([0.2, 0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    assert bootstrap_ci([0.3]) is None and bootstrap_ci([]) is None
    # many units: the interval narrows around the mean as 1.96 sd / sqrt(n) (normal theory, independent formula)
    x = [0.0, 1.0] * 200
    low, high = bootstrap_ci(x)
    half = 1.96 * 0.5 / math.sqrt(len(x))
    assert low == pytest.approx(0.5 - half, abs=0.01) and high == pytest.approx(0.5 + half, abs=0.01)


def test_signed_rank_test_by_hand_with_zeros():
    # zeros are dropped and not counted: [0, 1, 2, -3, 4, 5] -> n = 5, W- = 3; subsets of ranks 1..5 with sum <= 3:
    # {}, {1}, {2}, {3}, {1, 2}: p = 2 * 5/32
    assert signed_rank_test([0, 1, 2, -3, 4, 5]) == (pytest.approx(10 / 32), 5)
    assert signed_rank_test([0.25, 0.0, 0.10]) == (pytest.approx(0.5), 2)  # both positive: 2 * 1/4
    assert signed_rank_test([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])[0] == pytest.approx(2 / 64)  # the smallest p at n = 6
    assert signed_rank_test([0.0, 0.0]) == (None, 0)


def test_report_numbers_by_hand(tmp_path):
    cells = hand_cells(tmp_path / 'results')
    result = write_report(str(tmp_path / 'out'), cells, label_names({'labels': LABELS}), META)
    rows = {(r['comparison'], r['fraction'], r['label']): r for r in result['rows']}
    vanilla, scratch = 'tested - baseline', 'tested - scratch'
    assert list(rows) == [(c, f, label) for c in (scratch, vanilla) for f in (0.5, 1.0)
                          for label in ('liver', 'tumour', FOREGROUND)]

    # fraction 1, liver, tested - vanilla: unit fold 0 = mean(.05, .10) = .075, unit fold 1 = .15
    liver = rows[(vanilla, 1.0, 'liver')]
    assert (liver['n_units'], liver['n_nonzero'], liver['n_cases']) == (2, 2, 3)
    assert liver['tested_mean'] == pytest.approx((0.825 + 0.75) / 2)
    assert liver['other_mean'] == pytest.approx((0.75 + 0.60) / 2)
    assert liver['diff_mean'] == pytest.approx(0.1125) and liver['diff_sd'] == pytest.approx(0.075 / math.sqrt(2))
    assert (liver['ci_low'], liver['ci_high']) == pytest.approx((0.075, 0.15))
    assert liver['wilcoxon_p'] == pytest.approx(0.5)  # two positive differences: 2 * 1/4

    # tumour: case a has no baseline Dice; units -.08 (fold 0, case b) and +.20: W+ = 2, W- = 1, p = 1
    tumour = rows[(vanilla, 1.0, 'tumour')]
    assert (tumour['n_units'], tumour['n_cases']) == (2, 2) and tumour['diff_mean'] == pytest.approx(0.06)
    assert tumour['wilcoxon_p'] == pytest.approx(1.0)

    # foreground over shared labels: fold 0: a .85 - .80 (liver only), b .61 - .60 -> .03; fold 1: .675 - .50
    fg = rows[(vanilla, 1.0, FOREGROUND)]
    assert fg['diff_mean'] == pytest.approx((0.03 + 0.175) / 2)
    assert fg['tested_mean'] == pytest.approx(((0.85 + 0.61) / 2 + 0.675) / 2)

    # fraction 0.5: units (fold 0, seed 7) .25, (fold 1, seed 7) 0, (fold 0, seed 8) .10; (fold 1, seed 8) missing
    half = rows[(vanilla, 0.5, 'liver')]
    assert (half['n_units'], half['n_nonzero'], half['n_cases']) == (3, 2, 5)
    assert half['diff_mean'] == pytest.approx(0.35 / 3)
    assert (half['ci_low'], half['ci_high']) == pytest.approx((0.0, 0.25))
    assert half['wilcoxon_p'] == pytest.approx(0.5)
    flat = rows[(vanilla, 0.5, 'tumour')]
    assert flat['diff_mean'] == 0 and flat['wilcoxon_p'] is None and flat['n_nonzero'] == 0

    # tested - scratch: fraction 1 liver units .025 and 0; fraction 0.5 only (fold 0, seed 7): .15, no interval
    assert rows[(scratch, 1.0, 'liver')]['diff_mean'] == pytest.approx(0.0125)
    assert rows[(scratch, 1.0, 'liver')]['n_nonzero'] == 1
    one = rows[(scratch, 0.5, 'liver')]
    assert one['n_units'] == 1 and one['diff_mean'] == pytest.approx(0.15) and one['ci_low'] is None
    missing = {(c.role, c.fold, c.seed) for c in result['missing']}
    assert missing == {('tested', 1, 8), ('scratch', 1, 7), ('scratch', 0, 8), ('scratch', 1, 8)}

    units = [(u['comparison'], u['fraction'], u['fold'], u['seed'], round(u['diff_mean'], 6))
             for u in result['unit_rows'] if u['label'] == 'liver']
    assert (vanilla, 0.5, 1, 7, 0.0) in units and (vanilla, 1.0, 0, None, 0.075) in units

    md = Path(result['md']).read_text()
    assert Path(result['md']).name == 'nnUNetTrainerDeSD_vs_nnUNetTrainer__3d_fullres.md'
    assert 'subset seeds: 7 8' in md and 'fraction 0.5: max(1, ceil(0.5 n))' in md
    assert 'These are our measurements' in md
    assert '| 1 | liver | 0.7875 | 0.6750 | +0.1125 | [+0.0750, +0.1500] | 0.5 | 2 / 2 / 3 |' in md
    assert '## nnUNetTrainerDeSD − nnUNetTrainerDeSD_scratch (same schedule from scratch)' in md
    assert 'Fraction 0.5: 2 non-zero unit differences; the smallest p the Wilcoxon test can give is 2^(1 − n) = 0.5' in md
    assert '| tested - baseline | 0.5 | 1 | 7 |' in md  # the per-fold-and-seed table
    assert '- tested: nnUNetTrainerDeSD (nnUNetPlans), fold 1 (nnU-Net fold 8), fraction 0.5, subset seed 8' in md

    table = list(csv.DictReader(io.StringIO(Path(result['csv']).read_text())))
    aggregate = [r for r in table if r['fold'] == 'all']
    assert [(r['comparison'], float(r['fraction']), r['label']) for r in aggregate] == list(rows)
    first = next(r for r in aggregate
                 if r['comparison'] == vanilla and r['fraction'] == '1.0' and r['label'] == 'liver')
    assert float(first['ci_low']) == pytest.approx(0.075) and first['n_nonzero'] == '2'
    per_unit = [r for r in table if r['fold'] != 'all']
    assert len(per_unit) == len(result['unit_rows']) and all(r['wilcoxon_p'] == 'n/a' for r in per_unit)
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
        benchmark_cli.main(list(argv))
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
    benchmark_cli.main(args + ['--collect-only'])  # nothing exists: every cell is missing; no fraction fold is made
    out = capsys.readouterr().out
    assert out.count('fraction 0.5') == 6 and 'Missing cells (12' in out  # tested, its scratch twin, vanilla
    assert not (tmp / 'preprocessed' / 'Dataset990_Fake' / SPLITS_FILE).exists()

    # fold 0 at 1.0: tested trained (validate), baseline interrupted (continue); the rest fresh
    results = tmp / 'results' / 'Dataset990_Fake'
    (results / 'nnUNetTrainerDeSD__nnUNetPlans__3d_big' / 'fold_0').mkdir(parents=True)
    (results / 'nnUNetTrainerDeSD__nnUNetPlans__3d_big' / 'fold_0' / 'checkpoint_final.pth').write_bytes(b'')
    (results / 'nnUNetTrainer__nnUNetPlans__3d_big' / 'fold_0').mkdir(parents=True)
    (results / 'nnUNetTrainer__nnUNetPlans__3d_big' / 'fold_0' / 'checkpoint_latest.pth').write_bytes(b'')
    benchmark_cli.main(args + ['--print-commands'])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith('export nnUNet_extTrainer=') and 'trainers/ext' in lines[0]
    common = 'nnUNetv2_train Dataset990_Fake 3d_big'
    scratch = 'nnUNetTrainerDeSD_scratch'
    assert lines[1:] == [
        f'{common} 5 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 5 -tr {scratch} -p nnUNetPlans -device cuda',
        f'{common} 5 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
        f'{common} 6 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 6 -tr {scratch} -p nnUNetPlans -device cuda',
        f'{common} 6 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
        f'{common} 0 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda --val',
        f'{common} 0 -tr {scratch} -p nnUNetPlans -device cuda',
        f'{common} 0 -tr nnUNetTrainer -p nnUNetPlans -device cuda --c',
        f'{common} 1 -tr nnUNetTrainerDeSD -p nnUNetPlans -device cuda -pretrained_weights {weights}',
        f'{common} 1 -tr {scratch} -p nnUNetPlans -device cuda',
        f'{common} 1 -tr nnUNetTrainer -p nnUNetPlans -device cuda',
    ]
    assert len(_splits(tmp / 'preprocessed' / 'Dataset990_Fake')) == 7  # the commands' fraction folds exist now

    # three subset seeds: fraction 0.5 gets one fold per seed and fold, fraction 1 keeps its single subset
    benchmark_cli.main(args + ['--print-commands', '--only', 'tested', '--subset-seeds', '3'])
    folds = [line.split()[3] for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert folds == ['5', '6', '7', '8', '9', '10', '0', '1']
    assert len(_splits(tmp / 'preprocessed' / 'Dataset990_Fake')) == 11

    benchmark_cli.main(args + ['--print-commands', '--only', 'baseline', '--folds', '1', '--fractions', '0.5'])
    assert capsys.readouterr().out.strip().splitlines()[1:] == \
        [f'{common} 6 -tr nnUNetTrainer -p nnUNetPlans -device cuda']


def test_a_run_from_another_export_is_refused(fake_nnunet, capsys):
    tmp, weights = fake_nnunet
    fold = tmp / 'results' / 'Dataset990_Fake' / 'nnUNetTrainerDeSD__nnUNetPlans__3d_fullres' / 'fold_0'
    write_summary(fold / 'validation' / 'summary.json', {'a': (0.5, 0.5)})
    (fold / 'pretrained_weights.json').write_text(json.dumps({'file': '/old/export.pth', 'file_sha256': 'ab' * 32}))
    code, out = _cli(capsys, '-d', '990', '-w', str(weights), '--folds', '0', '--collect-only')
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
