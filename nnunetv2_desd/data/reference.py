"""ReFs's reference dataset: a labelled dataset preprocessed with the pre-training plans, read by nnU-Net's loader.

The reference branch runs on the pre-training network and patch, so what must agree is the preprocessing that
made the voxels (``preprocessing_match``); its own architecture and patch size play no part. The plans file looked
for in ``nnUNet_preprocessed/<reference>/`` is the pre-training plans' name, then the name of the plans they
were copied from (``nnUNetPlans_from502`` -> ``nnUNetPlans``); the first one that agrees is used, anything else
is refused with what differs and the command that fixes it.
"""
import re
from typing import Dict, List, Optional, Sequence

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json
from nnunetv2.configuration import ANISO_THRESHOLD
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.loading import WorkerSeeded, start_augmenter
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences
from nnunetv2_desd.data.planning import PreparedData
from nnunetv2_desd.data.raw import resolve_dataset_name

REFERENCE_OVERSAMPLE_FOREGROUND = 0.33  # nnUNetTrainer's default


def copied_plans_name(plans_identifier: str) -> str:
    """The plans name ``--plans-from`` copied from: ``nnUNetPlans_from502`` -> ``nnUNetPlans``."""
    return re.sub(r'_from\d{3}$', '', plans_identifier)


def reference_plans_candidates(plans_identifier: str) -> List[str]:
    return list(dict.fromkeys([plans_identifier, copied_plans_name(plans_identifier)]))


def open_reference(reference: str, pretraining_plans: dict, plans_identifier: str, configuration: str,
                   num_input_channels: int, plans_source: Optional[str] = None) -> PreparedData:
    """The reference dataset as preprocessed with plans that agree with ``pretraining_plans``; DesdError with
    what differs and the fix otherwise. Reads only.

    ``plans_identifier``: the pre-training plans' name; ``plans_source``: the dataset they were copied from
    (named in the fix).
    """
    name = resolve_dataset_name(reference)
    root = join(nnUNet_preprocessed, name)
    candidates = reference_plans_candidates(plans_identifier)
    source_plans = copied_plans_name(plans_identifier)
    ident = name[7:10]
    fix = (f'Fix: pre-train with the reference\'s own plans (-m refs --reference {ident} uses them by default: '
           f'leave --plans-from out), or preprocess {name} with the pre-training plans: ')
    if plans_source and plans_source != name:
        fix += (f'nnUNetv2_move_plans_between_datasets -s {plans_source[7:10]} -t {ident} -sp {source_plans} '
                f'-tp {plans_identifier} && ')
    fix += f'nnUNetv2_preprocess -d {ident} -plans_name {plans_identifier} -c {configuration}'
    found = [c for c in candidates if isfile(join(root, c + '.json'))]
    if not found:
        if not isdir(root) or not isfile(join(root, 'dataset.json')):
            raise DesdError(f'reference {name} is not preprocessed ({root} has no plans): run '
                            f'nnUNetv2_plan_and_preprocess -d {ident} -c {configuration}, then pre-train with '
                            f'--reference {ident}.')
        raise DesdError(f'reference {name} is not preprocessed with the pre-training plans \'{plans_identifier}\': '
                        f'none of {", ".join(c + ".json" for c in candidates)} is in {root}. {fix}')
    refusals = []
    for plans_name in found:
        plans = load_json(join(root, plans_name + '.json'))
        differences = preprocessing_differences(pretraining_plans, plans, configuration)
        if differences:
            refusals.append(f'its plans \'{plans_name}\' differ in ' + '; '.join(differences))
            continue
        dataset_json = load_json(join(root, 'dataset.json'))
        if 'desd_note' in dataset_json:  # an unlabelled pool: its "labels" are body masks
            raise DesdError(f'reference {name} has no labels (its preprocessed labels are body masks written for '
                            f'pre-training); give a labelled dataset as --reference.')
        if len(dataset_json['channel_names']) != num_input_channels:
            raise DesdError(f'reference {name} has {len(dataset_json["channel_names"])} input channel(s) '
                            f'{dataset_json["channel_names"]}, the pre-training data {num_input_channels}.')
        folder = join(root, plans['configurations'][configuration]['data_identifier'])
        identifiers = infer_dataset_class(folder).get_identifiers(folder) if isdir(folder) else []
        if not identifiers:
            raise DesdError(f'reference {name}: {folder} holds no preprocessed cases; run nnUNetv2_preprocess -d '
                            f'{ident} -plans_name {plans_name} -c {configuration}.')
        return PreparedData(name, plans_name, configuration, plans, dataset_json, folder, sorted(identifiers),
                            plans_source=name)
    raise DesdError(f'reference {name} is not preprocessed with the pre-training plans \'{plans_identifier}\': '
                    + '; '.join(refusals) + f'. {fix}')


