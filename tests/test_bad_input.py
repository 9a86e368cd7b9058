"""Bad input to the real ``desd_pretrain`` command: exit code 2, one clear message, no traceback, nothing half-written.

Every case runs the console script in a fresh process (nnunetv2.paths reads the nnU-Net folders at import).
Cases that fail before planning get their own empty nnU-Net folders and must leave no file at all in
nnUNet_preprocessed and nnUNet_results. The resume cases share one dataset, preprocessed once and trained once.
"""
import hashlib
import json
import re
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import TINY, nnunet_env, run_command, with_results
from nnunetv2_desd.data.sources import write_synthetic_dataset

pytestmark = pytest.mark.e2e

RUN = 'desd__nnUNetPlans__3d_fullres'
SHORT = ['--epochs', '1', '--iters-per-epoch', '1']  # if a bad case slipped through, it would at least end soon


def _fails(env: dict, *args) -> str:
    """Runs desd_pretrain; asserts exit 2, a single error message and no traceback; returns the message."""
    proc = run_command(['desd_pretrain', *args], env, timeout=300, check=False)
    report = f'exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}\nstdout:\n{proc.stdout[-1500:]}'
    assert proc.returncode == 2, report
    assert 'Traceback' not in proc.stderr and 'Traceback' not in proc.stdout, report
    assert proc.stderr.count('desd_pretrain: error:') == 1, report
    return proc.stderr.split('desd_pretrain: error:', 1)[1].strip()


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def _assert_nothing_written(root: Path) -> None:
    """Nothing under nnUNet_results, and under nnUNet_preprocessed nothing but the image check's resumable records
    (its ledger and the body masks of good cases, kept so that a retry does not read them again): no plans, no
    dataset.json, no preprocessed case."""
    assert all(f.split('/')[1] in ('desd_checks', 'desd_body_masks') for f in _files(root / 'preprocessed'))
    assert _files(root / 'results') == []


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# failures before anything is planned: each in its own nnU-Net folders
# ---------------------------------------------------------------------------------------------------------------
def test_unknown_dataset_id(tmp_path):
    env = nnunet_env(tmp_path)
    message = _fails(env, '-d', '977', *SHORT, *TINY)
    assert '977' in message and 'not found' in message
    _assert_nothing_written(tmp_path)
    assert list((tmp_path / 'preprocessed').iterdir()) == []


def test_dataset_without_images(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 902, name='Empty', n_cases=1)
    images = tmp_path / 'raw' / name / 'imagesTr'
    for f in images.iterdir():
        f.unlink()
    message = _fails(env, '-d', '902', *SHORT, *TINY)
    assert 'no images' in message and str(images) in message
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize('damage', ['garbage', 'truncated'])
def test_corrupt_image(tmp_path, damage):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 903, name='Corrupt', n_cases=3)
    bad = tmp_path / 'raw' / name / 'imagesTr' / 'corrupt_001_0000.nii.gz'
    content = bad.read_bytes()
    # a truncated .nii.gz matters most: SimpleITK reads it without complaint, the missing voxels as zeros
    bad.write_bytes(b'not a nifti file ' * 64 if damage == 'garbage' else content[:len(content) // 2])
    message = _fails(env, '-d', '903', *SHORT, *TINY)
    assert 'corrupt_001' in message and bad.name in message
    assert re.search(r'corrupt|unreadable|truncated', message), message
    for good in ('corrupt_000', 'corrupt_002'):
        assert good not in message
    _assert_nothing_written(tmp_path)
    assert not list((tmp_path / 'preprocessed').rglob('corrupt_001*'))  # no mask for the bad case


def test_channel_count_mismatch(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 904, name='Channels', n_cases=2)
    dataset_json = tmp_path / 'raw' / name / 'dataset.json'
    meta = json.loads(dataset_json.read_text())
    meta['channel_names'] = {'0': 'CT', '1': 'CT'}
    dataset_json.write_text(json.dumps(meta))
    message = _fails(env, '-d', '904', *SHORT, *TINY)
    assert 'channel' in message and 'channels_000' in message and '2 channel' in message
    _assert_nothing_written(tmp_path)


def test_nan_and_inf_voxels(tmp_path):
    """SimpleITK's NIfTI reader returns NaN/inf as 0, so this also checks that the check looks past the reader."""
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 905, name='Nan', n_cases=3)
    bad = tmp_path / 'raw' / name / 'imagesTr' / 'nan_002_0000.nii.gz'
    image = sitk.ReadImage(str(bad))
    voxels = sitk.GetArrayFromImage(image).astype(np.float32)
    voxels[3, 4, 5] = np.nan
    voxels[6, 7, 8] = np.inf
    written = sitk.GetImageFromArray(voxels)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(bad), useCompression=True)
    # the file really holds them (read with nibabel, independently of the reader under test)
    assert int((~np.isfinite(nibabel.load(str(bad)).get_fdata())).sum()) == 2

    message = _fails(env, '-d', '905', *SHORT, *TINY)
    assert 'NaN' in message and 'nan_002' in message and bad.name in message
    assert 'nan_000' not in message and 'nan_001' not in message
    _assert_nothing_written(tmp_path)


