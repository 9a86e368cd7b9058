"""DRRs for CADS: the projection maths on a phantom, the geometry, and desd_drr through nnU-Net's preprocessing."""
import glob
import math
import os

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
from PIL import Image

from conftest import nnunet_env, run_command
from nnunetv2_desd.cli import drr as drr_cli
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.drrs import axes_lps, drr_path, load_drr, require_ct, save_drr_png
from nnunetv2_desd.data.drr_projection import (MU_WATER_PER_MM, attenuation_image, hu_to_mu, line_integrals,
                                               minmax_to_unit, projection_axis)
from nnunetv2_desd.data.sources import write_chest_ct_datasets, write_synthetic_dataset


# ------------------------------------------------------------------------------------------------------------
# maths
# ------------------------------------------------------------------------------------------------------------
def cube_phantom():
    """A 4-voxel cube of +500 HU in -1000 HU air; anisotropic spacing."""
    hu = np.full((10, 12, 14), -1000.0, dtype=np.float32)
    hu[2:6, 5:9, 3:7] = 500.0
    return hu, (2.5, 1.0, 0.5), (slice(2, 6), slice(5, 9), slice(3, 7))


def drr_from_hu(hu, spacing, axis, attenuation='linear'):
    """A DRR in [-1, 1] without resampling: what case_drr does on a grid that needs none."""
    return minmax_to_unit(attenuation_image(hu, spacing, axis, attenuation))


def test_hu_to_mu_by_hand():
    hu = np.array([-2000.0, -1010.0, -1000.0, 0.0, 500.0, 3000.0])
    expected = [0.0, 0.0, 0.0, 0.02, 0.02 * 1.5, 0.02 * (1 + 1024 / 1000)]  # clip to [-1024, 1024], floor at 0
    assert MU_WATER_PER_MM == 0.02
    np.testing.assert_allclose(hu_to_mu(hu), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_line_integrals_of_a_cube(axis):
    hu, spacing, cube = cube_phantom()
    p = line_integrals(hu, spacing, axis)
    shadow = np.zeros(hu.shape, dtype=bool)
    shadow[cube] = True
    shadow = shadow.any(axis)
    inside = 0.02 * 1.5 * 4 * spacing[axis]  # mu * L * s: (0.3, 0.12, 0.06) for the three axes
    assert p.shape == tuple(n for a, n in enumerate(hu.shape) if a != axis)
    np.testing.assert_allclose(p[shadow], inside, rtol=1e-6)
    assert np.all(p[~shadow] == 0)

    absorbed = attenuation_image(hu, spacing, axis, 'beer_lambert')
    np.testing.assert_allclose(absorbed[shadow], 1 - math.exp(-inside), rtol=1e-6)
    assert np.all(absorbed[~shadow] == 0)
    for attenuation in ('linear', 'beer_lambert'):  # after min-max: shadow +1, air -1
        drr = drr_from_hu(hu, spacing, axis, attenuation)
        assert drr.dtype == np.float32
        assert np.all(drr[shadow] == 1) and np.all(drr[~shadow] == -1)


def test_linear_drr_equals_minmax_of_clipped_hu_ray_sums():
    """The official DRR (clip HU, ray sum, min-max) and ours agree while HU >= -1000 (attenuation_image's claim)."""
    hu = np.random.default_rng(0).uniform(-1000, 2000, (7, 8, 9)).astype(np.float32)
    sums = np.clip(hu.astype(np.float64), -1024, 1024).sum(1)
    official = 2 * (sums - sums.min()) / (sums.max() - sums.min()) - 1
    np.testing.assert_allclose(drr_from_hu(hu, (1.0, 2.0, 3.0), 1), official, atol=2e-6)


def test_constant_volume_gives_zeros():
    for value in (-1000.0, 40.0):
        drr = drr_from_hu(np.full((4, 5, 6), value, np.float32), (1, 1, 1), 0, 'beer_lambert')
        assert drr.shape == (5, 6) and np.all(drr == 0)


def test_projection_axis():
    identity = (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert projection_axis(identity, 'lateral') == 2  # numpy (z, y, x): x is left-right
    assert projection_axis(identity, 'frontal') == 1
    # columns: index axis 0 -> +z, axis 1 -> -x, axis 2 -> +y (rows written out below)
    permuted = (0, -1, 0,
                0, 0, 1,
                1, 0, 0)
    assert projection_axis(permuted, 'lateral') == 2 - 1  # x lies on index axis 1 -> numpy axis 1
    assert projection_axis(permuted, 'frontal') == 2 - 2  # y lies on index axis 2 -> numpy axis 0
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))  # 30 degrees about z: x still mostly on axis 0
    rotated = (c, -s, 0, s, c, 0, 0, 0, 1)
    assert projection_axis(rotated, 'lateral') == 2 and projection_axis(rotated, 'frontal') == 1
    with pytest.raises(DesdError, match='unknown DRR view'):
        projection_axis(identity, 'axial')