def augmentation_geometry(patch_size: Sequence[int]):
    """nnU-Net's 3D rule (``configure_rotation_dummyDA_mirroring_and_inital_patch_size``): rotation +-30 deg, or
    +-180 deg in-plane only (dummy 2D) for anisotropic patches; the larger patch that rotation and scaling need;
    mirroring on all axes. Returns (rotation, dummy_2d, initial_patch_size, mirror_axes)."""
    patch_size = [int(p) for p in patch_size]
    dummy_2d = max(patch_size) / patch_size[0] > ANISO_THRESHOLD
    rotation = (-np.pi, np.pi) if dummy_2d else (-np.pi / 6, np.pi / 6)
    initial = [int(p) for p in get_patch_size(patch_size, rotation, rotation, rotation, (0.85, 1.25))]
    if dummy_2d:
        initial[0] = patch_size[0]
    return rotation, dummy_2d, initial, (0, 1, 2)


class ReferenceLoader(WorkerSeeded, nnUNetDataLoader):
    """nnU-Net's loader, its torch generator seeded in each worker."""


def build_reference_loader(reference: PreparedData, patch_size: Sequence[int], batch_size: int,
                           deep_supervision_scales: Sequence[Sequence[float]], num_workers: int,
                           pin_memory: bool = False, seeds: Optional[Sequence[int]] = None, ordered: bool = False):
    """Infinite iterator of nnU-Net training batches of the reference: {'data': (B, C, *patch), 'target': one
    (B, 1, *patch * scale) label map per deep-supervision output, 'keys'}; nnU-Net's loader (a third of the
    samples around foreground), its training augmentation and its deep-supervision targets."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # heavy: imported when ReFs runs
    lm, cm = reference.label_manager, reference.configuration_manager
    rotation, dummy_2d, initial_patch, mirror_axes = augmentation_geometry(patch_size)
    transforms = nnUNetTrainer.get_training_transforms(
        [int(p) for p in patch_size], rotation, [list(s) for s in deep_supervision_scales], mirror_axes, dummy_2d,
        use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False, foreground_labels=lm.foreground_labels,
        regions=lm.foreground_regions if lm.has_regions else None, ignore_label=lm.ignore_label)
    dataset = infer_dataset_class(reference.data_folder)(reference.data_folder, reference.identifiers)
    loader = ReferenceLoader(dataset, batch_size, initial_patch, [int(p) for p in patch_size], lm,
                              oversample_foreground_percent=REFERENCE_OVERSAMPLE_FOREGROUND, transforms=transforms)
    return start_augmenter(loader, num_workers, seeds, pin_memory, ordered)


class ViewAndReferenceBatches:
    """Pairs the SSL view loader with the reference loader: each batch is the view batch plus
    ``'reference'``: the reference batch."""

    def __init__(self, views, reference):
        self.views, self.reference = views, reference

    def __iter__(self):
        return self

    def __next__(self) -> Dict:
        return dict(next(self.views), reference=next(self.reference))

    def _finish(self) -> None:
        for loader in (self.views, self.reference):
            if hasattr(loader, '_finish'):
                loader._finish()
