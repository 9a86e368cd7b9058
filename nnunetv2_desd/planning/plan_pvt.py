"""nnU-Net plans that build PVT-UNet, CADS's downstream network, derived from a dataset's stock plans.

``nnunetv2_desd.cli.plan_pvt`` (``desd_plan_pvt``) documents what changes (architecture, patch and batch size) and
what stays the stock plans'.
"""
import copy
import json
import os
import shutil
from functools import partial
from typing import List, Optional, Sequence

import numpy as np

from nnunetv2_desd.architectures import memory
from nnunetv2_desd.architectures.pvt_unet import CLASS_NAME, PVTUNet, default_arch_kwargs
from nnunetv2_desd.architectures.pvt_unet import total_stride as stride_product
from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.planning import prepare_pretraining_data
from nnunetv2_desd.data.raw import read_raw_dataset
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER

DEFAULT_PLANS_NAME = 'nnUNetPlans_pvt'
DEFAULT_GPU_MEMORY_GB = 24.0
PROVENANCE_KEY = 'desd_pvt'  # top-level plans entry: what these plans were derived from


def reduce_patch(patch: Sequence[int], stride: Sequence[int], median_shape: Sequence[float], fits) -> List[int]:
    """nnU-Net's patch reduction with a fixed stride: while not fits(patch), take one stride step off the axis
    that is largest relative to the median image (axes already at one stride are kept)."""
    patch = [int(p) for p in patch]
    while not fits(patch):
        ratios = [p / m if p > s else -1.0 for p, s, m in zip(patch, stride, median_shape)]
        axis = int(np.argmax(ratios))
        if ratios[axis] < 0:
            break  # every axis at one stride: the smallest patch this network takes
        patch[axis] -= int(stride[axis])
    return patch


def pvt_configuration(source_cfg: dict, arch_kwargs: dict, patch: Sequence[int], batch_size: int) -> dict:
    """The stock configuration with PVT-UNet's architecture, patch and batch; data_identifier etc. unchanged."""
    cfg = copy.deepcopy(source_cfg)
    cfg.update(patch_size=[int(p) for p in patch], batch_size=int(batch_size),
               architecture={'network_class_name': CLASS_NAME, 'arch_kwargs': copy.deepcopy(arch_kwargs),
                             '_kw_requires_import': []})
    return cfg


def _source_configuration(plans: dict, configuration: str, plans_file: str) -> dict:
    cfg = plans['configurations'].get(configuration)
    if cfg is None:
        raise DesdError(f'{plans_file} has no configuration {configuration!r}; it has {sorted(plans["configurations"])}.')
    if 'inherits_from' in cfg or len(cfg.get('patch_size', ())) != 3:
        raise DesdError(f'configuration {configuration!r} of {plans_file} is not a standalone 3D configuration '
                        f'(PVT-UNet is 3D); use -c 3d_fullres.')
    return cfg


def _copy_ground_truth(dataset_name: str, root: str) -> None:
    """nnU-Net's validation reads ``gt_segmentations``; its preprocessing command copies the labels there, as here
    (labelled datasets only; files already there are kept)."""
    raw = read_raw_dataset(dataset_name)
    if not raw.has_labels:
        return
    ending = raw.dataset_json['file_ending']
    target = os.path.join(root, 'gt_segmentations')
    os.makedirs(target, exist_ok=True)
    for case in raw.cases:
        if not os.path.isfile(os.path.join(target, case + ending)):
            shutil.copyfile(os.path.join(raw.folder, 'labelsTr', case + ending), os.path.join(target, case + ending))


