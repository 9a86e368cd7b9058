"""Bad input, systematically: seeded random corruptions of valid images, out-of-range options and broken
checkpoints. Each ends its command with one line on stderr and exit code 2, and nothing is written.

The corruptions are kinds, not a list of files: every kind draws its parameters (truncation length, which case,
which axis, which option) from the seed, so another seed tries other files of the same kinds.
"""
import gzip
import os
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_desd.cli import pretrain as cli
from nnunetv2_desd.pretraining.config import OPTIONS, option_name
from nnunetv2_desd.data.raw import check_cases, read_raw_dataset
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.cli import plan_like_pretrained

SEED = int(os.environ.get('DESD_FUZZ_SEED', '0'))
ONE_CHANNEL, TWO_CHANNELS = 'Dataset930_Synthetic', 'Dataset931_Synthetic'


def _write(path: Path, array: np.ndarray, spacing=None) -> None:
    image = sitk.GetImageFromArray(array)
    if spacing is not None:
        image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def _patched_header(path: Path, offset: int, value: float) -> None:
    """Rewrites one float32 of the stored NIfTI-1 header (pixdim[1] is at byte 80)."""
    data = bytearray(gzip.open(path).read())
    struct.pack_into('<f', data, offset, value)
    path.write_bytes(gzip.compress(bytes(data)))


def _truncate(path, rng):
    data = path.read_bytes()
    path.write_bytes(data[:int(rng.integers(10, len(data) - 10))])


def _garbage(path, rng):
    path.write_bytes(rng.integers(0, 256, int(rng.integers(1, 4000)), dtype=np.uint8).tobytes())


def _empty(path, rng):
    path.write_bytes(b'')


def _two_d(path, rng):
    _write(path, rng.normal(size=(16, 16)).astype(np.float32))


def _four_d(path, rng):
    import nibabel
    nibabel.save(nibabel.Nifti1Image(rng.normal(size=(16, 16, 16, 2)).astype(np.float32), np.eye(4)), str(path))


def _vector_voxels(path, rng):
    one = sitk.GetImageFromArray(rng.normal(size=(16, 16, 16)).astype(np.float32))
    sitk.WriteImage(sitk.Compose(one, one), str(path))


def _complex_voxels(path, rng):
    _write(path, (rng.normal(size=(16, 16, 16)) + 1j).astype(np.complex64))


def _flat_axis(path, rng):
    shape = [16, 16, 16]
    shape[int(rng.integers(3))] = 1
    _write(path, rng.normal(size=shape).astype(np.float32))


def _zero_spacing(path, rng):
    _patched_header(path, 80 + 4 * int(rng.integers(3)), 0.0)


def _nan_spacing(path, rng):
    _patched_header(path, 80 + 4 * int(rng.integers(3)), float('nan'))


def _nan_voxels(path, rng):
    array = rng.normal(size=(16, 16, 16)).astype(np.float32)
    array.flat[int(rng.integers(array.size))] = np.nan
    _write(path, array, (1.5, 1.5, 1.5))


IMAGE_CORRUPTIONS = [_truncate, _garbage, _empty, _two_d, _four_d, _vector_voxels, _complex_voxels, _flat_axis,
                     _zero_spacing, _nan_spacing, _nan_voxels]


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp('pristine_raw')
    write_synthetic_dataset(str(root), 930, n_cases=3, shape=(16, 16, 16))
    write_synthetic_dataset(str(root), 931, n_cases=2, shape=(16, 16, 16), n_channels=2)
    return root


@pytest.fixture
def folders(tmp_path, monkeypatch, pristine):
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(key, str(tmp_path / key))
    for name in (ONE_CHANNEL, TWO_CHANNELS):
        shutil.copytree(pristine / name, tmp_path / 'nnUNet_raw' / name)
    return tmp_path


