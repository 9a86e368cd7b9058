"""Plans for a downstream dataset aligned 1:1 with a pre-trained export, from nnU-Net's planner at its spacing.

``nnunetv2_desd.cli.plan_like_pretrained`` (``desd_plan_like_pretrained``) documents what is taken from the export
and what stays the planner's.
"""
import contextlib
import copy
import inspect
import io
import json
import os
import re
import shlex
import shutil
import traceback
from typing import List, Optional, Sequence

import numpy as np
from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
from nnunetv2.utilities.json_export import recursive_fix_for_json_export

from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import NNSSL_FORMAT, ExportRecord
from nnunetv2_desd.common.pretrained_weights import read_export
from nnunetv2_desd.data.planning import find_planner_class
from nnunetv2_desd.data.raw import read_raw_dataset, resolve_dataset_name
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER, TRAINER_FOR_METHOD

DEFAULT_PLANS_NAME = 'nnUNetPlans_pretrained'
PROVENANCE_KEY = 'desd_pretrained'  # top-level plans entry naming the export these plans were made for


def total_stride(arch_kwargs: dict) -> List[int]:
    """Per-axis product of the encoder's strides (the factor every patch axis must be divisible by)."""
    strides = [[s] * 3 if isinstance(s, int) else s for s in arch_kwargs['strides']]
    return [int(v) for v in np.prod(np.array(strides, dtype=np.int64), axis=0)]


def round_patch_to_stride(patch: Sequence[int], stride: Sequence[int]) -> List[int]:
    """Each axis to the nearest multiple of its stride (halves round up), at least one stride."""
    return [max(int(s), int(np.floor(p / s + 0.5)) * int(s)) for p, s in zip(patch, stride)]


def inverse_permutation(perm: Sequence[int]) -> List[int]:
    return [int(i) for i in np.argsort(perm)]


def _reorder(values, from_forward: Sequence[int], to_forward: Sequence[int]) -> list:
    """Per-axis values in one transposed axis order -> the same values in another transposed order."""
    original = [values[i] for i in inverse_permutation(from_forward)]
    return [original[i] for i in to_forward]


# -------------------------------------------------------------------------------------------------------- dataset
def _resolve_raw_dataset(dataset: str):
    name = resolve_dataset_name(dataset)
    if not re.fullmatch(r'Dataset\d{3}_.+', name):
        raise DesdError(f'{name!r} is not an nnU-Net dataset name (DatasetXXX_Name).')
    if not os.path.isdir(os.path.join(nnUNet_raw, name)):
        raise DesdError(f'{name} has no raw dataset in nnUNet_raw ({os.path.join(nnUNet_raw, name)}): planning and '
                        f'preprocessing read the images and labels from there.')
    raw = read_raw_dataset(name)
    if not raw.has_labels:
        raise DesdError(f'{name} is not labelled (dataset.json needs "labels" and labelsTr one file per case): '
                        f'fine-tuning needs labels.')
    return raw


def _planner_kwargs(planner_class, plans_name: str, spacing: List[float], gpu_memory_gb: Optional[float]) -> dict:
    accepted = inspect.signature(planner_class.__init__).parameters
    if 'overwrite_target_spacing' not in accepted:
        raise DesdError(f'planner {planner_class.__name__} takes no overwrite_target_spacing, so it cannot plan at '
                        f'the export\'s spacing.')
    kwargs = {'overwrite_target_spacing': [float(s) for s in spacing]}  # nnU-Net asserts python floats
    if 'plans_name' in accepted:
        kwargs['plans_name'] = plans_name
    if gpu_memory_gb is not None:
        if 'gpu_memory_target_in_gb' in accepted:
            kwargs['gpu_memory_target_in_gb'] = float(gpu_memory_gb)
        else:
            print(f'note: planner {planner_class.__name__} takes no GPU memory target; --gpu-memory-gb ignored.')
    return kwargs


