"""One DRR per preprocessed CT case, computed once and stored beside the case (CADS).

``<data_folder>/<case>_drr_<view>_<attenuation>.npy``: float32 (1, a0, a1, a2) in [-1, 1], in the preprocessed
case's axis order and shape with size 1 on the projection axis, cast from the raw HU image (transposed and cropped
as nnU-Net does). nnU-Net's dataset classes ignore ``.npy`` files. A ledger
(``../desd_drrs/<data folder's name>_<view>_<attenuation>``) records each DRR's projection axis and signatures, so
checking a DRR takes two ``os.stat`` calls. Details: docs/cads.md.
"""
import copy
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import isfile, join
from PIL import Image
from tqdm import tqdm

from nnunetv2_desd.common.errors import DesdError, check_share
from nnunetv2_desd.common.checkpoint import atomic_write
from nnunetv2_desd.common.workers import default_processes, run_in_processes
from nnunetv2_desd.data.ledger import Ledger, current, file_signature, in_share
from nnunetv2_desd.data.drr_projection import (DEFAULT_ATTENUATION, DEFAULT_VIEW, attenuation_image, check_view,
                                               minmax_to_unit, projection_axis)
from nnunetv2_desd.data.planning import prepare_pool
from nnunetv2_desd.data.raw import read_raw_dataset

STANDARD_DIRECTION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # assumed when the reader gives no geometry
PNG_MIN_SIDE, PNG_MAX_SIDE = 256, 1024  # PNG size limits in pixels (long side), for small and huge DRRs
MIN_CASES_PER_PROCESS = 4  # a spawned worker costs seconds of imports: only worth it for several cases each


def require_ct(channel_names: dict, dataset_name: str) -> None:
    names = [str(n) for n in channel_names.values()]
    if not names or any(n.lower() != 'ct' for n in names):
        raise DesdError(f'CADS projects Hounsfield units into an X-ray, so every channel must be CT; '
                        f'{dataset_name}\'s channel_names are {dict(channel_names)}. '
                        f'Use -m desd for other modalities.')


def drr_projection_axis(shape: Sequence[int]) -> int:
    """The projection axis (0..2) of a DRR of shape (a0, a1, a2) or (1, a0, a1, a2): its last axis of size 1."""
    spatial = tuple(shape)[-3:]
    return [a for a in range(3) if spatial[a] == 1][-1]


def drr_path(data_folder: str, case: str, view: str = DEFAULT_VIEW, attenuation: str = DEFAULT_ATTENUATION) -> str:
    return join(data_folder, f'{case}_drr_{view}_{attenuation}.npy')


def drr_ledger(data_folder: str, view: str = DEFAULT_VIEW, attenuation: str = DEFAULT_ATTENUATION) -> Ledger:
    """The DRRs' records, next to the data folder (nnU-Net refuses a data folder holding other files)."""
    folder = os.path.normpath(data_folder)
    return Ledger(join(os.path.dirname(folder), 'desd_drrs', f'{os.path.basename(folder)}_{view}_{attenuation}'))


# ---------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------
def direction_from_properties(properties: dict) -> Tuple[float, ...]:
    """SimpleITK-style direction (row-major 3x3, column a = LPS direction of index axis a) from reader properties."""
    sitk_stuff = properties.get('sitk_stuff') or {}
    if len(sitk_stuff.get('direction', ())) == 9:
        return tuple(float(d) for d in sitk_stuff['direction'])
    nib_stuff = properties.get('nibabel_stuff') or {}
    affine = nib_stuff.get('reoriented_affine', nib_stuff.get('original_affine'))
    if affine is not None:  # nibabel: voxel axis i -> RAS; nnU-Net transposes so numpy axis = 2 - i, as SimpleITK
        columns = np.asarray(affine, dtype=np.float64)[:3, :3] * np.array([[-1.0], [-1.0], [1.0]])  # RAS -> LPS
        columns = columns / np.maximum(np.linalg.norm(columns, axis=0, keepdims=True), 1e-12)
        return tuple(float(d) for d in columns.reshape(-1))
    return STANDARD_DIRECTION


def axes_lps(direction: Sequence[float], transpose_forward: Sequence[int]) -> np.ndarray:
    """(3, 3): row i = LPS unit vector of preprocessed axis i (= numpy axis transpose_forward[i] of the raw array)."""
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return np.stack([matrix[:, 2 - int(n)] for n in transpose_forward])


