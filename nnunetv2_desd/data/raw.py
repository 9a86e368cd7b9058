"""Reading and checking an nnU-Net raw dataset that may have no labels.

nnU-Net's raw layout is kept as it is: ``imagesTr/CASE_XXXX<file_ending>`` and a ``dataset.json`` with
``channel_names`` and ``file_ending``. ``labels`` and ``labelsTr`` are optional here.

Every image is read once, before anything is written, so a corrupt file, a missing channel or a
NaN voxel ends the run with one clear message and leaves nothing half-made. The same pass writes
the body masks that stand in for labels in nnU-Net's fingerprint (CT: voxels above -500 HU; other
modalities: non-zero voxels), so CT normalisation statistics are taken over the body.
"""
import math
import os
import re
import shutil
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Dict, List, Optional, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from tqdm import tqdm

from nnunetv2_desd.common.errors import DesdError

BODY_THRESHOLD_HU = -500.0


@dataclass
class RawDataset:
    name: str
    folder: str
    dataset_json: dict
    cases: Dict[str, List[str]]  # case id -> image file per channel, in channel order

    @property
    def num_channels(self) -> int:
        return len(self.dataset_json['channel_names'])

    @property
    def is_ct(self) -> bool:
        return str(self.dataset_json['channel_names'].get('0', '')).lower() == 'ct'

    @property
    def has_labels(self) -> bool:
        labels_dir = join(self.folder, 'labelsTr')
        ending = self.dataset_json['file_ending']
        return 'labels' in self.dataset_json and all(isfile(join(labels_dir, c + ending)) for c in self.cases)