def test_plans_from_unplanned_dataset(tmp_path):
    env = nnunet_env(tmp_path)
    write_synthetic_dataset(env['nnUNet_raw'], 906, name='Pool', n_cases=2)
    source = write_synthetic_dataset(env['nnUNet_raw'], 907, name='Unplanned', n_cases=2, labelled=True)
    message = _fails(env, '-d', '906', '--plans-from', '907', *SHORT, *TINY)
    assert '--plans-from' in message and source in message and 'nnUNetPlans.json' in message
    assert 'nnUNetv2_plan_and_preprocess -d 907' in message
    _assert_nothing_written(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# resume: one dataset, trained once by a first launch with --c
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def trained(pool_900, tmp_path_factory):
    """The first launch of a job line with --c on the prepared pool (its own nnUNet_results): nothing to continue,
    so a new run (K = 64); its files and sha256."""
    _, env, name = pool_900
    results = tmp_path_factory.mktemp('resume_results')
    env = with_results(env, results)
    proc = run_command(['desd_pretrain', '-d', '900', '--c', *SHORT, *TINY], env, timeout=300)
    folder = results / name / RUN
    checkpoints = {f: _sha256(folder / f) for f in ('checkpoint_latest.pth', 'checkpoint_final.pth',
                                                    'pretrained_export.pth')}
    return env, folder, checkpoints, proc


def _non_log_files(folder: Path) -> list:
    return [f for f in _files(folder) if not f.startswith('training_log_')]


def test_continue_with_nothing_to_continue_starts_a_new_run(trained):
    env, folder, checkpoints, proc = trained
    log = next(folder.glob('training_log_*.txt')).read_text()
    assert f'--c: nothing to continue in {folder}; starting a new run.' in log
    assert torch.load(folder / 'checkpoint_final.pth', weights_only=True)['step'] == 1


def test_a_run_over_an_existing_run_is_refused_and_keeps_it(trained):
    env, folder, checkpoints, _ = trained
    before = _non_log_files(folder)
    message = _fails(env, '-d', '900', *SHORT, *TINY)  # the same command without --c: it must not start over
    assert str(folder) in message and '--c' in message and '--overwrite' in message
    assert {f: _sha256(folder / f) for f in checkpoints} == checkpoints
    assert _non_log_files(folder) == before


def test_continue_with_other_architecture_keeps_checkpoint(trained):
    env, folder, checkpoints, _ = trained
    before = _non_log_files(folder)
    message = _fails(env, '-d', '900', '--c', '--epochs', '2', '--iters-per-epoch', '1', *TINY, '--out-dim', '32')
    assert re.search(r'out_dim\D+64\D+32', message), message
    assert str(folder / 'checkpoint_latest.pth') in message
    assert {f: _sha256(folder / f) for f in checkpoints} == checkpoints
    assert _non_log_files(folder) == before


def test_continue_from_truncated_checkpoint(trained):
    env, folder, checkpoints, _ = trained
    latest = folder / 'checkpoint_latest.pth'
    intact = latest.read_bytes()
    truncated = intact[:len(intact) // 3]
    latest.write_bytes(truncated)
    try:
        before = _non_log_files(folder)
        message = _fails(env, '-d', '900', '--c', '--epochs', '2', '--iters-per-epoch', '1', *TINY)
        assert str(latest) in message and re.search(r'not a valid|corrupt|truncated|unreadable', message)
        assert latest.read_bytes() == truncated  # neither repaired nor overwritten behind the user's back
        for f in ('checkpoint_final.pth', 'pretrained_export.pth'):
            assert _sha256(folder / f) == checkpoints[f]
        assert _non_log_files(folder) == before
    finally:
        latest.write_bytes(intact)
