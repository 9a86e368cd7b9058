"""DMD end to end with the stock commands only (plus desd_preprocess_unlabelled), on a tiny synthetic dataset.

A copy of the planned dataset 901 (conftest's benchmark_workspace) -> desd_preprocess_unlabelled (a good pool, and
one refused for its channels) -> desd_benchmark of nnUNetTrainerDMDTiny against nnUNetTrainerTiny at fraction 0.5
of fold 0 (the DMD run's pool is the left-out half plus the preprocessed pool) -> an interrupted DMD run continued by
desd_benchmark with --c -> nnUNetv2_predict from the DMD model. About 2 minutes on 2 CPU cores.
"""
import csv
import json
import pickle
import shutil
import time
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import run_command
from nnunetv2_desd.data.fractions import fraction_fold_info
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.trainers.dmd import DMD_FILE

pytestmark = pytest.mark.e2e

DATASET, POOL_SOURCE = 'Dataset901_Synthetic', 'Dataset932_Unlabelled'
TESTED, BASELINE = 'nnUNetTrainerDMDTiny', 'nnUNetTrainerTiny'


def test_dmd_preprocess_train_resume_benchmark_predict(benchmark_workspace, tmp_path):
    _, env = benchmark_workspace  # test_finetune_benchmark_e2e may have trained the vanilla cell already: reused
    raw, pre, results = (Path(env[k]) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'))
    write_synthetic_dataset(env['nnUNet_raw'], 932, name='Unlabelled', n_cases=3, shape=(20, 20, 20), seed=7)
    write_synthetic_dataset(env['nnUNet_raw'], 933, name='TwoChannels', n_cases=2, shape=(20, 20, 20), n_channels=2,
                            seed=8)

    # the unlabelled pool: nnU-Net blosc2 cases next to 901's data, no labels, a record of what made them
    run_command(['desd_preprocess_unlabelled', '-d', '901', '-u', '932', '-np', '1'], env)
    pool = pre / DATASET / 'desd_unlabelled' / 'nnUNetPlans_3d_fullres'
    record = json.loads((pool.parent / 'nnUNetPlans_3d_fullres.json').read_text())
    expected_pool = [f'{POOL_SOURCE}__unlabelled_{i:03d}' for i in range(3)]
    assert record['identifiers'] == expected_pool and record['num_channels'] == 1
    assert record['sources'][0]['dataset'] == POOL_SOURCE and record['plans_name'] == 'nnUNetPlans'
    case = pool / expected_pool[0]
    assert blosc2.open(str(case) + '.b2nd').shape == (1, 20, 20, 20)
    assert set(np.unique(blosc2.open(str(case) + '_seg.b2nd')[:])) <= {-1, 0}  # no labels, only the nonzero mask
    assert pickle.loads((pool / (expected_pool[0] + '.pkl')).read_bytes())['class_locations'] == {}

    # a pool whose images have another number of channels is refused, and the good pool stays
    proc = run_command(['desd_preprocess_unlabelled', '-d', '901', '-u', '933', '-np', '1'], env, check=False)
    assert proc.returncode == 2 and 'channel-count mismatch: Dataset933_TwoChannels has 2 channel(s)' in proc.stderr
    assert json.loads((pool.parent / 'nnUNetPlans_3d_fullres.json').read_text()) == record

    # desd_benchmark: DMD vs vanilla at half of fold 0's labels; stock nnUNetv2_train runs each cell
    bench = ['desd_benchmark', '-d', '901', '-tr', TESTED, '--baseline', BASELINE, '--folds', '0',
             '--fractions', '0.5', '-device', 'cpu']
    run_command(bench, env, timeout=900)
    info = fraction_fold_info(str(pre / DATASET), 5)
    assert info['fraction'] == 0.5 and len(info['train']) == 2 and len(info['left_out']) == 2
    fold = results / DATASET / f'{TESTED}__nnUNetPlans__3d_fullres' / 'fold_5'
    dmd = json.loads((fold / DMD_FILE).read_text())
    assert (dmd['labelled_batch_size'], dmd['unlabelled_batch_size'], dmd['planned_batch_size']) == (1, 1, 2)
    assert dmd['lambda'] == 4.0 and dmd['temperature'] == 2.0
    assert dmd['unlabelled_pool']['cases'] == sorted([f'{DATASET}__{c}' for c in info['left_out']] + expected_pool)
    assert not set(info['val']) & {c.split('__')[1] for c in dmd['unlabelled_pool']['cases']}
    checkpoint = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    assert {k.split('.')[0] for k in checkpoint['network_weights']} == {'net1', 'net2'}
    assert checkpoint['trainer_name'] == TESTED
    report = results / DATASET / 'desd_benchmark' / f'{TESTED}_vs_{BASELINE}__3d_fullres.csv'
    rows = list(csv.DictReader(report.open()))
    aggregate = [r for r in rows if r['fold'] == 'all']  # DMD has no scratch twin: one comparison, with vanilla
    assert [(r['comparison'], r['label']) for r in aggregate] == \
        [('tested - baseline', label) for label in ('bone', 'lung', 'foreground mean')]
    baseline_summary = results / DATASET / f'{BASELINE}__nnUNetPlans__3d_fullres' / 'fold_5' / 'validation' / \
        'summary.json'
    baseline_mtime = baseline_summary.stat().st_mtime_ns

    # an interrupted DMD run (checkpoint_latest after epoch 0) is continued by desd_benchmark with stock --c
    checkpoint['current_epoch'] = 1
    torch.save(checkpoint, fold / 'checkpoint_latest.pth')
    (fold / 'checkpoint_final.pth').unlink()
    (fold / 'validation' / 'summary.json').unlink()
    logs_before = set(fold.glob('training_log_*.txt'))
    time.sleep(1)  # nnU-Net names its logs by the second
    proc = run_command(bench, env, timeout=900)
    assert f'continuing tested {TESTED}' in proc.stderr and 'training tested' not in proc.stderr
    assert 'training baseline' not in proc.stderr
    assert (fold / 'checkpoint_final.pth').is_file() and (fold / 'validation' / 'summary.json').is_file()
    assert baseline_summary.stat().st_mtime_ns == baseline_mtime  # the vanilla cell was reused
    new_log = (set(fold.glob('training_log_*.txt')) - logs_before).pop().read_text()
    assert 'Epoch 1' in new_log and 'Epoch 0' not in new_log and 'unlabelled pool: 5 cases' in new_log
    assert torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)['current_epoch'] == 2

    # stock prediction with the DMD model (network 1)
    (tmp_path / 'predict_in').mkdir()
    image = raw / POOL_SOURCE / 'imagesTr' / 'unlabelled_000_0000.nii.gz'
    (tmp_path / 'predict_in' / image.name).write_bytes(image.read_bytes())
    def predict(trainer, out):
        run_command(['nnUNetv2_predict', '-i', tmp_path / 'predict_in', '-o', tmp_path / out, '-d', '901',
                     '-c', '3d_fullres', '-f', '5', '-tr', trainer, '-device', 'cpu', '-npp', '0', '-nps', '0',
                     '--disable_progress_bar', '--save_probabilities'], env)  # 0, 0: nnU-Net predicts in-process
        prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / out / 'unlabelled_000.nii.gz')))
        assert prediction.shape == (20, 20, 20) and set(np.unique(prediction)) <= {0, 1, 2}
        return np.load(tmp_path / out / 'unlabelled_000.npz')['probabilities']

    single = predict(TESTED, 'predict_out')
    # the same trained pair under nnUNetTrainerDMDEnsemble: stock prediction averages both networks' logits
    ensemble_folder = fold.parent.parent / fold.parent.name.replace(TESTED, 'nnUNetTrainerDMDEnsemble') / fold.name
    shutil.copytree(fold, ensemble_folder)
    checkpoint = torch.load(ensemble_folder / 'checkpoint_final.pth', map_location='cpu', weights_only=False)
    checkpoint['trainer_name'] = 'nnUNetTrainerDMDEnsemble'
    torch.save(checkpoint, ensemble_folder / 'checkpoint_final.pth')
    shutil.copy(fold.parent / 'plans.json', ensemble_folder.parent / 'plans.json')
    shutil.copy(fold.parent / 'dataset.json', ensemble_folder.parent / 'dataset.json')
    ensemble = predict('nnUNetTrainerDMDEnsemble', 'predict_ensemble')
    assert ensemble.shape == single.shape and np.allclose(ensemble.sum(0), 1, atol=1e-3)
    assert np.abs(ensemble - single).max() > 1e-3  # not network 1 alone