def plan_pvt(dataset: str, source_plans: str = 'nnUNetPlans', plans_name: str = DEFAULT_PLANS_NAME,
             configuration: str = '3d_fullres', gpu_memory_gb: float = DEFAULT_GPU_MEMORY_GB,
             arch_kwargs: Optional[dict] = None, patch_size: Optional[Sequence[int]] = None,
             batch_size: Optional[int] = None, planner: str = 'ExperimentPlanner', num_processes: int = 1) -> str:
    """Writes ``nnUNet_preprocessed/<Dataset>/<plans_name>.json``; returns its path."""

    if plans_name == source_plans:
        raise DesdError(f'-p {plans_name}: choose a plans name other than the source plans -s {source_plans}.')
    if gpu_memory_gb <= 0 or (batch_size is not None and batch_size < 1):
        raise DesdError('--gpu-memory-gb and --batch-size must be positive.')
    arch_kwargs = arch_kwargs or default_arch_kwargs()
    stride = stride_product(arch_kwargs['strides'])
    if patch_size is not None and any(int(p) % s for p, s in zip(patch_size, stride)):
        raise DesdError(f'--patch-size {list(patch_size)} must be a multiple of the total stride {stride}.')

    prepared = prepare_pretraining_data(dataset, configuration, source_plans, planner, None, num_processes)
    root = os.path.dirname(prepared.data_folder)
    _copy_ground_truth(prepared.dataset_name, root)
    source_file = os.path.join(root, source_plans + '.json')
    target_file = os.path.join(root, plans_name + '.json')
    if os.path.isfile(target_file):
        with open(target_file) as f:
            if PROVENANCE_KEY not in json.load(f):
                raise DesdError(f'{target_file} exists and was not written by desd_plan_pvt; not overwriting it. '
                                f'Choose another plans name with -p.')
    source_cfg = _source_configuration(prepared.plans, configuration, source_file)
    channels = prepared.num_input_channels
    median = [float(m) for m in source_cfg['median_image_size_in_voxels']]
    n_cases = len(prepared.identifiers)
    classes = max(2, len(prepared.dataset_json.get('labels', {})))
    build = partial(PVTUNet, channels, classes, **arch_kwargs, deep_supervision=True)

    def estimate(patch):
        return memory.equivalent_feature_map_elements(build, channels, patch)

    if patch_size is None:
        start = [max(s, int(np.floor(p / s + 0.5)) * s) for p, s in zip(source_cfg['patch_size'], stride)]
        patch = reduce_patch(start, stride, median, lambda p: memory.fits(estimate(p), gpu_memory_gb))
    else:
        patch = [int(p) for p in patch_size]
    equivalent = estimate(patch)
    planned_batch = memory.nnunet_batch_size(equivalent, gpu_memory_gb, patch, float(np.prod(median)) * n_cases)
    memory_batch = memory.nnunet_batch_size(equivalent, gpu_memory_gb, patch, float('inf'))
    batch = planned_batch if batch_size is None else int(batch_size)

    plans = copy.deepcopy(prepared.plans)
    plans['plans_name'] = plans_name
    plans['configurations'] = {configuration: pvt_configuration(source_cfg, arch_kwargs, patch, batch)}
    plans[PROVENANCE_KEY] = {
        'source_plans': source_plans, 'source_patch_size': list(source_cfg['patch_size']),
        'source_batch_size': source_cfg['batch_size'], 'gpu_memory_gb': float(gpu_memory_gb),
        'planned_batch_size': planned_batch, 'memory_batch_size': memory_batch,
        'patch_size_given': patch_size is not None,
        'batch_size_given': batch_size is not None,
        'equivalent_feature_map_elements': float(equivalent),
        'note': 'batch size: nnU-Net\'s rule (560e6 feature-map elements for batch 2 in 8 GB) applied to PVT-UNet\'s '
                'saved activations (nnunetv2_desd.architectures.memory); an estimate, not a GPU measurement',
    }
    atomic_write_json(plans, target_file)
    _print_report(prepared.dataset_name, plans, configuration, source_cfg, target_file, equivalent)
    return target_file


def _print_report(dataset_name: str, plans: dict, configuration: str, source_cfg: dict, target_file: str,
                  equivalent: float) -> None:
    cfg = plans['configurations'][configuration]
    kw = cfg['architecture']['arch_kwargs']
    prov = plans[PROVENANCE_KEY]
    n_conv = len(kw['n_conv_per_stage'])
    dataset_id = int(dataset_name[7:10])
    print('\n'.join([
        f'plans {plans["plans_name"]} for {dataset_name} ({configuration}): PVT-UNet',
        f'  encoder:     conv stages {kw["features_per_stage"][:n_conv]}, transformer dims '
        f'{kw["features_per_stage"][n_conv:]}, depths {kw["depths"]}, heads {kw["num_heads"]}, MLP ratios '
        f'{kw["mlp_ratios"]}, SR ratios {kw["sr_ratios"]}; total stride {stride_product(kw["strides"])}',
        f'  patch size:  {cfg["patch_size"]} (stock {source_cfg["patch_size"]})',
        f'  batch size:  {cfg["batch_size"]} (nnU-Net\'s rule: {prov["planned_batch_size"]}; memory alone allows '
        f'{prov["memory_batch_size"]} on {prov["gpu_memory_gb"]:g} GB at {equivalent / 1e6:.0f}M feature-map '
        f'elements per sample, before the 5 % dataset cap; stock U-Net: {prov["source_batch_size"]} for 8 GB)',
        f'  data:        {cfg["data_identifier"]} (shared with {prov["source_plans"]})',
        f'  plans file:  {target_file}',
        f'next: desd_pretrain -d {dataset_id} -m cads -p {plans["plans_name"]}',
        f'      nnUNetv2_train {dataset_id} {configuration} FOLD -tr nnUNetTrainerCADS -p {plans["plans_name"]} '
        f'-pretrained_weights EXPORT',
    ] + ([] if EXT_TRAINER_FOLDER in os.environ.get('nnUNet_extTrainer', '').split(os.pathsep) else
         [f'      (nnUNetv2_train finds nnUNetTrainerCADS when nnUNet_extTrainer lists {EXT_TRAINER_FOLDER})'])))
