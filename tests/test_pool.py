"""Pre-training pools of several datasets: end to end through desd_pretrain, bad and damaged cases, sampling."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.data.planning import PreparedData, PreparedPool
from nnunetv2_desd.data.sources import write_synthetic_dataset

SHAPE = (24, 24, 24)
RUN = 'desd__nnUNetPlans__3d_fullres'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _member(name: str, n: int) -> PreparedData:
    return PreparedData(name, 'P', '3d_fullres', {}, {}, f'/x/{name}', [f'c{i}' for i in range(n)], name)


def test_sampling_is_uniform_over_cases_unless_datasets_are_weighted():
    pool = PreparedPool([_member('Dataset001_A', 1), _member('Dataset002_B', 3)])
    keys = sorted(pool.cases())
    assert keys[0] == 'Dataset001_A__c0' and len(keys) == 4
    assert pool.sampling_probabilities(keys) is None  # nnU-Net's loader: every case equally likely
    pool.dataset_weights = [3.0, 1.0]
    p = dict(zip(keys, pool.sampling_probabilities(keys)))
    # dataset A gets 3/4 of the draws, all on its one case; B's 1/4 is shared by its three cases
    assert p['Dataset001_A__c0'] == pytest.approx(0.75)
    assert [p[f'Dataset002_B__c{i}'] for i in range(3)] == pytest.approx([1 / 12] * 3)


@pytest.mark.e2e
def test_a_pool_of_three_datasets_pretrains_one_encoder(tmp_path):
    env = nnunet_env(tmp_path)
    a = write_synthetic_dataset(env['nnUNet_raw'], 940, name='PoolA', n_cases=3, shape=SHAPE)
    b = write_synthetic_dataset(env['nnUNet_raw'], 941, name='PoolB', n_cases=2, shape=(28, 24, 20), seed=1)
    c = write_synthetic_dataset(env['nnUNet_raw'], 942, name='PoolC', n_cases=2, shape=SHAPE, seed=2, labelled=True)
    proc = run_command(['desd_pretrain', '-d', '940', b, '942', '--dataset-weights', '1', '1', '2',
                        '--epochs', '1', '--iters-per-epoch', '2', *TINY], env)

    out = tmp_path / 'results' / a / (RUN + '__pool_941_942')
    export = _load(out / 'pretrained_export.pth')
    pool = export['desd_export']['pool']
    assert [(d['dataset'], d['cases'], d['weight']) for d in pool] == [(a, 3, 1.0), (b, 2, 1.0), (c, 2, 2.0)]
    assert export['nnssl_adaptation_plan']['pretrain_plan']['dataset_name'] == f'{a}+{b}+{c}'
    log = next(out.glob('training_log_*.txt')).read_text()
    assert f'{c} 2 cases (weight 2)' in log

    # every dataset was prepared with the first one's plans: the same preprocessing, under a copied name
    pre = tmp_path / 'preprocessed'
    plans_a = json.loads((pre / a / 'nnUNetPlans.json').read_text())
    for other in (b, c):
        plans = json.loads((pre / other / 'nnUNetPlans_from940.json').read_text())
        for key in ('spacing', 'normalization_schemes'):
            assert plans['configurations']['3d_fullres'][key] == plans_a['configurations']['3d_fullres'][key]
        assert plans['foreground_intensity_properties_per_channel'] == \
            plans_a['foreground_intensity_properties_per_channel']
        cases = sorted(p.stem for p in (pre / other / 'nnUNetPlans_from940_3d_fullres').glob('*.pkl'))
        assert len(cases) == 2
    assert 'Preparing' in proc.stderr

    # --init from the pool's export, with the same pool: starts from its encoder
    proc = run_command(['desd_pretrain', '-d', '940', '941', '942', '--init', out / 'pretrained_export.pth',
                        '--epochs', '1', '--iters-per-epoch', '1', '--overwrite', *TINY], env)
    assert 'Preparing' not in proc.stderr  # everything was prepared already
    assert 'encoder initialised from' in next(out.glob('training_log_*.txt')).read_text() or \
        'encoder initialised from' in proc.stdout + proc.stderr


@pytest.mark.e2e
def test_bad_cases_of_every_dataset_are_named_together_then_left_out_on_request(tmp_path):
    env = nnunet_env(tmp_path)
    a = write_synthetic_dataset(env['nnUNet_raw'], 943, name='BadA', n_cases=3, shape=SHAPE)
    b = write_synthetic_dataset(env['nnUNet_raw'], 944, name='BadB', n_cases=3, shape=SHAPE, seed=1)
    broken = [tmp_path / 'raw' / a / 'imagesTr' / 'bada_001_0000.nii.gz',
              tmp_path / 'raw' / b / 'imagesTr' / 'badb_000_0000.nii.gz',
              tmp_path / 'raw' / b / 'imagesTr' / 'badb_002_0000.nii.gz']
    for f in broken:
        f.write_bytes(f.read_bytes()[:200])
    args = ['desd_pretrain', '-d', '943', '944', '--epochs', '1', '--iters-per-epoch', '1', *TINY]
    proc = run_command(args, env, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    message = proc.stderr.strip().splitlines()[-1]
    assert f'1 of 3 cases of {a}' in message and f'2 of 3 cases of {b}' in message
    for case in ('bada_001', 'badb_000', 'badb_002'):
        assert case in message
    for case in ('bada_000', 'bada_002', 'badb_001'):
        assert case + ':' not in message
    assert '--exclude-bad-cases' in message

    proc = run_command(args + ['--exclude-bad-cases'], env)
    assert 'Checking images' not in proc.stderr  # no image is read again
    out = tmp_path / 'results' / a / (RUN + '__pool_944')
    pool = _load(out / 'pretrained_export.pth')['desd_export']['pool']
    assert [(d['cases'], d['excluded_cases']) for d in pool] == [(2, ['bada_001']), (1, ['badb_000', 'badb_002'])]
    assert 'bad cases left out: badb_000, badb_002' in next(out.glob('training_log_*.txt')).read_text()


@pytest.mark.e2e
def test_a_damaged_prepared_case_is_named_with_the_command_that_repairs_it(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 945, name='Damaged', n_cases=2, shape=SHAPE)
    run_command(['desd_pretrain', '-d', '945', '--preprocess-only', '-np', '1', '-device', 'cpu'], env)
    folder = tmp_path / 'preprocessed' / name / 'nnUNetPlans_3d_fullres'
    victim = folder / 'damaged_000.b2nd'
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # a disk error, an old interrupted write

    train = ['desd_pretrain', '-d', '945', '--epochs', '1', '--iters-per-epoch', '4', *TINY[:-6], '--num-workers', '1',
             '-np', '1', '--batch-size', '2']
    proc = run_command(train, env, check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr + proc.stdout, proc.stderr[-2000:]
    message = proc.stderr.strip().splitlines()[-1]
    assert 'damaged_000' in message and 'damaged' in message
    repair = message.split('Prepare it again: ', 1)[1]
    assert repair.startswith(f'rm {folder / "damaged_000.pkl"} && desd_pretrain -d 945')

    for step in repair.split(' && '):  # the named command, as a user would run it
        words = step.split()
        if words[0] == 'rm':
            Path(words[1]).unlink()
        else:
            run_command(words, env)
    with open(folder / 'damaged_000.pkl', 'rb') as f:
        assert pickle.load(f)['class_locations'] is not None
    import blosc2
    assert np.isfinite(blosc2.open(str(victim), mode='r')[:]).all()
    run_command(train, env)