def test_require_ct():
    require_ct({'0': 'ct'}, 'Dataset1_X')
    require_ct({'0': 'CT', '1': 'Ct'}, 'Dataset1_X')
    for names in ({'0': 'MR'}, {'0': 'CT', '1': 'MR'}):
        with pytest.raises(DesdError, match=r"CADS projects Hounsfield units.*Dataset1_X's channel_names are "
                                            r".*'MR'.*-m desd"):
            require_ct(names, 'Dataset1_X')


def test_load_drr_names_a_bad_file(tmp_path):
    bad = tmp_path / 'case_drr_lateral_linear.npy'
    bad.write_bytes(b'not numpy')
    with pytest.raises(DesdError, match='case_drr_lateral_linear.npy'):
        load_drr(str(bad))
    np.save(bad, np.zeros((3, 4), np.float32))
    with pytest.raises(DesdError, match=r'is not a DRR.*\(3, 4\)'):
        load_drr(str(bad))


def test_png_orientation(tmp_path):
    """Standard layout (z feet->head, y anterior->posterior, x right->left): head up, back on the right (lateral)."""
    drr = -np.ones((1, 8, 6, 1), np.float32)
    drr[0, 7, 5, 0] = 1  # the most superior, most posterior pixel
    save_drr_png(drr, (2.0, 1.0, 1.0), str(tmp_path / 'lat.png'))
    png = np.asarray(Image.open(tmp_path / 'lat.png'))
    assert png.shape == (256, 96)  # 16 mm x 6 mm at square pixels, long side stretched to 256
    assert png[0, -1] > 200 and png[-1, 0] < 50 and png[0, 0] < 50 and png[-1, -1] < 50

    # SimpleITK index axes 0 -> -x (towards the patient's right), 1 -> +z, 2 -> +y; transpose_forward (2, 1, 0)
    # makes preprocessed axes (index 0, index 1, index 2) = (-x, +z, +y). Frontal view: rays along y (axis 2).
    axes = axes_lps((-1, 0, 0, 0, 0, 1, 0, 1, 0), (2, 1, 0))
    np.testing.assert_array_equal(axes, [[-1, 0, 0], [0, 0, 1], [0, 1, 0]])
    drr = -np.ones((1, 6, 8, 1), np.float32)
    drr[0, 0, 7, 0] = 1  # axis-0 index 0 = the patient's far left; z index 7 = most superior
    save_drr_png(drr, (1.0, 2.0, 1.0), str(tmp_path / 'fro.png'), axes)
    png = np.asarray(Image.open(tmp_path / 'fro.png'))
    assert png.shape == (256, 96)  # z vertical (16 mm), x horizontal (6 mm)
    assert png[0, -1] > 200 and png[0, 0] < 50 and png[-1, -1] < 50  # patient's left on the right, head up


# ------------------------------------------------------------------------------------------------------------
# desd_drr through nnU-Net's preprocessing
# ------------------------------------------------------------------------------------------------------------
def _rewrite(file, array, spacing, direction):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, file)


