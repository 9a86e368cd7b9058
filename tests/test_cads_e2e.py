"""CADS end to end: DRRs, packed masking and the cross-modal loss through desd_pretrain, resume, fine-tuning."""
import json

import numpy as np
import pytest
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.data.sources import write_chest_ct_datasets, write_synthetic_dataset
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE, with_ext_trainers

pytestmark = pytest.mark.e2e

# the masked view (32 x 16 x 16) must reach the deepest stage with more than one voxel
CADS_TINY = ['-m', 'cads', *TINY, '--patch-size', '32', '32', '32', '--freeze-last-layer-epochs', '1',
             '--warmup-teacher-temp-epochs', '1', '--warmup-epochs', '1']


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def test_generated_ct_pretrains_and_resume_restores_the_centre(tmp_path, monkeypatch):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 910, n_cases=3, shape=(32, 32, 32))
    run_command(['desd_pretrain', '-d', '910', '--epochs', '2', '--iters-per-epoch', '2', *CADS_TINY], env)
    out = tmp_path / 'results' / name / 'cads__nnUNetPlans__3d_fullres'
    meta = _load(out / 'pretrained_export.pth')['desd_export']
    assert meta['method'] == 'cads' and meta['method_settings'] == {'mask_ratio': 0.75, 'mask_patch': [4, 8, 8]}
    data = tmp_path / 'preprocessed' / name / 'nnUNetPlans_3d_fullres'
    drrs = sorted(data.glob('*_drr_lateral_linear.npy'))
    assert len(drrs) == 3
    log = next(out.glob('training_log_*.txt')).read_text()
    assert 'epoch 2/2' in log and 'weight_decay' in log
    checkpoint = _load(out / 'checkpoint_latest.pth')
    assert checkpoint['config']['optimizer'] == 'adamw' and checkpoint['config']['clip_grad'] == 0.3
    assert checkpoint['loss']['center'].abs().sum() > 0

    # in-process resume: the centre, weights and step come back, and the next step is the same as without a stop
    for key, value in env.items():
        if key.startswith('nnUNet'):
            monkeypatch.setenv(key, value)
    from nnunetv2_desd.cli.pretrain import parse_config
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    from nnunetv2_desd.pretraining.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer
    cfg, _ = parse_config(['-d', '910', '--epochs', '3', '--iters-per-epoch', '2', '--allow-schedule-change',
                           *CADS_TINY])
    ctx = init_distributed('cpu')
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    loaded = Pretrainer(cfg, prepared, ctx, str(tmp_path / 'loaded'))
    loaded.load_checkpoint(str(out / 'checkpoint_latest.pth'))
    assert torch.equal(loaded.loss.center, checkpoint['loss']['center']) and loaded.step == checkpoint['step'] == 4

    # against an uninterrupted run: it takes 3 steps; a fresh trainer that loads its checkpoint after step 2 takes the
    # third step exactly as it does (masking and augmentation draw from the restored RNG)
    loader = build_view_loader(prepared, loaded.patch_size, 2, 0, drr_files=prepared.drr_files)
    batches = [next(loader) for _ in range(3)]
    assert batches[0]['drr'].shape == (2, 1, 32, 32, 1)
    torch.manual_seed(0)
    uninterrupted = Pretrainer(cfg, prepared, ctx, str(tmp_path / 'uninterrupted'))
    for batch in batches[:2]:
        uninterrupted.train_step(batch)
    uninterrupted.save_checkpoint('checkpoint_latest.pth')
    loss_uninterrupted = uninterrupted.train_step(batches[2])
    torch.manual_seed(123)  # the resumed run starts from another seed: only the checkpoint can make it match
    resumed = Pretrainer(cfg, prepared, ctx, str(tmp_path / 'resumed'))
    resumed.load_checkpoint(str(tmp_path / 'uninterrupted' / 'checkpoint_latest.pth'))
    loss_resumed = resumed.train_step(batches[2])
    assert torch.equal(loss_resumed, loss_uninterrupted)
    assert torch.equal(resumed.loss.center, uninterrupted.loss.center)
    for (name, a), b in zip(uninterrupted.network.state_dict().items(), resumed.network.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(uninterrupted.teacher.state_dict().items(), resumed.teacher.state_dict().values()):
        assert torch.equal(a, b), name


def test_non_ct_dataset_is_refused_before_anything_is_written(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 911, n_cases=2, shape=(16, 16, 16), channel_name='MR')
    proc = run_command(['desd_pretrain', '-d', '911', '--epochs', '1', '--iters-per-epoch', '1', *CADS_TINY], env,
                       check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith('desd_pretrain: error:') and 'CT' in error and 'MR' in error
    assert not (tmp_path / 'preprocessed' / name).exists() or not any((tmp_path / 'preprocessed' / name).iterdir())


def test_real_chest_ct_pretrains_and_fine_tunes_with_stock_nnunet(tmp_path):
    """Crops of the bundled real chest CT: CADS with the labelled dataset's plans, then nnUNetTrainerCADS."""
    env = with_ext_trainers(nnunet_env(tmp_path))
    pool, labelled = write_chest_ct_datasets(env['nnUNet_raw'], n_unlabelled=2, n_labelled=5,
                                             crop_size_mm=(96, 96, 96))
    run_command(['nnUNetv2_plan_and_preprocess', '-d', '501', '-c', '3d_fullres', '-npfp', '1', '-np', '1'], env)
    run_command(['desd_pretrain', '-d', '500', '--plans-from', '501', '--epochs', '1', '--iters-per-epoch', '2',
                 *CADS_TINY], env)
    export = tmp_path / 'results' / pool / 'cads__nnUNetPlans_from501__3d_fullres' / 'pretrained_export.pth'
    drr = np.load(next((tmp_path / 'preprocessed' / pool).glob('*/*_drr_lateral_linear.npy')))
    assert drr.min() == -1 and drr.max() == 1 and sorted(drr.shape)[:2] == [1, 1]

    run_command(['nnUNetv2_train', '501', '3d_fullres', '0', '-tr', 'nnUNetTrainerCADSTiny', '-device', 'cpu',
                 '-pretrained_weights', export], env)
    fold = tmp_path / 'results' / labelled / 'nnUNetTrainerCADSTiny__nnUNetPlans__3d_fullres' / 'fold_0'
    provenance = json.loads((fold / PROVENANCE_FILE).read_text())
    assert provenance['method'] == 'cads' and provenance['file'] == str(export)
    assert (fold / 'checkpoint_final.pth').exists() and (fold / 'validation' / 'summary.json').exists()
