"""Unlabelled images preprocessed with a labelled dataset's nnU-Net plans into the unlabelled pool (``pool.py``).

``nnunetv2_desd.cli.preprocess_unlabelled`` (``desd_preprocess_unlabelled``) documents the checks made before
anything is written, how the cases are preprocessed, and why one call writes the whole pool.
"""
import os
from typing import List, Optional, Sequence

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.locks import folder_lock
from nnunetv2_desd.data.pool import CASE_SEPARATOR, POOL_FORMAT, POOL_VERSION, pool_paths
from nnunetv2_desd.data.preparation import missing_cases, prepare_cases
from nnunetv2_desd.data.preprocessing_match import preprocessing_plans
from nnunetv2_desd.data.raw import check_cases, read_raw_dataset, refuse_bad_cases, resolve_dataset_name


def _same_names(a: dict, b: dict) -> bool:
    return {str(k): str(v).lower() for k, v in a.items()} == {str(k): str(v).lower() for k, v in b.items()}


def _check_source(raw, labelled_name: str, labelled_json: dict, reader_class, allow_other_names: bool) -> None:
    if raw.name == labelled_name:
        raise DesdError(f'{raw.name} is the labelled dataset itself. Its cases left out of a labelled fraction '
                        f'already form the unlabelled pool of that fraction\'s fold (desd_benchmark --fractions); '
                        f'give other, unlabelled datasets with -u.')
    theirs, ours = raw.dataset_json['channel_names'], labelled_json['channel_names']
    if len(theirs) != len(ours):
        raise DesdError(f'channel-count mismatch: {raw.name} has {len(theirs)} channel(s) {dict(theirs)}, the '
                        f'labelled dataset {labelled_name} has {len(ours)} {dict(ours)}. Unlabelled images need the '
                        f'same channels in the same order.')
    if not allow_other_names and not _same_names(theirs, ours):
        raise DesdError(f'channel names differ: {raw.name} has {dict(theirs)}, {labelled_name} has {dict(ours)}. '
                        f'Its images are normalised as {labelled_name}\'s channels; if they are the same '
                        f'modalities in the same order, add --allow-other-channel-names.')
    ending = raw.dataset_json['file_ending']
    if ending not in getattr(reader_class, 'supported_file_endings', [ending]):
        raise DesdError(f'{raw.name} stores {ending} files, which the reader of {labelled_name}\'s plans '
                        f'({reader_class.__name__}) does not read ({", ".join(reader_class.supported_file_endings)}).')


def preprocess_unlabelled(dataset: str, unlabelled: Sequence[str], plans_name: str = 'nnUNetPlans',
                          configurations: Sequence[str] = ('3d_fullres',), num_processes: Optional[int] = None,
                          allow_other_channel_names: bool = False, exclude_bad_cases: bool = False, part: int = 0,
                          parts: int = 1) -> List[str]:
    """Writes the pool of every configuration (see ``desd_preprocess_unlabelled -h``); returns the record files
    (none while other parts' cases are missing)."""
    name = resolve_dataset_name(dataset)
    folder = os.path.join(os.fspath(nnUNet_preprocessed), name)
    plans_file = os.path.join(folder, plans_name + '.json')
    if not os.path.isfile(plans_file):
        raise DesdError(f'{plans_file} not found: plan and preprocess the labelled dataset first '
                        f'(nnUNetv2_plan_and_preprocess -d {dataset} -c {" ".join(configurations)}).')
    if not os.path.isfile(os.path.join(folder, 'dataset.json')):
        raise DesdError(f'{os.path.join(folder, "dataset.json")} not found: run nnUNetv2_plan_and_preprocess -d '
                        f'{dataset} first.')
    plans = load_json(plans_file)
    labelled_json = load_json(os.path.join(folder, 'dataset.json'))
    plans_manager = PlansManager(plans)
    reader_class = plans_manager.image_reader_writer_class

    sources = []
    for source in dict.fromkeys(unlabelled):
        raw = read_raw_dataset(source)
        _check_source(raw, name, labelled_json, reader_class, allow_other_channel_names)
        sources.append(raw)
    problems = {raw.name: check_cases(raw, None, num_processes, part, parts) for raw in sources}
    refuse_bad_cases(sources, problems, exclude_bad_cases)
    cases = {f'{raw.name}{CASE_SEPARATOR}{case}': (files, None) for raw in sources
             for case, files in raw.cases.items() if case not in problems[raw.name]}

    records = []
    for configuration in configurations:
        configuration_manager = plans_manager.get_configuration(configuration)
        if configuration_manager.previous_stage_name is not None:
            raise DesdError(f'{configuration} is a cascade stage: it needs predictions of the previous stage for '
                            f'every case, which unlabelled cases lack. Use a configuration without a previous stage.')
        pool_folder, record_file = pool_paths(folder, configuration_manager.data_identifier)
        prepare_cases(pool_folder, cases, plans, configuration, labelled_json, num_processes,
                      f'Preprocessing unlabelled cases ({configuration})', part, parts)
        with folder_lock(os.path.dirname(pool_folder)):
            missing = missing_cases(pool_folder, list(cases))
            if missing:  # other parts' shares
                print(f'{configuration}: this part is done; {len(missing)} of {len(cases)} cases belong to other '
                      f'parts. The pool is complete once every part has run.')
                continue
            atomic_write_json({
                'format': POOL_FORMAT, 'version': POOL_VERSION, 'labelled_dataset': name, 'plans_name': plans_name,
                'configuration': configuration, 'data_identifier': configuration_manager.data_identifier,
                'preprocessing': preprocessing_plans(plans, configuration),
                'num_channels': len(labelled_json['channel_names']), 'channel_names': labelled_json['channel_names'],
                'source_channel_names': {raw.name: raw.dataset_json['channel_names'] for raw in sources},
                'sources': [{'dataset': raw.name, 'raw_folder': raw.folder, 'num_cases': len(raw.cases),
                             'excluded_cases': sorted(problems[raw.name])} for raw in sources],
                'identifiers': sorted(cases),
            }, record_file)
        records.append(record_file)
        print(f'{len(cases)} unlabelled cases of {", ".join(r.name for r in sources)} preprocessed with '
              f'{name}\'s {plans_name} ({configuration}): {pool_folder}')
    return records