def halve_with_triangle_filter(image):
    """Axis 0 shrunk 2x on pixel centres: output j = (1, 3, 3, 1)/8 over inputs 2j-1..2j+2, renormalised at borders."""
    kernel = np.array([1, 3, 3, 1]) / 8
    padded, inside = np.pad(image, ((1, 1), (0, 0))), np.pad(np.ones(len(image)), 1)
    out = [sum(kernel[m] * padded[2 * j + m] for m in range(4)) / sum(kernel[m] * inside[2 * j + m] for m in range(4))
           for j in range(len(image) // 2)]
    return np.stack(out)


def test_desd_drr_end_to_end(tmp_path, monkeypatch, capsys):
    """Non-identity transpose_forward, a permuted direction, one resampled and one cropped case."""
    env = nnunet_env(tmp_path)
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    name = write_synthetic_dataset(env['nnUNet_raw'], 930, n_cases=3, shape=(20, 24, 16))
    files = sorted(glob.glob(os.path.join(env['nnUNet_raw'], name, 'imagesTr', '*.nii.gz')))
    # index axis 0 -> LPS y, 1 -> LPS x, 2 -> LPS z; spacing (x-index 3.0) makes nnU-Net put numpy axis 2 first
    direction = (0, 1, 0, 1, 0, 0, 0, 0, 1)
    raw = []
    for i, f in enumerate(files):
        hu = sitk.GetArrayFromImage(sitk.ReadImage(f))  # numpy (z, y, x) = (16, 24, 20)
        raw.append(hu.astype(np.float64))
        if i == 1:  # 3 slices of exactly 0 on numpy axis 0: nnU-Net crops them away
            hu = np.concatenate([np.zeros_like(hu[:3]), hu])
        _rewrite(f, hu, (1.5 if i == 0 else 3.0, 1.5, 1.5), direction)  # case 0 is resampled 1.5 -> 3.0 mm
    run_command(['desd_drr', '-d', '930', '--png', tmp_path / 'png', '-np', '1'], env)

    root = os.path.join(env['nnUNet_preprocessed'], name)
    assert load_json(os.path.join(root, 'nnUNetPlans.json'))['transpose_forward'] == [2, 0, 1]
    folder = os.path.join(root, 'nnUNetPlans_3d_fullres')
    cases = [f'synthetic_{i:03d}' for i in range(3)]
    dataset = infer_dataset_class(folder)
    assert sorted(dataset.get_identifiers(folder)) == cases  # nnU-Net does not see the DRR files
    # hand-worked: lateral = LPS x = index axis 1 = numpy axis 1 (spacing 1.5) = preprocessed axis 2 (of (x, z, y))
    expected_shapes = {cases[0]: (1, 10, 16, 1), cases[1]: (1, 20, 16, 1), cases[2]: (1, 20, 16, 1)}
    mtimes = {}
    for i, case in enumerate(cases):
        path = drr_path(folder, case, 'lateral', 'linear')
        drr = load_drr(path)
        data = dataset(folder, [case]).load_case(case)[0]
        assert drr.shape == expected_shapes[case] and data.shape[1:3] == drr.shape[1:3] and data.shape[3] > 1
        assert drr.min() == -1 and drr.max() == 1
        mu = 0.02 * np.maximum(0, 1 + np.clip(raw[i], -1024, 1024) / 1000)
        rays = mu.sum(1).T * 1.5  # (x, z) = preprocessed (axis 0, axis 1)
        if i == 0:  # x resampled from 20 to 10 pixels: antialiased bilinear = triangle filter (1, 3, 3, 1) / 8
            rays = halve_with_triangle_filter(rays)
        reference = 2 * (rays - rays.min()) / (rays.max() - rays.min()) - 1
        np.testing.assert_allclose(drr[0, :, :, 0], reference, atol=1e-5)
        png = np.asarray(Image.open(tmp_path / 'png' / f'{case}.png'))
        assert max(png.shape) >= 256 and png.std() > 20 and png.max() > 200
        mtimes[path] = os.path.getmtime(path)

    drr_cli.main(['-d', '930', '-np', '1'])  # second run, in-process: everything is reused
    assert {p: os.path.getmtime(p) for p in mtimes} == mtimes
    assert 'DRRs (lateral, linear)' in capsys.readouterr().out
    stale = drr_path(folder, cases[2], 'lateral', 'linear')  # case re-preprocessed after its DRR: DRR is redone
    os.utime(os.path.join(folder, cases[2] + '.pkl'), (mtimes[stale] + 10, mtimes[stale] + 10))
    drr_cli.main(['-d', '930', '-np', '1'])
    assert os.path.getmtime(stale) > mtimes[stale]
    assert all(os.path.getmtime(p) == t for p, t in mtimes.items() if p != stale)

    write_synthetic_dataset(env['nnUNet_raw'], 931, name='SynthMR', n_cases=2, channel_name='MR')
    with pytest.raises(SystemExit) as exit_info:
        drr_cli.main(['-d', '931', '-np', '1'])
    assert exit_info.value.code == 2
    assert "desd_drr: error: CADS projects Hounsfield units" in capsys.readouterr().err
    assert not glob.glob(os.path.join(env['nnUNet_preprocessed'], 'Dataset931_SynthMR', '**', '*_drr_*'),
                         recursive=True)


def test_chest_ct_lateral_drr(tmp_path):
    """Real chest CT (the whole scan, at 4 mm): above the heart, the spine is the brightest column of the lateral DRR.

    Rows below are not a fair test: at the heart's levels the mediastinum is about as bright, and below the
    diaphragm the full-width abdomen is brighter. The full pipeline (transpose, crop, resampling) is checked on
    synthetic cases above; here the maths and the geometry meet real anatomy.
    """

    _, labelled = write_chest_ct_datasets(str(tmp_path), 940, 941, spacing=(4, 4, 4), n_unlabelled=1, n_labelled=1,
                                          crop_size_mm=(352, 352, 328))
    image = sitk.ReadImage(glob.glob(str(tmp_path / labelled / 'imagesTr' / '*.nii.gz'))[0])
    labels = sitk.GetArrayFromImage(sitk.ReadImage(glob.glob(str(tmp_path / labelled / 'labelsTr' / '*'))[0]))
    hu = sitk.GetArrayFromImage(image)  # numpy (z, y, x)
    direction = image.GetDirection()
    assert direction == (1, 0, 0, 0, -1, 0, 0, 0, 1)  # this scan: y index runs posterior -> anterior
    assert projection_axis(direction, 'lateral') == 2 and projection_axis(direction, 'frontal') == 1
    lateral = drr_from_hu(hu, image.GetSpacing()[::-1], 2)  # (z, y)
    frontal = drr_from_hu(hu, image.GetSpacing()[::-1], 1)  # (z, x)
    assert lateral.shape == frontal.shape == hu.shape[:2]  # square in-plane: comparable pixel by pixel
    assert np.abs(lateral - frontal).mean() > 0.1

    heart, lungs = np.argwhere(labels == 2), np.argwhere(labels == 1)
    above_heart = lateral[heart[:, 0].max() + 1:lungs[:, 0].max() + 1]  # z grows towards the head
    brightest = int(np.argmax(above_heart.mean(0)))
    assert brightest < heart[:, 1].mean() - 10  # > 40 mm behind the heart's centre