def _dataset_class(data_folder: str):
    """nnU-Net's dataset class for the folder (lists the folder: call once, not per case)."""
    # here: nnunet_dataset imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    return infer_dataset_class(data_folder)


def _load_preprocessed(prepared, case: str, dataset_class=None) -> Tuple[Tuple[int, ...], dict]:
    """(shape (a0, a1, a2), properties) of a preprocessed case, read without decompressing the voxels.
    ``dataset_class``: nnU-Net's dataset class of the folder (found by listing it when not given)."""
    if not isfile(join(prepared.data_folder, case + '.pkl')):
        raise DesdError(f'case {case} is not preprocessed: {join(prepared.data_folder, case + ".pkl")} is missing.')
    dataset_class = dataset_class if dataset_class is not None else _dataset_class(prepared.data_folder)
    data, _, _, properties = dataset_class(prepared.data_folder, [case]).load_case(case)
    return tuple(int(s) for s in data.shape[1:]), properties


def _resize_bilinear(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """2D bilinear resampling on pixel centres (as nnU-Net's resampling), antialiased when shrinking."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float64))[None, None]
    if tuple(x.shape[2:]) == tuple(shape):
        return image
    out = torch.nn.functional.interpolate(x, size=tuple(int(s) for s in shape), mode='bilinear', align_corners=False,
                                          antialias=True)
    return out[0, 0].numpy()


# ---------------------------------------------------------------------------------------------------------
# DRRs
# ---------------------------------------------------------------------------------------------------------
def case_drr(prepared, case: str, image_files: Sequence[str], view: str = DEFAULT_VIEW,
             attenuation: str = DEFAULT_ATTENUATION, dataset_class=None) -> np.ndarray:
    """float32 (1, a0, a1, a2) in [-1, 1]: the case's DRR on the preprocessed grid, size 1 on the projection axis."""
    check_view(view, attenuation)
    shape, pre_props = _load_preprocessed(prepared, case, dataset_class)
    try:
        images, props = prepared.plans_manager.image_reader_writer_class().read_images(list(image_files))
    except Exception as e:  # readers raise anything from RuntimeError to ITK exceptions
        raise DesdError(f'cannot read the images of case {case} ({", ".join(image_files)}): '
                        f'{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ""}') from None
    transpose = [int(t) for t in prepared.plans_manager.transpose_forward]
    hu = images[0].transpose(transpose)
    spacing = [float(props['spacing'][t]) for t in transpose]
    hu = hu[tuple(slice(int(lo), int(hi)) for lo, hi in pre_props['bbox_used_for_cropping'])]
    expected = tuple(int(s) for s in pre_props['shape_after_cropping_and_before_resampling'])
    if hu.shape != expected:
        raise DesdError(f'case {case}: the raw image ({", ".join(image_files)}) gives a {hu.shape} crop but was '
                        f'preprocessed from {expected}; the raw data changed since preprocessing. Delete '
                        f'{prepared.data_folder} and run again.')
    axis = transpose.index(projection_axis(direction_from_properties(props), view))
    image = attenuation_image(hu, spacing, axis, attenuation)
    image = _resize_bilinear(image, [s for a, s in enumerate(shape) if a != axis])
    return np.expand_dims(minmax_to_unit(image), axis)[None]


def _save_npy(array: np.ndarray, path: str) -> None:
    atomic_write(path, lambda f: np.save(f, array, allow_pickle=False))


def _write_case(job) -> Tuple[str, int]:
    prepared, case, files, view, attenuation, path, dataset_class = job
    drr = case_drr(prepared, case, files, view, attenuation, dataset_class)
    _save_npy(drr, path)
    return case, drr_projection_axis(drr.shape)


def _legacy_axis(path: str, pkl_file: str) -> Optional[int]:
    """The projection axis of a DRR without a record (written by an older version), if it is a readable DRR written
    after the case was (last) preprocessed; else None."""
    try:
        if os.path.getmtime(path) < os.path.getmtime(pkl_file):
            return None
        drr = np.load(path, mmap_mode='r', allow_pickle=False)
    except Exception:
        return None
    if drr.ndim != 4 or drr.shape[0] != 1 or 1 not in drr.shape[1:]:
        return None
    return drr_projection_axis(drr.shape)


def write_drrs(prepared, view: str = DEFAULT_VIEW, attenuation: str = DEFAULT_ATTENUATION,
               num_processes: int = 1, raw=None, part: int = 0, parts: int = 1) -> Dict[str, str]:
    """Writes the missing DRRs of the share ``part`` of ``parts`` of the cases of `prepared` (current ones are
    reused); returns {case: path} for every case. ``raw``: the raw dataset as already read."""
    require_ct(prepared.dataset_json['channel_names'], prepared.dataset_name)
    check_view(view, attenuation)
    check_share(part, parts)
    raw_cases = (raw if raw is not None else read_raw_dataset(prepared.dataset_name)).cases
    missing = [c for c in prepared.identifiers if c not in raw_cases]
    if missing:
        raise DesdError(f'{prepared.dataset_name}: no raw images for case(s) {", ".join(missing[:5])} in nnUNet_raw; '
                        f'DRRs are cast from the raw HU images.')
    folder = prepared.data_folder
    paths = {case: drr_path(folder, case, view, attenuation) for case in prepared.identifiers}
    ledger = drr_ledger(folder, view, attenuation)
    try:
        records = ledger.read()
        todo = []
        for case in prepared.identifiers:
            if not in_share(case, part, parts):
                continue
            files = [paths[case], join(folder, case + '.pkl')]
            if current(records.get(case), files):
                continue
            axis = _legacy_axis(*files) if case not in records else None
            if axis is None:
                todo.append(case)
            else:  # an older version's DRR: validated once, recorded
                ledger.append(case, {'axis': axis, 'files': file_signature(files)})
        if todo:
            dataset_class = _dataset_class(folder)  # once: it lists the whole folder
            job_prepared = copy.copy(prepared)  # each job gets this without the (long) case lists
            job_prepared.identifiers, job_prepared.drr_files = [], None
            jobs = [(job_prepared, case, raw_cases[case], view, attenuation, paths[case], dataset_class)
                    for case in todo]
            processes = min(default_processes(num_processes), len(jobs) // MIN_CASES_PER_PROCESS)
            for case, axis in run_in_processes(_write_case, jobs, processes, f'DRRs ({view}, {attenuation})'):
                ledger.append(case, {'axis': axis,
                                     'files': file_signature([paths[case], join(folder, case + '.pkl')])})
    finally:
        ledger.close()
    return paths


def drr_axes(prepared, view: str = DEFAULT_VIEW, attenuation: str = DEFAULT_ATTENUATION) -> Dict[str, int]:
    """{case: projection axis} of every case's DRR, read from the ledger; a case without a record (an older
    version's DRR) has its file opened."""
    records = drr_ledger(prepared.data_folder, view, attenuation).read()
    axes = {}
    for case in prepared.identifiers:
        record = records.get(case)
        if record is not None and isinstance(record.get('axis'), int):
            axes[case] = record['axis']
        else:
            axes[case] = drr_projection_axis(load_drr(drr_path(prepared.data_folder, case, view, attenuation),
                                                      mmap=True).shape)
    return axes


def prepare_and_write_drrs(dataset: str, configuration: str = '3d_fullres', plans: Optional[str] = None,
                           planner: str = 'ExperimentPlanner', plans_from: Optional[str] = None,
                           view: str = DEFAULT_VIEW, attenuation: str = DEFAULT_ATTENUATION,
                           num_processes: Optional[int] = None, part: int = 0, parts: int = 1):
    """``desd_drr``'s work: refuses a dataset that is not CT before any planning work, plans and preprocesses it
    where that is not done yet (as desd_pretrain does), then writes its missing DRRs (of share ``part`` of
    ``parts``). -> (the prepared data, {case: path})."""
    raw = read_raw_dataset(dataset)
    require_ct(raw.dataset_json['channel_names'], raw.name)
    prepared = prepare_pool([dataset], configuration, plans, planner, plans_from, num_processes, [raw], part,
                            parts).members[0]
    return prepared, write_drrs(prepared, view, attenuation, num_processes, raw=raw, part=part, parts=parts)


def load_drr(path: str, mmap: bool = False) -> np.ndarray:
    """float32 (1, a0, a1, a2) DRR written by write_drrs (``mmap``: mapped read-only, not read)."""
    try:
        drr = np.load(path, mmap_mode='r' if mmap else None, allow_pickle=False)
    except Exception as e:
        raise DesdError(f'cannot read the DRR {path} ({type(e).__name__}: {e}); delete it and run desd_drr again.') \
            from None
    if drr.ndim != 4 or drr.shape[0] != 1 or not np.issubdtype(drr.dtype, np.floating):
        raise DesdError(f'{path} is not a DRR: holds {drr.dtype} {drr.shape}, expected float (1, a0, a1, a2).')
    return drr.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------------------
# pictures
# ---------------------------------------------------------------------------------------------------------
STANDARD_AXES_LPS = axes_lps(STANDARD_DIRECTION, (0, 1, 2))


def save_drr_png(drr: np.ndarray, spacing: Sequence[float], path: str,
                 axes: Optional[np.ndarray] = None) -> None:
    """Writes a DRR as a grey-scale radiograph PNG (bright = attenuating), with square pixels.

    `drr`: (1, a0, a1, a2) or (a0, a1, a2), [-1, 1], size 1 on the projection axis (the last size-1 axis,
    as in the loader).
    `spacing`: mm per axis a0, a1, a2 (the preprocessed spacing). `axes`: (3, 3), row i = LPS direction of
    axis i (``axes_lps``); default: the standard axial layout (a0 = feet -> head, a1 = anterior -> posterior,
    a2 = right -> left). Orientation rule: of the two in-image axes, the one with the larger |head-foot|
    component is vertical, head at the top; the other runs left to right in the direction its dominant LPS
    coordinate grows: a frontal view shows the patient's left on the right (as a chest film viewed facing the
    patient), a lateral view shows the back on the right. If neither axis has a head-foot component, the
    lower-numbered axis is vertical, index 0 at the top.
    """
    volume = np.asarray(drr, dtype=np.float32)
    volume = volume[0] if volume.ndim == 4 else volume
    if volume.ndim != 3 or 1 not in volume.shape:
        raise DesdError(f'save_drr_png expects a DRR with one axis of size 1, got shape {np.shape(drr)}.')
    axes = STANDARD_AXES_LPS if axes is None else np.asarray(axes, dtype=np.float64)
    projection = drr_projection_axis(volume.shape)
    in_plane = [a for a in range(3) if a != projection]
    superior = np.abs(axes[in_plane, 2])
    vertical = in_plane[int(np.argmax(superior))] if superior.max() > 0 else in_plane[0]
    horizontal = in_plane[0] if vertical == in_plane[1] else in_plane[1]
    image = np.squeeze(volume, projection)
    if vertical > horizontal:
        image = image.T
    if axes[vertical, 2] > 0:  # index grows towards the head: flip so the head is at the top
        image = image[::-1]
    dominant = axes[horizontal, int(np.argmax(np.abs(axes[horizontal])))]
    if dominant < 0:
        image = image[:, ::-1]

    height_mm = image.shape[0] * float(spacing[vertical])
    width_mm = image.shape[1] * float(spacing[horizontal])
    pixel_mm = min(float(spacing[vertical]), float(spacing[horizontal]))
    long_side = max(height_mm, width_mm) / pixel_mm
    pixel_mm *= min(1.0, long_side / PNG_MIN_SIDE) * max(1.0, long_side / PNG_MAX_SIDE)
    size = (max(1, int(round(width_mm / pixel_mm))), max(1, int(round(height_mm / pixel_mm))))
    grey = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize(size, Image.Resampling.BILINEAR)
    pixels = np.clip(np.round((np.asarray(grey) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format='PNG'))


def write_drr_pngs(prepared, paths: Dict[str, str], out_dir: str) -> List[str]:
    """``<out_dir>/<case>.png`` for every DRR in `paths` (case -> .npy), oriented with the case's geometry."""
    os.makedirs(out_dir, exist_ok=True)
    spacing = prepared.configuration_manager.spacing
    transpose = prepared.plans_manager.transpose_forward
    dataset_class = _dataset_class(prepared.data_folder)
    written = []
    for case, path in tqdm(paths.items(), desc='DRR pictures'):
        _, properties = _load_preprocessed(prepared, case, dataset_class)
        png = join(out_dir, case + '.png')
        save_drr_png(load_drr(path), spacing, png, axes_lps(direction_from_properties(properties), transpose))
        written.append(png)
    return written
