"""nnU-Net's fingerprint -> plan -> preprocess, for datasets that may have no labels.

Three routes, all ending in nnU-Net's own blosc2 files under ``nnUNet_preprocessed``:

* unlabelled dataset: body masks (see ``raw.py``) take the place of the labels in the fingerprint and in
  preprocessing; the preprocessed ``dataset.json`` lists them as labels ``{background, body}``.
* labelled dataset: nnU-Net's stock route, untouched; the labels are simply not used by pre-training.
* ``--plans-from X``: dataset X's plans (spacing, normalisation statistics, architecture, patch) are copied
  with nnU-Net's ``move_plans_between_datasets`` under a new plans name, so the encoder transfers 1:1.

Work that is already done (plans, complete preprocessed folder) is reused.
"""
import os
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional

from batchgenerators.utilities.file_and_folder_operations import isdir, isfile, join, load_json, save_json

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.raw import (RawDataset, check_images_and_write_body_masks, read_raw_dataset,
                                    resolve_dataset_name)

BODY_MASK_FOLDER = 'desd_body_masks'


@dataclass
class PreparedData:
    dataset_name: str
    plans_identifier: str
    configuration: str
    plans: dict
    dataset_json: dict
    data_folder: str
    identifiers: List[str]
    plans_source: str
    drr_files: Optional[Dict[str, str]] = None  # case -> DRR file (CADS)

    @property
    def plans_manager(self):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        return PlansManager(self.plans)

    @property
    def configuration_manager(self):
        return self.plans_manager.get_configuration(self.configuration)

    @property
    def label_manager(self):
        return self.plans_manager.get_label_manager(self.dataset_json)

    @property
    def num_input_channels(self) -> int:
        return len(self.dataset_json['channel_names'])


def prepare_pretraining_data(dataset: str, configuration: str = '3d_fullres', plans: Optional[str] = None,
                             planner: str = 'ExperimentPlanner', plans_from: Optional[str] = None,
                             num_processes: int = 1, raw: Optional[RawDataset] = None) -> PreparedData:
    """Plans (or copies ``plans_from``'s plans) and preprocesses ``dataset`` where that is not done yet; ``raw``:
    the dataset as already read."""
    from nnunetv2.paths import nnUNet_preprocessed
    raw = raw if raw is not None else read_raw_dataset(dataset)
    root = join(nnUNet_preprocessed, raw.name)
    os.makedirs(root, exist_ok=True)

    if plans_from is not None:
        source = resolve_dataset_name(plans_from)
        plans_identifier = _copy_plans_from(source, raw, plans or 'nnUNetPlans', configuration)
    else:
        source = raw.name
        plans_identifier = plans or _default_plans_name(planner)
    plans_file = join(root, plans_identifier + '.json')

    if not isfile(plans_file) or not _is_complete(root, plans_file, configuration, raw):
        check_images_and_write_body_masks(raw, None if raw.has_labels else join(root, BODY_MASK_FOLDER),
                                          num_processes)
        if not isfile(plans_file):
            _fingerprint_and_plan(raw, root, planner, plans_identifier, num_processes)
        _write_preprocessed_dataset_json(raw, root)  # after planning: nnU-Net's planner copies the raw one
        plans_dict = _load_plans(plans_file, configuration)
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
        preprocessor = PlansManager(plans_dict).get_configuration(configuration).preprocessor_class(verbose=False)
        preprocessor.run(raw.name, configuration, plans_identifier, num_processes)

    plans_dict = _load_plans(plans_file, configuration)
    data_folder = join(root, plans_dict['configurations'][configuration]['data_identifier'])
    return PreparedData(raw.name, plans_identifier, configuration, plans_dict, load_json(join(root, 'dataset.json')),
                        data_folder, list(raw.cases), source)


def plans_copied_from(source_plans: str, source: str) -> str:
    """The name ``--plans-from`` gives plans copied from dataset ``source`` (DatasetXXX_Name): ``nnUNetPlans_fromXXX``."""
    return f'{source_plans}_from{source[7:10]}'


def find_planner_class(name: str):
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    cls = recursive_find_python_class(join(nnunetv2.__path__[0], 'experiment_planning'), name,
                                      'nnunetv2.experiment_planning')
    if cls is None:
        raise DesdError(f'unknown nnU-Net planner {name!r} (for example ExperimentPlanner, nnUNetPlannerResEncM).')
    return cls