def _reason(error: BaseException) -> str:
    """One line: the error's message, or for a bare assert the source line that failed."""
    lines = [l.strip() for l in str(error).splitlines() if l.strip()]
    if not lines:
        frames = traceback.extract_tb(error.__traceback__)
        lines = [f'{frames[-1].line} ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno})' if frames else '']
    return f'{type(error).__name__}: {lines[0]}'


def _run_planner(planner_class, name: str, kwargs: dict) -> dict:
    """plan_experiment() without its own plans file: returns the plans dict, nnU-Net's printout hidden."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            planner = planner_class(name, **kwargs)
            planner.save_plans = lambda plans: None  # we write only our own file
            plans = copy.deepcopy(planner.plan_experiment())
    except DesdError:
        raise
    except Exception as e:
        raise DesdError(f'nnU-Net planner {planner_class.__name__} failed on {name} at target spacing '
                        f'{kwargs["overwrite_target_spacing"]}: {_reason(e)}') from e
    recursive_fix_for_json_export(plans)
    return plans


# ---------------------------------------------------------------------------------------------------------- plans
def plans_like_export(planned: dict, record: ExportRecord, export_file: str, file_sha256: str, plans_name: str,
                      configuration: str, dataset_json: dict) -> dict:
    """The planner's plans for one configuration, aligned with the export (see ``desd_plan_like_pretrained -h``).
    Pure function."""
    configs = planned['configurations']
    cfg = configs.get(configuration)
    if cfg is None:
        made = sorted(k for k, v in configs.items() if len(v.get('patch_size', ())) == 3)
        raise DesdError(f'the planner made no configuration {configuration!r} for {planned["dataset_name"]} '
                        f'(3D configurations it made: {made}); use -c 3d_fullres.')
    if 'inherits_from' in cfg:
        raise DesdError(f'configuration {configuration!r} is a cascade stage (inherits from '
                        f'{cfg["inherits_from"]!r}); the export fits a standalone 3D configuration: use -c 3d_fullres.')
    if len(cfg.get('patch_size', ())) != 3:
        raise DesdError(f'configuration {configuration!r} is {len(cfg.get("patch_size", ()))}D; the export is a 3D '
                        f'network: use -c 3d_fullres.')
    cfg = copy.deepcopy(cfg)
    export_forward = [int(i) for i in record.transpose_forward]
    planner_forward = [int(i) for i in planned['transpose_forward']]
    export_spacing = [float(s) for s in record.spacing]
    planned_spacing = _reorder([float(s) for s in cfg['spacing']], planner_forward, export_forward)
    if not np.allclose(planned_spacing, export_spacing, rtol=1e-4, atol=1e-6):
        raise DesdError(f'the planner put configuration {configuration!r} at spacing {planned_spacing}, not at the '
                        f'export\'s {export_spacing} (only 3d_fullres follows the target spacing); use -c 3d_fullres.')

    architecture = copy.deepcopy(record.architecture)
    architecture['_kw_requires_import'] = list(architecture.get('_kw_requires_import', []))
    stride = total_stride(architecture['arch_kwargs'])
    planner_patch = _reorder([int(p) for p in cfg['patch_size']], planner_forward, export_forward)
    nnssl = record.format == NNSSL_FORMAT
    if nnssl:  # nnU-Net main's route: the checkpoint's recommended downstream patch
        planner_patch = [int(p) for p in record.recommended_downstream_patchsize]
    cfg.update(
        data_identifier=f'{plans_name}_{configuration}',
        patch_size=round_patch_to_stride(planner_patch, stride),
        median_image_size_in_voxels=_reorder(list(cfg['median_image_size_in_voxels']), planner_forward,
                                             export_forward),
        spacing=export_spacing,
        architecture=architecture,
    )
    plans = copy.deepcopy(planned)
    same_channels = _channels(dataset_json['channel_names']) == _channels(record.channel_names)
    if nnssl:  # the normalisation the checkpoint was trained with, for every channel (as nnU-Net main does)
        cfg['normalization_schemes'] = [record.normalization_schemes[0]] * len(dataset_json['channel_names'])
        cfg['use_mask_for_norm'] = [False] * len(dataset_json['channel_names'])
    elif same_channels:
        cfg['normalization_schemes'] = list(record.normalization_schemes)
        cfg['use_mask_for_norm'] = [bool(u) for u in record.use_mask_for_norm]
        plans['foreground_intensity_properties_per_channel'] = copy.deepcopy(
            record.foreground_intensity_properties_per_channel)
    for key in ('original_median_spacing_after_transp', 'original_median_shape_after_transp'):
        if key in plans:
            plans[key] = _reorder(list(plans[key]), planner_forward, export_forward)
    plans.update(
        plans_name=plans_name,
        transpose_forward=export_forward,
        transpose_backward=inverse_permutation(export_forward),
        configurations={configuration: cfg},
    )
    plans[PROVENANCE_KEY] = {
        'file': os.path.abspath(export_file), 'file_sha256': file_sha256, 'content_sha256': record.content_sha256,
        'method': record.method, 'source_dataset': record.source_dataset, 'plans_name': record.plans_name,
    }
    return plans


def _channels(channel_names: Optional[dict]) -> dict:
    """Channel index -> name; {} where unknown (nnssl checkpoints do not record them)."""
    return {str(k): str(v) for k, v in (channel_names or {}).items()}


@contextlib.contextmanager
def _undo_on_error(folder: str, kept_files: Sequence[str]):
    """On any error, removes what appeared in ``folder`` (top level) and restores ``kept_files`` byte for byte."""
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    saved = {}
    for f in kept_files:
        if os.path.isfile(os.path.join(folder, f)):
            with open(os.path.join(folder, f), 'rb') as fh:
                saved[f] = fh.read()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif os.path.isdir(folder):
            for entry in set(os.listdir(folder)) - before:
                path = os.path.join(folder, entry)
                shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else os.remove(path)
            for f, data in saved.items():
                with open(os.path.join(folder, f), 'wb') as fh:
                    fh.write(data)
        raise


# ----------------------------------------------------------------------------------------------------------- main
def plan_like_pretrained(dataset: str, export_file: str, plans_name: str = DEFAULT_PLANS_NAME,
                         configuration: str = '3d_fullres', planner: str = 'ExperimentPlanner',
                         gpu_memory_gb: Optional[float] = None, preprocess: bool = True,
                         num_processes: int = 2) -> str:
    """Writes ``nnUNet_preprocessed/<Dataset>/<plans_name>.json`` (and its preprocessed data); returns its path."""

    if not re.fullmatch(r'[A-Za-z0-9_.-]+', plans_name) or plans_name.startswith('.'):
        raise DesdError(f'-p {plans_name!r}: a plans name is a file name without folders or spaces.')
    if num_processes < 1:
        raise DesdError(f'-np {num_processes}: need at least 1 process.')
    export_file = os.path.abspath(export_file)
    export = read_export(export_file)
    record = export.record
    raw = _resolve_raw_dataset(dataset)
    planner_class = find_planner_class(planner)
    root = os.path.join(nnUNet_preprocessed, raw.name)
    plans_file = os.path.join(root, plans_name + '.json')
    if os.path.isfile(plans_file):
        try:
            with open(plans_file) as f:
                ours = PROVENANCE_KEY in json.load(f)
        except ValueError:
            ours = False
        if not ours:
            raise DesdError(f'{plans_file} exists and was not written by desd_plan_like_pretrained; not overwriting '
                            f'it. Choose another plans name with -p.')
    digest = export.file_sha256
    planner_kwargs = _planner_kwargs(planner_class, plans_name, record.spacing, gpu_memory_gb)
    dataset_id = int(raw.name[7:10])

    with _undo_on_error(root, ('dataset.json', plans_name + '.json')):
        if not os.path.isfile(os.path.join(root, 'dataset_fingerprint.json')):
            _extract_fingerprint(raw.name, dataset_id, num_processes)
        print(f'planning {raw.name} with {planner_class.__name__} at the export\'s spacing {record.spacing}')
        planned = _run_planner(planner_class, raw.name, planner_kwargs)
        plans = plans_like_export(planned, record, export_file, digest, plans_name, configuration, raw.dataset_json)
        atomic_write_json(plans, plans_file)
        if preprocess:
            _preprocess(raw.name, dataset_id, plans_name, configuration, num_processes)
    _print_report(plans, planned, record, raw, configuration, plans_file, preprocess)
    return plans_file


def _extract_fingerprint(name: str, dataset_id: int, num_processes: int) -> None:
    # here: imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprint_dataset
    print(f'extracting the dataset fingerprint of {name}')
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            extract_fingerprint_dataset(dataset_id, num_processes=num_processes, check_dataset_integrity=False,
                                        clean=True, verbose=False)
    except Exception as e:
        raise DesdError(f'fingerprint extraction of {name} failed: {_reason(e)}') from e


def _preprocess(name: str, dataset_id: int, plans_name: str, configuration: str, num_processes: int) -> None:
    # here: imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset
    print(f'preprocessing {name} ({configuration}, {num_processes} process(es))')
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            preprocess_dataset(dataset_id, plans_identifier=plans_name, configurations=(configuration,),
                               num_processes=(num_processes,), verbose=False)
    except Exception as e:
        raise DesdError(f'preprocessing {name} with plans {plans_name} failed: {_reason(e)}') from e


def _print_report(plans: dict, planned: dict, record: ExportRecord, raw, configuration: str, plans_file: str,
                  preprocessed: bool) -> None:
    cfg = plans['configurations'][configuration]
    prov = plans[PROVENANCE_KEY]
    arch = cfg['architecture']
    kw = arch['arch_kwargs']
    planner_patch = _reorder(planned['configurations'][configuration]['patch_size'], planned['transpose_forward'],
                             plans['transpose_forward'])
    if record.format == NNSSL_FORMAT:
        norm = f"the nnssl checkpoint's ({record.normalization_schemes[0]} for every channel)"
    elif _channels(raw.dataset_json['channel_names']) == _channels(record.channel_names):
        norm = "the export's"
    else:
        norm = (f"the dataset's own: its channels {_channels(raw.dataset_json['channel_names'])} differ from the "
                f"export's {_channels(record.channel_names)}")
        if len(raw.dataset_json['channel_names']) != int(record.num_input_channels):
            norm += f"; the export's first convolution takes {record.num_input_channels} channel(s)"
    trainer = TRAINER_FOR_METHOD.get(str(record.method).lower(), TRAINER_FOR_METHOD['desd'])
    lines = [
        f'plans {plans["plans_name"]} for {raw.name} ({configuration}) like the pre-trained export:',
        f'  export:        {prov["file"]} (method {prov["method"]}, pre-trained on {prov["source_dataset"]}, '
        f'sha256 {prov["file_sha256"][:12]})',
        f'  architecture:  {arch["network_class_name"].split(".")[-1]}, {kw.get("n_stages")} stages, features '
        f'{kw.get("features_per_stage")}, total stride {total_stride(kw)}',
        f'  spacing:       {cfg["spacing"]} (transpose {plans["transpose_forward"]})',
        f'  patch size:    {cfg["patch_size"]} (planner: {planner_patch}), batch size {cfg["batch_size"]}',
        f'  normalisation: {cfg["normalization_schemes"]} ({norm})',
        f'  plans file:    {plans_file}',
    ]
    if preprocessed:
        lines.append(f'  preprocessed:  {os.path.join(os.path.dirname(plans_file), cfg["data_identifier"])}')
    dataset_id = int(raw.name[7:10])
    lines.append(f'next: nnUNetv2_train {dataset_id} {configuration} FOLD -tr {trainer} -p {plans["plans_name"]} '
                 f'-pretrained_weights {shlex.quote(prov["file"])}')
    ext = os.environ.get('nnUNet_extTrainer', '')
    if EXT_TRAINER_FOLDER not in ext.split(os.pathsep):
        lines.append(f'      (nnUNetv2_train finds {trainer} when nnUNet_extTrainer lists {EXT_TRAINER_FOLDER})')
    print('\n'.join(lines))
