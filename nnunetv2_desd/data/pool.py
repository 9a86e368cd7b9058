"""The unlabelled pool of a labelled dataset: where it is stored, what it was made with, and reading it for training.

``desd_preprocess_unlabelled -d L -u U`` stores U's images, preprocessed with L's plans, as nnU-Net blosc2 cases in
``nnUNet_preprocessed/DatasetL_X/desd_unlabelled/<data_identifier>/``, with a record (``POOL_FORMAT``) of the
plans' preprocessing beside it. A trainer refuses a pool with another channel count or other preprocessing
(``preprocessing_differences``), naming the command that remakes it. Details: docs/dmd.md.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences

POOL_FOLDER = 'desd_unlabelled'
POOL_FORMAT = 'nnunetv2_desd.unlabelled_pool'
POOL_VERSION = 1
CASE_SEPARATOR = '__'  # pool case id = <source dataset name>__<case id>


def pool_paths(preprocessed_dataset_folder: str, data_identifier: str) -> Tuple[str, str]:
    """(case folder, record file) of the pool for one data_identifier."""
    root = os.path.join(preprocessed_dataset_folder, POOL_FOLDER)
    return os.path.join(root, data_identifier), os.path.join(root, data_identifier + '.json')


def preprocess_command(dataset: str, sources: Sequence[str], plans_name: str, configuration: str) -> str:
    return (f'desd_preprocess_unlabelled -d {dataset} -u {" ".join(sources) or "UNLABELLED_DATASET"} '
            f'-p {plans_name} -c {configuration}')


def read_pool_record(preprocessed_dataset_folder: str, data_identifier: str) -> Optional[dict]:
    """The pool's record, or None where no pool was made for this data_identifier."""
    folder, record_file = pool_paths(preprocessed_dataset_folder, data_identifier)
    if not os.path.isfile(record_file):
        if os.path.isdir(folder):
            raise DesdError(f'{folder} has no record {record_file}: its preparation by desd_preprocess_unlabelled '
                            f'has not finished. Run the same desd_preprocess_unlabelled command again to finish it.')
        return None
    try:
        with open(record_file) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise DesdError(f'cannot read the unlabelled pool record {record_file}: {e}') from None
    if not isinstance(record, dict) or record.get('format') != POOL_FORMAT:
        raise DesdError(f'{record_file} is not an unlabelled pool record of desd_preprocess_unlabelled.')
    return record


def check_pool(record: dict, plans: dict, configuration: str, num_input_channels: int,
               preprocessed_dataset_folder: str) -> List[str]:
    """The pool's case ids, after checking the record against the trainer's plans and channel count.

    DesdError (one message naming the command that remakes the pool) for another channel count, plans that
    preprocess differently (other plans, or the dataset was re-planned), or missing case files.
    """
    data_identifier = plans['configurations'][configuration].get('data_identifier') or \
        f'{plans["plans_name"]}_{configuration}'
    folder, record_file = pool_paths(preprocessed_dataset_folder, data_identifier)
    dataset = plans.get('dataset_name', os.path.basename(preprocessed_dataset_folder))
    redo = preprocess_command(dataset, [s['dataset'] for s in record.get('sources', [])], plans['plans_name'],
                              configuration)
    if record.get('num_channels') != num_input_channels:
        raise DesdError(f'the unlabelled pool {folder} has {record.get("num_channels")} channel(s) '
                        f'{record.get("source_channel_names")}, but {dataset} has {num_input_channels} '
                        f'{record.get("channel_names")}: every unlabelled image needs the labelled dataset\'s '
                        f'channels. Remake the pool from such images: {redo}')
    if 'configurations' not in (record.get('preprocessing') or {}):
        raise DesdError(f'the unlabelled pool {folder} has no preprocessing plans in its record. '
                        f'Preprocess it again: {redo}')
    differing = preprocessing_differences(plans, record['preprocessing'], configuration)
    if differing:
        raise DesdError(f'the unlabelled pool {folder} was preprocessed with plans {record.get("plans_name")!r} '
                        f'({record.get("configuration")}), which preprocess differently from plans '
                        f'{plans["plans_name"]!r} ({configuration}): {"; ".join(differing)}. '
                        f'Preprocess it again with these plans: {redo}')
    identifiers = list(record.get('identifiers', []))
    missing = [i for i in identifiers if not os.path.isfile(os.path.join(folder, i + '.pkl'))]
    if missing or not identifiers:
        raise DesdError(f'the unlabelled pool {folder} lacks {len(missing) or "all"} of the cases its record '
                        f'{record_file} lists (e.g. {(missing or ["-"])[0]}). Remake it: {redo}')
    return identifiers


class PoolDataset:
    """nnU-Net's dataset interface (``identifiers``, ``load_case``) over cases from several preprocessed folders,
    each read by nnU-Net's own dataset class for that folder; what nnUNetDataLoader needs."""

    def __init__(self, members: Dict[str, Tuple[str, str]], repair_command: str = 'the command that prepared it'):
        """members: pool key -> (preprocessed folder, case identifier in that folder); ``repair_command``: what
        prepares a damaged case again, once its .pkl is removed."""
        self.repair_command = repair_command
        # here: nnunet_dataset imports nnunetv2.configuration, which reads the environment at import
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        by_folder: Dict[str, List[str]] = {}
        for folder, identifier in members.values():
            by_folder.setdefault(folder, []).append(identifier)
        datasets = {folder: infer_dataset_class(folder)(folder, list(ids)) for folder, ids in by_folder.items()}
        self._members = {key: (datasets[folder], identifier) for key, (folder, identifier) in members.items()}
        self.identifiers = sorted(self._members)

    def __len__(self) -> int:
        return len(self.identifiers)

    def load_case(self, key: str):
        """nnU-Net's (data, seg, seg_prev, properties); a case that cannot be read raises DesdError naming it and
        the command that prepares it again."""
        dataset, identifier = self._members[key]
        try:
            return dataset.load_case(identifier)
        except Exception as e:
            folder = dataset.source_folder
            raise DesdError(f'the prepared case {identifier} in {folder} is damaged ({type(e).__name__}: '
                            f'{str(e).strip().splitlines()[-1] if str(e).strip() else ""}). Prepare it again: '
                            f'rm {os.path.join(folder, identifier)}.pkl && {self.repair_command}') from None