def resolve_dataset_name(dataset: str) -> str:
    """Dataset id or name -> ``DatasetXXX_Name``, with a clear message when nnU-Net does not know it."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    if not nnUNet_raw or not nnUNet_preprocessed:
        raise DesdError('nnUNet_raw and nnUNet_preprocessed must be set (see nnU-Net\'s set_environment_variables.md).')
    try:
        return str(maybe_convert_to_dataset_name(dataset if str(dataset).startswith('Dataset') else int(dataset)))
    except (RuntimeError, ValueError):
        raise DesdError(f'dataset {dataset!r} not found: no matching DatasetXXX_Name folder in nnUNet_raw '
                        f'({nnUNet_raw}), nnUNet_preprocessed or nnUNet_results.') from None


def read_raw_dataset(dataset: str) -> RawDataset:
    from nnunetv2.paths import nnUNet_raw
    name = resolve_dataset_name(dataset)
    folder = join(nnUNet_raw, name)
    if not isdir(folder):
        raise DesdError(f'{name} has no raw folder {folder}: pre-training reads images from nnUNet_raw.')
    if not isfile(join(folder, 'dataset.json')):
        raise DesdError(f'{folder} has no dataset.json.')
    dataset_json = load_json(join(folder, 'dataset.json'))
    for key in ('channel_names', 'file_ending'):
        if key not in dataset_json:
            raise DesdError(f'{join(folder, "dataset.json")} lacks "{key}".')
    return RawDataset(name, folder, dataset_json, _find_cases(folder, dataset_json))


def _find_cases(folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    images_dir = join(folder, 'imagesTr')
    ending = dataset_json['file_ending']
    files = sorted(f for f in os.listdir(images_dir) if f.endswith(ending)) if isdir(images_dir) else []
    if not files:
        raise DesdError(f'no images: {images_dir} holds no *_0000{ending} files.')
    pattern = re.compile(r'(.+)_(\d{4})' + re.escape(ending))
    channels: Dict[str, Dict[int, str]] = {}
    for f in files:
        m = pattern.fullmatch(f)
        if m is None:
            raise DesdError(f'{join(images_dir, f)} is not named CASE_XXXX{ending} (XXXX = channel index).')
        channels.setdefault(m.group(1), {})[int(m.group(2))] = join(images_dir, f)
    n = len(dataset_json['channel_names'])
    for case, found in channels.items():
        if sorted(found) != list(range(n)):
            raise DesdError(f'channel-count mismatch: case {case} has channels {sorted(found)} but dataset.json '
                            f'declares {n} channel(s) {dict(dataset_json["channel_names"])}.')
    return {case: [found[c] for c in range(n)] for case, found in sorted(channels.items())}


def body_mask(images: np.ndarray, is_ct: bool) -> np.ndarray:
    """(c, x, y, z) images -> (1, x, y, z) uint8 mask of the body (see module docstring)."""
    mask = images[0] > BODY_THRESHOLD_HU if is_ct else np.any(images != 0, axis=0)
    return mask[None].astype(np.uint8)


def _stored_nonfinite(file: str) -> int:
    """NaN/inf voxels as stored in a NIfTI file (0 for other formats); raises if the file is truncated.

    Needed because SimpleITK's NIfTI reader (niftilib) silently turns NaN/inf into 0 and reads a truncated
    .nii.gz as zeros; nibabel reads the stored bytes and raises on a short file.
    """
    if not file.endswith(('.nii', '.nii.gz')):
        return 0
    import nibabel
    voxels = nibabel.load(file).dataobj.get_unscaled()
    return int(voxels.size - np.count_nonzero(np.isfinite(voxels))) if voxels.dtype.kind in 'fc' else 0


def _header(file: str) -> Optional[dict]:
    """Dimension, size, spacing, direction, origin, pixel type and components from the file's header (SimpleITK
    reads it without the voxels); None for a format SimpleITK does not read (nnU-Net's own reader decides)."""
    import SimpleITK as sitk
    reader = sitk.ImageFileReader()
    reader.SetFileName(file)
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return {'dimension': reader.GetDimension(), 'size': reader.GetSize(), 'spacing': reader.GetSpacing(),
            'direction': reader.GetDirection(), 'origin': reader.GetOrigin(),
            'pixel': sitk.GetPixelIDValueAsString(reader.GetPixelID()),
            'components': reader.GetNumberOfComponents()}


def _nifti_problem(file: str) -> Optional[str]:
    """What SimpleITK's NIfTI reader hides: it replaces a zero or NaN voxel size by 1. The stored NIfTI-1 header
    (dim at byte 40, pixdim at byte 76) is read as it is; other headers are left to the readers."""
    import gzip
    import struct
    try:
        with (gzip.open if file.endswith('.gz') else open)(file, 'rb') as f:
            header = f.read(348)
    except (OSError, EOFError) as e:
        return f'{file} cannot be read ({type(e).__name__}: {e})'
    order = next((o for o in '<>' if len(header) == 348 and struct.unpack_from(o + 'i', header)[0] == 348), None)
    if order is None:
        return None  # NIfTI-2 or not NIfTI: the reader decides
    dim = struct.unpack_from(order + '8h', header, 40)
    pixdim = struct.unpack_from(order + '8f', header, 76)
    if not 3 <= dim[0] <= 7 or any(d != 1 for d in dim[4:dim[0] + 1]):
        return f'{file} stores a {dim[0]}D image of shape {dim[1:dim[0] + 1]}; pre-training needs 3D volumes'
    spacing = [float(v) for v in pixdim[1:4]]
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        return f'{file} stores voxel sizes {tuple(spacing)}: every spacing must be finite and positive'
    return None


def geometry_problem(case: str, files: List[str]) -> Optional[str]:
    """The first geometry problem of a case's channel files, read from their headers, or None: a 3D scalar real
    image, at least 2 voxels along every axis, finite positive spacing, a finite orthonormal direction, and the
    same grid in every channel."""
    for file in files:
        problem = _nifti_problem(file) if file.endswith(('.nii', '.nii.gz')) else None
        if problem is not None:
            return problem
    headers = [_header(f) for f in files]
    for file, h in zip(files, headers):
        if h is None:
            continue
        if h['dimension'] != 3:
            return f'{file} is a {h["dimension"]}D image; pre-training needs 3D volumes'
        if h['components'] != 1 or 'complex' in h['pixel'].lower():
            return f'{file} has {h["components"]}-component {h["pixel"]} voxels; expected one real value per voxel'
        if min(h['size']) < 2:
            return f'{file} has size {h["size"]}: a 3D volume needs at least 2 voxels along every axis'
        if not all(math.isfinite(v) and v > 0 for v in h['spacing']):
            return f'{file} has spacing {h["spacing"]}: every spacing must be finite and positive'
        direction = np.asarray(h['direction'], dtype=float).reshape(3, 3)
        if not np.all(np.isfinite(direction)) or not np.allclose(direction @ direction.T, np.eye(3), atol=1e-3):
            return f'{file} has a direction matrix that is not orthonormal: {h["direction"]}'
        if not all(math.isfinite(v) for v in h['origin']):
            return f'{file} has origin {h["origin"]}'
    known = [(f, h) for f, h in zip(files, headers) if h is not None]
    for file, h in known[1:]:
        first_file, first = known[0]
        same = h['size'] == first['size'] and np.allclose(h['spacing'], first['spacing'], rtol=1e-3) and \
            np.allclose(h['direction'], first['direction'], atol=1e-3) and \
            np.allclose(h['origin'], first['origin'], atol=1e-2 * max(first['spacing']))
        if not same:
            return f'case {case}: {file} is not on the grid of {first_file} (size {h["size"]} vs {first["size"]}, ' \
                   f'spacing {h["spacing"]} vs {first["spacing"]})'
    return None


def _check_case(case: str, files: List[str], reader_writer_class, is_ct: bool,
                mask_file: Optional[str]) -> Tuple[str, Optional[str]]:
    """Returns (case, error message or None). Writes the body mask when mask_file is given."""
    problem = geometry_problem(case, files)
    if problem is not None:
        return case, problem
    try:
        images, properties = reader_writer_class().read_images(files)
        stored_bad = [_stored_nonfinite(f) for f in files]
    except Exception as e:  # readers raise anything from RuntimeError to ITK exceptions
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        return case, f'corrupt or unreadable image in case {case} ({", ".join(files)}): {type(e).__name__}: ' \
                     f'{lines[-1] if lines else ""}'
    spacing = [float(v) for v in properties.get('spacing', ())]
    if images.ndim != 4 or len(images) != len(files) or min(images.shape[1:]) < 2 or len(spacing) != 3 or \
            not all(math.isfinite(v) and v > 0 for v in spacing):
        return case, f'case {case} ({", ".join(files)}) reads as shape {tuple(images.shape)} with spacing ' \
                     f'{tuple(spacing)}; expected {len(files)} 3D channel(s) with finite positive spacing'
    bad = ~np.isfinite(images)
    channels = sorted({int(c) for c in np.nonzero(bad.reshape(len(images), -1).any(1))[0]} |
                      {c for c, n in enumerate(stored_bad) if n})
    if channels:
        return case, f'case {case} has {max(int(bad.sum()), sum(stored_bad))} NaN/inf voxels (channel(s) ' \
                     f'{channels}); fix or remove {", ".join(files[c] for c in channels)}.'
    if mask_file is not None:
        mask = body_mask(images, is_ct)
        if not mask.any():
            hint = f' above {BODY_THRESHOLD_HU:g} HU: is it in Hounsfield units?' if is_ct else ' that is non-zero.'
            return case, f'case {case} has no voxel{hint}'
        reader_writer_class().write_seg(mask[0], mask_file, properties)
    return case, None


def check_images_and_write_body_masks(raw: RawDataset, mask_folder: Optional[str],
                                      num_processes: int = 1) -> None:
    """Reads every image; raises DesdError on the first bad case. Masks appear in mask_folder only if all are fine."""
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    first = next(iter(raw.cases.values()))[0]
    try:
        rw_class = determine_reader_writer_from_dataset_json(raw.dataset_json, first, verbose=False)
    except Exception as e:
        raise DesdError(f'nnU-Net has no reader for {first}: {e}') from None
    tmp_folder = None if mask_folder is None else mask_folder + '.partial'
    if tmp_folder is not None:
        shutil.rmtree(tmp_folder, ignore_errors=True)
        os.makedirs(tmp_folder)
    ending = raw.dataset_json['file_ending']
    jobs = [(case, files, rw_class, raw.is_ct, None if tmp_folder is None else join(tmp_folder, case + ending))
            for case, files in raw.cases.items()]
    try:
        if num_processes > 1:
            with get_context('spawn').Pool(num_processes) as pool:
                results = pool.imap_unordered(_check_case_star, jobs)
                _raise_first_error(tqdm(results, total=len(jobs), desc='Checking images'))
        else:
            _raise_first_error(tqdm((_check_case(*j) for j in jobs), total=len(jobs), desc='Checking images'))
    except BaseException:
        if tmp_folder is not None:
            shutil.rmtree(tmp_folder, ignore_errors=True)
        raise
    if mask_folder is not None:
        shutil.rmtree(mask_folder, ignore_errors=True)
        os.replace(tmp_folder, mask_folder)


def _check_case_star(job):
    return _check_case(*job)


def _raise_first_error(results) -> None:
    for _, error in results:
        if error is not None:
            raise DesdError(error)
