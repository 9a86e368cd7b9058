"""Reading and checking an nnU-Net raw dataset that may have no labels.

nnU-Net's raw layout is kept as it is: ``imagesTr/CASE_XXXX<file_ending>`` and a ``dataset.json`` with
``channel_names`` and ``file_ending``. ``labels`` and ``labelsTr`` are optional here.

Every image is read once, in one pass that checks it and writes its body mask; the pass names every bad case
(a corrupt file, a missing channel, a NaN voxel) and resumes where it stopped. The body masks stand in for labels
in nnU-Net's fingerprint (CT: voxels above -500 HU; other modalities: non-zero voxels), so CT normalisation
statistics are taken over the body.
"""
import gzip
import json
import math
import os
import re
import struct
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join
from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.workers import run_in_processes
from nnunetv2_desd.data.ledger import Ledger, current, file_signature, in_share

BODY_THRESHOLD_HU = -500.0
CHECK_LEDGER = 'desd_checks'


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
    if not nnUNet_raw or not nnUNet_preprocessed:
        raise DesdError('nnUNet_raw and nnUNet_preprocessed must be set (see nnU-Net\'s set_environment_variables.md).')
    try:
        return str(maybe_convert_to_dataset_name(dataset if str(dataset).startswith('Dataset') else int(dataset)))
    except (RuntimeError, ValueError):
        raise DesdError(f'dataset {dataset!r} not found: no matching DatasetXXX_Name folder in nnUNet_raw '
                        f'({nnUNet_raw}), nnUNet_preprocessed or nnUNet_results.') from None


def read_raw_dataset(dataset: str) -> RawDataset:
    name = resolve_dataset_name(dataset)
    folder = join(nnUNet_raw, name)
    if not isdir(folder):
        raise DesdError(f'{name} has no raw folder {folder}: pre-training reads images from nnUNet_raw.')
    if not isfile(join(folder, 'dataset.json')):
        raise DesdError(f'{folder} has no dataset.json.')
    dataset_json = read_dataset_json(join(folder, 'dataset.json'))
    return RawDataset(name, folder, dataset_json, _find_cases(folder, dataset_json))


def _channel_names_ok(value) -> bool:
    return isinstance(value, dict) and len(value) > 0 and \
        sorted(value) == [str(i) for i in range(len(value))] and all(isinstance(v, str) for v in value.values())


def _labels_ok(value) -> bool:
    def label(v):
        return (isinstance(v, int) and not isinstance(v, bool)) or \
            (isinstance(v, list) and len(v) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in v))
    return isinstance(value, dict) and all(isinstance(k, str) and label(v) for k, v in value.items())


# dataset.json field -> (required, check, what it must be): every field pre-training reads, checked in one place
DATASET_JSON_FIELDS = {
    'channel_names': (True, _channel_names_ok, 'an object {"0": "CT", "1": ...} with keys "0".."N-1" and string names'),
    'file_ending': (True, lambda v: isinstance(v, str) and v.startswith('.') and len(v) > 1,
                    'a string such as ".nii.gz"'),
    'labels': (False, _labels_ok, 'an object {"background": 0, "name": 1, ...} of integer labels (or lists of '
                                  'them, for regions)'),
}


def read_dataset_json(file: str) -> dict:
    """A raw dataset.json, read and checked against DATASET_JSON_FIELDS; DesdError (one line) for the first problem."""
    try:
        with open(file) as f:
            content = json.load(f)
    except (OSError, ValueError) as e:
        raise DesdError(f'{file} is not valid JSON ({type(e).__name__}: {e}).') from None
    if not isinstance(content, dict):
        raise DesdError(f'{file} holds a {type(content).__name__}, not a JSON object.')
    for key, (required, ok, what) in DATASET_JSON_FIELDS.items():
        if key not in content:
            if required:
                raise DesdError(f'{file} lacks "{key}": it must be {what}.')
        elif not ok(content[key]):
            raise DesdError(f'{file}: "{key}" is {json.dumps(content[key])[:120]}; it must be {what}.')
    return content


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


def _header(file: str) -> Optional[dict]:
    """Dimension, size, spacing, direction, origin, pixel type and components from the file's header (SimpleITK
    reads it without the voxels); None for a format SimpleITK does not read (nnU-Net's own reader decides)."""
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


def _reader_for(files: List[str], reader_writer_class):
    """The reader that decodes each voxel once and shows NaN/inf as stored: nibabel for NIfTI (SimpleITK's NIfTI
    reader turns NaN into 0 and reads a truncated .nii.gz as zeros; nibabel raises), else nnU-Net's reader."""
    if all(f.endswith(('.nii', '.nii.gz')) for f in files):
        return NibabelIO
    return reader_writer_class


