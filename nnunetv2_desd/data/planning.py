"""nnU-Net's fingerprint -> plan -> preprocess, for datasets that may have no labels.

Every dataset of a pool ends in nnU-Net's own blosc2 files. An unlabelled dataset's body masks (``raw.py``) stand in
for labels (``{background, body}``); a labelled one goes nnU-Net's stock way. The run's plans are the first
dataset's, or ``--plans-from X``'s, copied to the others with ``move_plans_between_datasets``. Images are checked
once (``raw.check_cases``) and preprocessed case by case (``preparation.prepare_cases``).
Details: docs/pretraining.md, docs/scale.md.
"""
import inspect
import json
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import nnunetv2
import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import DatasetFingerprintExtractor
from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import move_plans_between_datasets
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.workers import default_processes
from nnunetv2_desd.data.locks import folder_lock
from nnunetv2_desd.data.pool import CASE_SEPARATOR
from nnunetv2_desd.data.preparation import prepare_cases
from nnunetv2_desd.data.raw import RawDataset, check_cases, read_raw_dataset, refuse_bad_cases, resolve_dataset_name

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
    excluded: List[str] = field(default_factory=list)  # bad cases left out (--exclude-bad-cases)

    @property
    def plans_manager(self):
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


@dataclass
class PreparedPool:
    """The datasets of a pre-training run, each prepared with the run's plans (the first one's copy or its own).

    Case keys are the case identifiers for one dataset, ``<DatasetXXX_Name>__<case>`` for several. Network, plans
    and labels are read from the first member; every member's plans preprocess alike."""
    members: List[PreparedData]
    dataset_weights: Optional[List[float]] = None
    drr_files: Optional[Dict[str, str]] = None  # case key -> DRR file (CADS)
    preparation_command: str = 'the command that prepared the data'  # what prepares a missing case again

    # the network, plans and labels: those of the first member
    dataset_name = property(lambda self: self.members[0].dataset_name)
    plans_identifier = property(lambda self: self.members[0].plans_identifier)
    configuration = property(lambda self: self.members[0].configuration)
    plans = property(lambda self: self.members[0].plans)
    dataset_json = property(lambda self: self.members[0].dataset_json)
    plans_source = property(lambda self: self.members[0].plans_source)
    plans_manager = property(lambda self: self.members[0].plans_manager)
    configuration_manager = property(lambda self: self.members[0].configuration_manager)
    label_manager = property(lambda self: self.members[0].label_manager)
    num_input_channels = property(lambda self: self.members[0].num_input_channels)

    @property
    def dataset_names(self) -> List[str]:
        return [m.dataset_name for m in self.members]

    def key(self, member: PreparedData, case: str) -> str:
        return case if len(self.members) == 1 else f'{member.dataset_name}{CASE_SEPARATOR}{case}'

    def cases(self) -> Dict[str, Tuple[str, str]]:
        """case key -> (data folder, identifier in it)."""
        return {self.key(m, case): (m.data_folder, case) for m in self.members for case in m.identifiers}

    def sampling_probabilities(self, keys: Sequence[str]) -> Optional[np.ndarray]:
        """Per-case probabilities for ``keys`` (in that order) from ``dataset_weights``; None: uniform over cases."""
        if self.dataset_weights is None:
            return None
        member_of = {self.key(m, c): i for i, m in enumerate(self.members) for c in m.identifiers}
        weights = np.asarray(self.dataset_weights, dtype=np.float64) / sum(self.dataset_weights)
        sizes = np.array([len(m.identifiers) for m in self.members], dtype=np.float64)
        return np.array([weights[member_of[k]] / sizes[member_of[k]] for k in keys])

    def summary(self) -> List[dict]:
        """What the log and the export record of each dataset."""
        weights = self.dataset_weights or [None] * len(self.members)
        return [{'dataset': m.dataset_name, 'cases': len(m.identifiers), 'excluded_cases': list(m.excluded),
                 'weight': w} for m, w in zip(self.members, weights)]


def as_pool(prepared) -> PreparedPool:
    """A PreparedPool as it is; one PreparedData as a pool of one."""
    return prepared if isinstance(prepared, PreparedPool) else PreparedPool([prepared])