def _files_under(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


def _only_check_records(preprocessed: Path) -> bool:
    """Nothing but the image check's resumable records (its ledger and the body masks of good cases): no plans, no
    preprocessed case."""
    return all(f.split('/')[1] in ('desd_checks', 'desd_body_masks') for f in _files_under(preprocessed))


def _refused(capsys, command, argv) -> str:
    with pytest.raises(SystemExit) as e:
        command(argv)
    err = capsys.readouterr().err
    lines = [line for line in re.split(r'[\r\n]', err) if line.strip() and '%|' not in line]  # without progress bars
    assert e.value.code == 2, err
    assert len(lines) == 1 and ': error: ' in lines[0], err
    return lines[0]


def test_the_pristine_data_passes_the_checks(folders):
    for name in (ONE_CHANNEL, TWO_CHANNELS):
        assert check_cases(read_raw_dataset(name), None) == {}


@pytest.mark.parametrize('corrupt', IMAGE_CORRUPTIONS, ids=lambda f: f.__name__.strip('_'))
def test_a_corrupt_image_is_refused_before_anything_is_written(folders, capsys, corrupt):
    rng = np.random.default_rng([SEED, IMAGE_CORRUPTIONS.index(corrupt)])
    images = sorted((folders / 'nnUNet_raw' / ONE_CHANNEL / 'imagesTr').iterdir())
    victim = images[int(rng.integers(len(images)))]
    corrupt(victim, rng)
    err = _refused(capsys, cli.main, ['-d', '930', '--preprocess-only', '-device', 'cpu', '-np', '1'])
    assert err.startswith('desd_pretrain: error:') and 'Traceback' not in err
    case = victim.name.split('_0000')[0]
    assert case in err or victim.name in err
    assert _only_check_records(folders / 'nnUNet_preprocessed') and _files_under(folders / 'nnUNet_results') == []
    assert not list((folders / 'nnUNet_preprocessed').rglob(case + '.nii.gz'))  # no mask for the bad case


def test_channels_on_different_grids_are_refused(folders, capsys):
    rng = np.random.default_rng([SEED, 100])
    second = sorted((folders / 'nnUNet_raw' / TWO_CHANNELS / 'imagesTr').glob('*_0001.nii.gz'))[0]
    shape = [16, 16, 16]
    shape[int(rng.integers(3))] = int(rng.integers(8, 15))
    _write(second, rng.normal(size=shape).astype(np.float32), (1.5, 1.5, 1.5))
    err = _refused(capsys, cli.main, ['-d', '931', '--preprocess-only', '-device', 'cpu', '-np', '1'])
    assert 'is not on the grid of' in err
    assert _only_check_records(folders / 'nnUNet_preprocessed')


def _bad_values(name: str, rng) -> list:
    spec = OPTIONS[name]
    integer = spec.type is int
    values = ['abc'] + (['1.5'] if integer else ['nan', 'inf'])
    if spec.low is not None:
        values.append(str(spec.low - 1 if integer else spec.low - 0.5))
    if spec.above is not None:
        values.append(str(spec.above))
    if spec.high is not None:
        values.append(str(spec.high + 1))
    return [values[int(rng.integers(len(values)))]]


def test_out_of_range_options_are_refused_in_one_line(folders, capsys):
    rng = np.random.default_rng([SEED, 200])
    names = [name for name, spec in OPTIONS.items() if spec.bounded]
    for name in rng.choice(names, size=12, replace=False):
        value = _bad_values(name, rng)
        count = 3 if name in ('patch_size', 'mask_patch') else (2 if name == 'stages' else 1)
        argv = ['-d', '930', option_name(name), *(value * count), '-device', 'cpu']
        err = _refused(capsys, cli.main, argv)
        assert option_name(name) in err or 'argument' in err, (name, value, err)
    assert _files_under(folders / 'nnUNet_preprocessed') == [] and _files_under(folders / 'nnUNet_results') == []


def test_broken_checkpoints_are_refused_in_one_line(folders, capsys, tmp_path):
    rng = np.random.default_rng([SEED, 300])
    good = {'network_weights': {'encoder.stages.0.0.convs.0.conv.weight': torch.zeros(2, 1, 3, 3, 3)},
            'desd_export': {'method': 'desd'}}
    path = tmp_path / 'export.pth'
    torch.save(good, path)
    data = path.read_bytes()
    cases = {
        'truncated': lambda: path.write_bytes(data[:int(rng.integers(1, len(data) - 1))]),
        'garbage': lambda: path.write_bytes(rng.integers(0, 256, 500, dtype=np.uint8).tobytes()),
        'a tensor, not a dict': lambda: torch.save(torch.zeros(3), path),
        'no weights': lambda: torch.save({'desd_export': {}}, path),
        'weights that are not tensors': lambda: torch.save({'network_weights': {'a': 1.0}}, path),
        'a pickled object': lambda: torch.save({'network_weights': {'a': object()}}, path),
    }
    for what, make in cases.items():
        make()
        err = _refused(capsys, plan_like_pretrained.main, ['-d', '930', '-w', str(path), '-np', '1'])
        assert str(path) in err, (what, err)
    assert _files_under(folders / 'nnUNet_preprocessed') == []


@pytest.mark.parametrize('option', ['--epochs', '--iters-per-epoch'])
def test_a_run_without_steps_is_refused(folders, capsys, option):
    # 0 epochs or iterations would export the random initialisation as if it were pre-trained
    err = _refused(capsys, cli.main, ['-d', '930', option, '0', '-device', 'cpu'])
    assert option in err
    assert _files_under(folders / 'nnUNet_results') == []