def _default_plans_name(planner: str) -> str:
    import inspect
    return inspect.signature(find_planner_class(planner).__init__).parameters['plans_name'].default


def _load_plans(plans_file: str, configuration: str) -> dict:
    plans = load_json(plans_file)
    if configuration not in plans['configurations']:
        raise DesdError(f'{plans_file} has no configuration {configuration!r}; it has '
                        f'{sorted(plans["configurations"])}.')
    cfg = plans['configurations'][configuration]
    patch = cfg.get('patch_size') or plans['configurations'][cfg.get('inherits_from', '')].get('patch_size')
    if patch is not None and len(patch) != 3:
        raise DesdError(f'pre-training is 3D; configuration {configuration!r} is {len(patch)}D. Use -c 3d_fullres.')
    return plans


def _is_complete(root: str, plans_file: str, configuration: str, raw: RawDataset) -> bool:
    plans = _load_plans(plans_file, configuration)
    folder = join(root, plans['configurations'][configuration]['data_identifier'])
    return isdir(folder) and isfile(join(root, 'dataset.json')) and \
        all(isfile(join(folder, case + '.pkl')) for case in raw.cases)


def _write_preprocessed_dataset_json(raw: RawDataset, root: str) -> None:
    """The dataset.json nnU-Net's preprocessor and trainers read from nnUNet_preprocessed."""
    target = join(root, 'dataset.json')
    if raw.has_labels:
        if not isfile(target):
            shutil.copy(join(raw.folder, 'dataset.json'), target)
    else:
        save_json(_completed_dataset_json(raw, root), target, sort_keys=False)


def _completed_dataset_json(raw: RawDataset, root: str) -> dict:
    """The raw dataset.json plus what labels would have given: body masks as labels {background, body}."""
    ending = raw.dataset_json['file_ending']
    completed = dict(raw.dataset_json)
    completed.update(
        labels={'background': 0, 'body': 1},
        numTraining=len(raw.cases),
        dataset={case: {'images': files, 'label': join(root, BODY_MASK_FOLDER, case + ending)}
                 for case, files in raw.cases.items()},
        desd_note='written by nnunetv2_desd: labels are body masks standing in for missing annotations',
    )
    return completed


def _fingerprint_and_plan(raw: RawDataset, root: str, planner: str, plans_identifier: str,
                          num_processes: int) -> None:
    from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
    dataset_json = raw.dataset_json if raw.has_labels else _completed_dataset_json(raw, root)
    if not isfile(join(root, 'dataset_fingerprint.json')):
        extractor = DatasetFingerprintExtractor(raw.name, num_processes, verbose=False)
        if not raw.has_labels:  # fingerprint over body masks instead of labels
            extractor.dataset_json = dataset_json
            extractor.dataset = dataset_json['dataset']
        extractor.run()
    experiment_planner = find_planner_class(planner)(raw.name, plans_name=plans_identifier)
    experiment_planner.dataset_json = dataset_json
    experiment_planner.plan_experiment()


def _copy_plans_from(source: str, raw: RawDataset, source_plans: str, configuration: str) -> str:
    from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import \
        move_plans_between_datasets
    from nnunetv2.paths import nnUNet_preprocessed
    source_file = join(nnUNet_preprocessed, source, source_plans + '.json')
    if not isfile(source_file):
        raise DesdError(f'--plans-from {source}: {source_file} does not exist. Plan that dataset first: '
                        f'nnUNetv2_plan_and_preprocess -d {source[7:10]} -c {configuration}')
    source_json = load_json(join(nnUNet_preprocessed, source, 'dataset.json'))
    if len(source_json['channel_names']) != raw.num_channels:
        raise DesdError(f'channel-count mismatch: {source} has {len(source_json["channel_names"])} input channel(s) '
                        f'{source_json["channel_names"]}, {raw.name} has {raw.num_channels} '
                        f'{raw.dataset_json["channel_names"]}.')
    _load_plans(source_file, configuration)
    identifier = plans_copied_from(source_plans, source)
    if not isfile(join(nnUNet_preprocessed, raw.name, identifier + '.json')):
        move_plans_between_datasets(source, raw.name, source_plans, identifier)
    return identifier