def check_case(case: str, files: List[str], reader_writer_class, is_ct: bool,
               mask_file: Optional[str]) -> Tuple[str, Optional[str]]:
    """Reads a case once; returns (case, problem or None). Writes its body mask (atomically) when mask_file is
    given and the case is fine."""
    problem = geometry_problem(case, files)
    if problem is not None:
        return case, problem
    reader = _reader_for(files, reader_writer_class)
    try:
        images, properties = reader().read_images(files)
    except Exception as e:  # readers raise anything from RuntimeError to ITK exceptions
        lines = [l.strip() for l in str(e).splitlines() if l.strip()]
        return case, f'corrupt or unreadable image ({", ".join(files)}): {type(e).__name__}: ' \
                     f'{lines[-1] if lines else ""}'
    spacing = [float(v) for v in properties.get('spacing', ())]
    if images.ndim != 4 or len(images) != len(files) or min(images.shape[1:]) < 2 or len(spacing) != 3 or \
            not all(math.isfinite(v) and v > 0 for v in spacing):
        return case, f'reads as shape {tuple(images.shape)} with spacing {tuple(spacing)} ({", ".join(files)}); ' \
                     f'expected {len(files)} 3D channel(s) with finite positive spacing'
    bad = ~np.isfinite(images)
    if bad.any():
        channels = [int(c) for c in np.nonzero(bad.reshape(len(images), -1).any(1))[0]]
        return case, f'{int(bad.sum())} NaN/inf voxels in channel(s) {channels} ' \
                     f'({", ".join(files[c] for c in channels)})'
    if mask_file is not None:
        mask = body_mask(images, is_ct)
        if not mask.any():
            return case, (f'no voxel above {BODY_THRESHOLD_HU:g} HU: is it in Hounsfield units?' if is_ct else
                          'no voxel is non-zero')
        staged = os.path.join(os.path.dirname(mask_file), f'.partial-{os.getpid()}-' + os.path.basename(mask_file))
        reader().write_seg(mask[0], staged, properties)
        os.replace(staged, mask_file)
    return case, None


def _check_job(job) -> Tuple[str, Optional[str], list]:
    case, files = job[0], job[1]
    case, problem = check_case(*job)
    return case, problem, file_signature(files)


def check_cases(raw: RawDataset, mask_folder: Optional[str], num_processes: int = 1, part: int = 0,
                parts: int = 1) -> Dict[str, str]:
    """Checks every case of the share ``part`` of ``parts`` that is not checked yet (writing its body mask into
    ``mask_folder`` when given); returns {case: problem} of every bad case known: of the share, and of the other
    shares' cases checked already.

    Results are kept in a ledger (``desd_checks`` in the dataset's preprocessed folder): a case is read again only
    when its files changed or its mask is missing, so an interrupted check goes on where it stopped.
    """
    first = next(iter(raw.cases.values()))[0]
    try:
        rw_class = determine_reader_writer_from_dataset_json(raw.dataset_json, first, verbose=False)
    except Exception as e:
        raise DesdError(f'nnU-Net has no reader for {first}: {e}') from None
    ledger = Ledger(join(nnUNet_preprocessed, raw.name, CHECK_LEDGER))
    records = ledger.read()
    ending = raw.dataset_json['file_ending']
    if mask_folder is not None:
        os.makedirs(mask_folder, exist_ok=True)
    problems, jobs = {}, []
    for case, files in raw.cases.items():
        record = records.get(case)
        if not in_share(case, part, parts):
            if current(record, files) and record['problem'] is not None:
                problems[case] = record['problem']
            continue
        mask_file = None if mask_folder is None else join(mask_folder, case + ending)
        if current(record, files):
            if record['problem'] is not None:
                problems[case] = record['problem']
                continue
            if mask_file is None or isfile(mask_file):
                continue
        jobs.append((case, files, rw_class, raw.is_ct, mask_file))
    try:
        for case, problem, signature in run_in_processes(_check_job, jobs, num_processes,
                                                         f'Checking images of {raw.name}'):
            ledger.append(case, {'files': signature, 'problem': problem})
            if problem is not None:
                problems[case] = problem
    finally:
        ledger.close()
    return problems


def refuse_bad_cases(raws: List[RawDataset], problems: Dict[str, Dict[str, str]], exclude: bool) -> None:
    """One DesdError naming the bad cases of every dataset (``problems``: dataset name -> {case: problem}), unless
    ``exclude`` (--exclude-bad-cases) leaves them out."""
    if not exclude and any(problems.values()):
        raise DesdError(' '.join(bad_cases_message(raw, problems[raw.name], '--exclude-bad-cases')
                                 for raw in raws if problems.get(raw.name)))


def bad_cases_message(raw: RawDataset, problems: Dict[str, str], option: str) -> str:
    """One line naming every bad case, the count, and the option that leaves them out."""
    listed = '; '.join(f'{case}: {problem}' for case, problem in sorted(problems.items()))
    return (f'{len(problems)} of {len(raw.cases)} cases of {raw.name} cannot be used: {listed}. Fix or remove them, '
            f'or leave them out with {option}.')
