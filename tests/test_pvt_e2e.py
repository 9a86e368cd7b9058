"""PVT-UNet end to end: desd_plan_pvt -> desd_pretrain -m cads -p nnUNetPlans_pvt -> stock nnUNetv2_train with the
export -> stock nnUNetv2_predict, on a tiny synthetic CT with tiny PVT widths."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.common.checkpoint import load_checkpoint
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE, with_ext_trainers

pytestmark = pytest.mark.e2e

TINY_PVT = ['--embed-dims', '16', '32', '48', '64', '--depths', '1', '1', '1', '1', '--num-heads', '1', '2', '3', '4',
            '--conv-features', '8', '16']
# the packed masked view (32 x 16 x 16) and the DRR (32 x 32 x 1) reach the deepest stage as 2 x 1 x 1
CADS_TINY = ['-m', 'cads', *TINY, '--patch-size', '32', '32', '32', '--freeze-last-layer-epochs', '1',
             '--warmup-teacher-temp-epochs', '1', '--warmup-epochs', '1']


def test_cads_on_pvt_unet_fine_tunes_and_predicts_with_stock_nnunet(tmp_path):
    env = with_ext_trainers(nnunet_env(tmp_path))
    name = write_synthetic_dataset(env['nnUNet_raw'], 920, n_cases=5, shape=(32, 32, 32), labelled=True)
    run_command(['desd_plan_pvt', '-d', '920', *TINY_PVT,
                 '--patch-size', '16', '32', '32', '--batch-size', '2'], env)
    plans = json.loads((tmp_path / 'preprocessed' / name / 'nnUNetPlans_pvt.json').read_text())
    stock = json.loads((tmp_path / 'preprocessed' / name / 'nnUNetPlans.json').read_text())
    cfg = plans['configurations']['3d_fullres']
    assert list(plans['configurations']) == ['3d_fullres']
    assert cfg['architecture']['network_class_name'] == 'nnunetv2_desd.architectures.pvt_unet.PVTUNet'
    assert cfg['architecture']['arch_kwargs']['features_per_stage'] == [8, 16, 16, 32, 48, 64]
    assert cfg['patch_size'] == [16, 32, 32] and cfg['batch_size'] == 2
    assert cfg['data_identifier'] == stock['configurations']['3d_fullres']['data_identifier']  # data shared
    assert cfg['spacing'] == stock['configurations']['3d_fullres']['spacing']
    assert plans['desd_pvt']['planned_batch_size'] >= 2

    run_command(['desd_pretrain', '-d', '920', '-p', 'nnUNetPlans_pvt', '--epochs', '1', '--iters-per-epoch', '2',
                 *CADS_TINY], env)
    export = tmp_path / 'results' / name / 'cads__nnUNetPlans_pvt__3d_fullres' / 'pretrained_export.pth'
    exported = load_checkpoint(str(export))  # our files load with weights_only=True
    assert exported['desd_export']['architecture']['network_class_name'].endswith('PVTUNet')
    drr_keys = [k for k in exported['network_weights'] if k.startswith('encoder.drr_path.')]
    assert drr_keys

    run_command(['nnUNetv2_train', '920', '3d_fullres', '0', '-tr', 'nnUNetTrainerCADSTiny', '-p', 'nnUNetPlans_pvt',
                 '-device', 'cpu', '-pretrained_weights', export], env)
    fold = tmp_path / 'results' / name / 'nnUNetTrainerCADSTiny__nnUNetPlans_pvt__3d_fullres' / 'fold_0'
    provenance = json.loads((fold / PROVENANCE_FILE).read_text())
    assert provenance['method'] == 'cads' and provenance['recipe']['optimizer'] == 'adamw'
    assert provenance['loaded_encoder_tensors'] == provenance['encoder_tensors'] > 0
    # nnU-Net's own checkpoint holds numpy scalars: only it needs weights_only=False
    final = torch.load(fold / 'checkpoint_final.pth', map_location='cpu', weights_only=False)['network_weights']
    # the 2D path is frozen in segmentation: it still holds exactly the CADS-trained radiograph embeddings
    assert all(torch.equal(final[k], exported['network_weights'][k]) for k in drr_keys)
    stem = 'encoder.stages.0.convs.0.conv.weight'
    assert not torch.equal(final[stem], exported['network_weights'][stem])  # fine-tuned from the export
    assert (fold / 'validation' / 'summary.json').exists()

    images = tmp_path / 'predict_in'
    images.mkdir()
    case = sorted((tmp_path / 'raw' / name / 'imagesTr').glob('*_0000.nii.gz'))[0]
    shutil.copy(case, images / case.name)
    out = tmp_path / 'predict_out'
    run_command(['nnUNetv2_predict', '-i', images, '-o', out, '-d', '920', '-c', '3d_fullres', '-tr',
                 'nnUNetTrainerCADSTiny', '-p', 'nnUNetPlans_pvt', '-f', '0', '-device', 'cpu', '-npp', '0', '-nps',
                 '0', '--disable_tta'], env)  # 0, 0: nnU-Net predicts in-process
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case.name.replace('_0000', ''))))
    assert prediction.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(case))).shape
    assert set(np.unique(prediction)) <= {0, 1, 2}
