"""The pool's other real CTs: the InVesalius project reader, the brain template's background, crops of a source, the
one-line refusal of a missing source, and the seed spread of probe gains."""
import io
import plistlib
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data import sources
from nnunetv2_desd.data.sources import RealCT, read_brain_ct_template, read_invesalius_ct, write_real_ct_crops
from nnunetv2_desd.evaluation.probe import Encoder, ProbeResult, seed_spread


def _inv3(path, volume: np.ndarray, spacing):
    """An InVesalius project as the Debian example is laid out: a gzipped tar of a folder with main.plist."""
    plist = plistlib.dumps({'matrix': {'dtype': 'int16', 'filename': 'matrix.dat', 'shape': list(volume.shape)},
                            'spacing': list(spacing), 'modality': 'CT'})
    with tarfile.open(path, 'w:gz') as tar:
        for name, data in (('tmpabc/main.plist', plist), ('tmpabc/matrix.dat', volume.astype('<i2').tobytes())):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_invesalius_project_read_as_zyx_volume_with_xyz_spacing(tmp_path):
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 1000
    _inv3(tmp_path / 'c.inv3', volume, [0.5, 0.75, 2.0])
    image = read_invesalius_ct(str(tmp_path / 'c.inv3'))
    assert image.GetSize() == (6, 5, 4) and image.GetSpacing() == (0.5, 0.75, 2.0)
    assert sitk.GetArrayFromImage(image)[3, 4, 5] == 4 * 5 * 6 - 1 - 1000
    (tmp_path / 'broken.inv3').write_bytes(b'not a tar')
    with pytest.raises(DesdError, match='not a readable InVesalius project'):
        read_invesalius_ct(str(tmp_path / 'broken.inv3'))


def test_brain_template_background_becomes_air_but_enclosed_zeros_stay(tmp_path):
    volume = np.zeros((9, 9, 9), dtype=np.int16)
    volume[2:7, 2:7, 2:7] = 40   # brain
    volume[4, 4, 4] = 0          # a zero voxel enclosed by the brain: tissue, not background
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / 't.nii.gz'))
    out = sitk.GetArrayFromImage(read_brain_ct_template(str(tmp_path / 't.nii.gz')))
    assert out[0, 0, 0] == -1024 and out[8, 4, 4] == -1024 and out[1, 4, 4] == -1024
    assert out[4, 4, 4] == 0 and out[3, 3, 3] == 40
    assert (out == -1024).sum() == 9 ** 3 - 5 ** 3


def test_crops_of_a_source_fit_the_volume_and_hold_body(tmp_path):
    volume = np.full((40, 50, 60), -1000, dtype=np.int16)
    volume[5:35, 10:40, 10:50] = 30  # a body of 30 x 30 x 40 voxels at 2 mm
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing((2.0, 2.0, 2.0))
    sitk.WriteImage(image, str(tmp_path / 'v.nii.gz'))
    source = RealCT('Phantom', 'a phantom', lambda: str(tmp_path / 'v.nii.gz'), sitk.ReadImage)
    name = write_real_ct_crops(str(tmp_path / 'raw'), 777, source, n_crops=3, spacing=(4.0, 4.0, 4.0),
                               crop_size_mm=(64.0, 64.0, 400.0))
    assert name == 'Dataset777_Phantom'
    files = sorted((tmp_path / 'raw' / name / 'imagesTr').iterdir())
    assert [f.name for f in files] == [f'phantom_{i:03d}_0000.nii.gz' for i in range(3)]
    for f in files:
        crop = sitk.ReadImage(str(f))
        # 64 mm / 4 mm = 16 voxels in x and y; z is capped by the volume: 40 slices of 2 mm = 20 voxels of 4 mm
        assert crop.GetSize() == (16, 16, 20) and crop.GetSpacing() == (4.0, 4.0, 4.0)
        assert (sitk.GetArrayFromImage(crop) > -500).mean() > 0.3
    missing = RealCT('Gone', 'nothing', lambda: (_ for _ in ()).throw(DesdError('x is not installed')), sitk.ReadImage)
    with pytest.raises(DesdError, match='not installed'):
        write_real_ct_crops(str(tmp_path / 'raw'), 778, missing)
    assert not (tmp_path / 'raw' / 'Dataset778_Gone').exists()


def test_installed_sources_have_the_documented_geometry():
    """Debian invesalius-examples: 256 x 256 x 108 voxels of 0.957 x 0.957 x 1.5 mm; totalsegmentator's template:
    202 x 202 x 179 voxels of 1 mm (install.sh may skip either, with one line)."""
    found = 0
    for find, read, size, spacing in ((sources.find_head_ct, read_invesalius_ct, (256, 256, 108), (0.957, 0.957, 1.5)),
                                      (sources.find_brain_ct_template, read_brain_ct_template, (202, 202, 179),
                                       (1.0, 1.0, 1.0))):
        try:
            path = find()
        except DesdError as e:
            assert 'run `' in str(e)  # the refusal names the install command
            continue
        image = read(path)
        assert image.GetSize() == size and np.allclose(image.GetSpacing(), spacing, atol=1e-3)
        assert sitk.GetArrayViewFromImage(image).min() == -1024
        found += 1
    if not found:
        pytest.skip('neither source is installed here')


def test_seed_spread_by_hand():
    encoders = [Encoder('a', 'desd', {}, distilled_stages=(1, 2)), Encoder('b', 'desd', {}, distilled_stages=(1, 2)),
                Encoder('r0', 'random', None), Encoder('r1', 'random', None, seed=1)]
    dice = {('a', 1): 0.6, ('a', 2): 0.5, ('b', 1): 0.4, ('b', 2): 0.7,
            ('r0', 1): 0.5, ('r0', 2): 0.3, ('r1', 1): 0.45, ('r1', 2): 0.4}
    rows = [dict(encoder=e, group='random' if e[0] == 'r' else 'desd', stage=s, fold=0, dice=d, accuracy=0.0)
            for (e, s), d in dice.items()]
    spread = seed_spread(ProbeResult(encoders, rows, 3, {}), 'desd')
    # best random: 0.5 at stage 1, 0.4 at stage 2
    assert spread['gains']['a'] == pytest.approx([0.1, 0.1]) and spread['gains']['b'] == pytest.approx([-0.1, 0.3])
    assert spread['stage_mean'] == pytest.approx([0.0, 0.2])
    assert spread['stage_sd'] == pytest.approx([0.02 ** 0.5, 0.02 ** 0.5])  # sample sd of (0.1, -0.1), (0.1, 0.3)
    assert spread['mean'] == pytest.approx(0.1) and spread['every_seed_wins'] is False
    # per seed: a (0.1 + 0.1) / 2 = 0.1, b (-0.1 + 0.3) / 2 = 0.1; their sample sd is 0
    assert spread['seed_mean'] == pytest.approx([0.1, 0.1]) and spread['sd'] == pytest.approx(0.0, abs=1e-12)