def check_channel_names(raws: Sequence[RawDataset]) -> None:
    """Every dataset of a pool has the same channels (names compared case-insensitively), in the same order."""
    groups: Dict[str, List[RawDataset]] = {}
    for raw in raws:
        names = {str(k): str(v).lower() for k, v in raw.dataset_json['channel_names'].items()}
        groups.setdefault(json.dumps(names, sort_keys=True), []).append(raw)
    if len(groups) > 1:
        raise DesdError('the pool\'s datasets have different channel_names: ' + '; '.join(
            f'{", ".join(r.name for r in group)} {dict(group[0].dataset_json["channel_names"])}'
            for group in groups.values()) + '. Pre-train on datasets with the same channels in the same order.')


def prepare_pool(datasets: Sequence[str], configuration: str = '3d_fullres', plans: Optional[str] = None,
                 planner: str = 'ExperimentPlanner', plans_from: Optional[str] = None,
                 num_processes: Optional[int] = None, raws: Optional[Sequence[RawDataset]] = None,
                 part: int = 0, parts: int = 1, exclude_bad_cases: bool = False,
                 dataset_weights: Optional[Sequence[float]] = None) -> PreparedPool:
    """Checks every image, plans (the first dataset, or copies ``plans_from``'s plans to every dataset) and
    preprocesses what is not prepared yet, case by case; ``part``/``parts``: only this job's share of the cases.

    Bad cases of every dataset are named together; ``exclude_bad_cases`` leaves them out instead."""
    num_processes = default_processes(num_processes)
    raws = list(raws) if raws is not None else [read_raw_dataset(d) for d in datasets]
    check_channel_names(raws)
    source = resolve_dataset_name(plans_from) if plans_from is not None else raws[0].name
    source_plans = plans or ('nnUNetPlans' if plans_from is not None else _default_plans_name(planner))
    if plans_from is not None:
        _require_plans(source, source_plans, configuration)

    problems = {raw.name: check_cases(raw, _mask_folder(raw), num_processes, part, parts) for raw in raws}
    refuse_bad_cases(raws, problems, exclude_bad_cases)
    root_of = {raw.name: join(_preprocessed(), raw.name) for raw in raws}
    if parts > 1 and source in root_of and not isfile(join(root_of[source], source_plans + '.json')):
        # planning reads every case of the planned dataset: check the ones no part has checked yet
        planned = next(raw for raw in raws if raw.name == source)
        problems[source] = check_cases(planned, _mask_folder(planned), num_processes)
        refuse_bad_cases(raws, problems, exclude_bad_cases)

    members = []
    for raw in raws:
        excluded = sorted(problems[raw.name]) if exclude_bad_cases else []
        root = root_of[raw.name]
        with folder_lock(root):
            if raw.name != source:
                identifier = _copy_plans_from(source, raw, source_plans, configuration)
            else:
                identifier = source_plans
                if plans_from is None and not isfile(join(root, identifier + '.json')):
                    _fingerprint_and_plan(raw, root, planner, identifier, num_processes, excluded)
            dataset_json = _write_preprocessed_dataset_json(raw, root, excluded)
        plans_dict = _load_plans(join(root, identifier + '.json'), configuration)
        data_folder = join(root, plans_dict['configurations'][configuration]['data_identifier'])
        cases = {case: (files, _seg_file(raw, root, case)) for case, files in raw.cases.items()
                 if case not in excluded}
        prepare_cases(data_folder, cases, plans_dict, configuration, dataset_json, num_processes,
                      f'Preparing {raw.name}', part, parts)
        members.append(PreparedData(raw.name, identifier, configuration, plans_dict, dataset_json, data_folder,
                                    sorted(cases), source, excluded=excluded))
    return PreparedPool(members, list(dataset_weights) if dataset_weights is not None else None)


def prepare_pretraining_data(dataset: str, configuration: str = '3d_fullres', plans: Optional[str] = None,
                             planner: str = 'ExperimentPlanner', plans_from: Optional[str] = None,
                             num_processes: Optional[int] = None, raw: Optional[RawDataset] = None) -> PreparedData:
    """One dataset prepared as ``prepare_pool`` prepares a pool (bad cases refused)."""
    return prepare_pool([dataset], configuration, plans, planner, plans_from, num_processes,
                        None if raw is None else [raw]).members[0]


def _preprocessed() -> str:
    return nnUNet_preprocessed


def _mask_folder(raw: RawDataset) -> Optional[str]:
    return None if raw.has_labels else join(_preprocessed(), raw.name, BODY_MASK_FOLDER)


def _seg_file(raw: RawDataset, root: str, case: str) -> str:
    folder = join(raw.folder, 'labelsTr') if raw.has_labels else join(root, BODY_MASK_FOLDER)
    return join(folder, case + raw.dataset_json['file_ending'])


def plans_copied_from(source_plans: str, source: str) -> str:
    """The name ``--plans-from`` gives plans copied from dataset ``source`` (DatasetXXX_Name): ``nnUNetPlans_fromXXX``."""
    return f'{source_plans}_from{source[7:10]}'


def find_planner_class(name: str):
    cls = recursive_find_python_class(join(nnunetv2.__path__[0], 'experiment_planning'), name,
                                      'nnunetv2.experiment_planning')
    if cls is None:
        raise DesdError(f'unknown nnU-Net planner {name!r} (for example ExperimentPlanner, nnUNetPlannerResEncM).')
    return cls


def _default_plans_name(planner: str) -> str:
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


def _write_preprocessed_dataset_json(raw: RawDataset, root: str, excluded: Sequence[str] = ()) -> dict:
    """The dataset.json nnU-Net's preprocessor and trainers read from nnUNet_preprocessed; returns it."""
    target = join(root, 'dataset.json')
    if raw.has_labels:
        if not isfile(target):
            shutil.copy(join(raw.folder, 'dataset.json'), target)
        return load_json(target)
    completed = _completed_dataset_json(raw, root, excluded)
    if not isfile(target) or load_json(target) != completed:
        atomic_write_json(completed, target)
    return completed


def _completed_dataset_json(raw: RawDataset, root: str, excluded: Sequence[str] = ()) -> dict:
    """The raw dataset.json plus what labels would have given: body masks as labels {background, body}."""
    ending = raw.dataset_json['file_ending']
    completed = dict(raw.dataset_json)
    cases = {case: files for case, files in raw.cases.items() if case not in set(excluded)}
    completed.update(
        labels={'background': 0, 'body': 1},
        numTraining=len(cases),
        dataset={case: {'images': files, 'label': join(root, BODY_MASK_FOLDER, case + ending)}
                 for case, files in cases.items()},
        desd_note='written by nnunetv2_desd: labels are body masks standing in for missing annotations',
    )
    return completed


def _fingerprint_and_plan(raw: RawDataset, root: str, planner: str, plans_identifier: str,
                          num_processes: int, excluded: Sequence[str] = ()) -> None:
    dataset_json = raw.dataset_json if raw.has_labels else _completed_dataset_json(raw, root, excluded)
    if not isfile(join(root, 'dataset_fingerprint.json')):
        extractor = DatasetFingerprintExtractor(raw.name, num_processes, verbose=False)
        if not raw.has_labels:  # fingerprint over body masks instead of labels
            extractor.dataset_json = dataset_json
            extractor.dataset = dataset_json['dataset']
        extractor.dataset = {c: v for c, v in extractor.dataset.items() if c not in set(excluded)}
        extractor.run()
    experiment_planner = find_planner_class(planner)(raw.name, plans_name=plans_identifier)
    experiment_planner.dataset_json = dataset_json
    experiment_planner.plan_experiment()


def _require_plans(source: str, source_plans: str, configuration: str) -> str:
    source_file = join(_preprocessed(), source, source_plans + '.json')
    if not isfile(source_file):
        raise DesdError(f'--plans-from {source}: {source_file} does not exist. Plan that dataset first: '
                        f'nnUNetv2_plan_and_preprocess -d {source[7:10]} -c {configuration}')
    return source_file


def _copy_plans_from(source: str, raw: RawDataset, source_plans: str, configuration: str) -> str:
    source_file = _require_plans(source, source_plans, configuration)
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
