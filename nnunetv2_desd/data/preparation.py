"""Images of a dataset prepared with given nnU-Net plans, one case at a time: resumable, incremental, splittable.

Each case goes through the plans' preprocessor (nnU-Net's ``run_case_save``) into a staging folder, then its
files are moved into the data folder with the ``.pkl`` last: a case whose ``.pkl`` is there is complete, and a
kill at any moment leaves at most a case that is prepared again on the next run. Cases whose ``.pkl`` exists
and is newer than their raw images are never redone, so cases added to a dataset are prepared alone.
A stamp next to the data folder records the plans' preprocessing; other plans make the folder start afresh.
"""
import os
import shutil
import socket
from typing import Dict, List, Optional, Sequence, Tuple

from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, write_pickle

from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.workers import run_in_processes
from nnunetv2_desd.data.ledger import in_share
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences, preprocessing_plans

STAGING = '.desd_partial'  # a sub-folder: nnU-Net's dataset classes list files only
STAMP_SUFFIX = '.desd_prepared.json'
CASE_FILES = ('.b2nd', '_seg.b2nd', '.pkl')  # moved into place in this order


def prepared_cases(data_folder: str) -> set:
    """Identifiers whose ``.pkl`` is in ``data_folder`` (one directory scan)."""
    if not os.path.isdir(data_folder):
        return set()
    with os.scandir(data_folder) as entries:
        return {e.name[:-4] for e in entries if e.name.endswith('.pkl')}


def _is_current(data_folder: str, key: str, image_files: Sequence[str]) -> bool:
    try:
        made = os.stat(os.path.join(data_folder, key + '.pkl')).st_mtime_ns
        return all(os.stat(f).st_mtime_ns <= made for f in image_files)
    except OSError:
        return False


def _check_stamp(data_folder: str, plans: dict, configuration: str) -> None:
    """Keeps the folder's cases if they were made with these plans' preprocessing (or no stamp says otherwise),
    else removes them; then stamps the folder."""
    stamp = data_folder + STAMP_SUFFIX
    wanted = preprocessing_plans(plans, configuration)
    if os.path.isfile(stamp):
        try:
            differing = preprocessing_differences(wanted, load_json(stamp), configuration)
        except (ValueError, KeyError, TypeError):
            differing = ['an unreadable stamp']
        if not differing:
            return
        print(f'{data_folder} was prepared with other plans ({"; ".join(differing)}): preparing it again.')
        shutil.rmtree(data_folder, ignore_errors=True)
    os.makedirs(data_folder, exist_ok=True)
    atomic_write_json(wanted, stamp)


def _prepare_case(job) -> str:
    preprocessor, data_folder, staging, key, image_files, seg_file, plans_manager, configuration_manager, \
        dataset_json = job
    truncated = os.path.join(staging, key)
    preprocessor.run_case_save(truncated, list(image_files), seg_file, plans_manager, configuration_manager,
                               dataset_json)
    if seg_file is None:  # no labels: nnUNetDataLoader reads class_locations; none means no oversampling
        properties = load_pickle(truncated + '.pkl')
        properties['class_locations'] = {}
        write_pickle(properties, truncated + '.pkl')
    for suffix in CASE_FILES:
        os.replace(truncated + suffix, os.path.join(data_folder, key + suffix))
    return key


def prepare_cases(data_folder: str, cases: Dict[str, Tuple[Sequence[str], Optional[str]]], plans: dict,
                  configuration: str, dataset_json: dict, num_processes: int, stage: str, part: int = 0,
                  parts: int = 1) -> List[str]:
    """Preprocesses the cases of share ``part`` of ``parts`` not prepared yet; returns the keys it prepared.

    ``cases``: key (file name in ``data_folder``) -> (image files, seg file or None). The caller holds the
    folder's lock (``locks.folder_lock``).
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    _check_stamp(data_folder, plans, configuration)
    done = prepared_cases(data_folder)
    todo = [key for key in sorted(cases) if in_share(key, part, parts) and
            not (key in done and _is_current(data_folder, key, cases[key][0]))]
    if not todo:
        return []
    plans_manager = PlansManager(plans)
    configuration_manager = plans_manager.get_configuration(configuration)
    preprocessor = configuration_manager.preprocessor_class(verbose=False)
    staging = os.path.join(data_folder, STAGING, f'{socket.gethostname()}-{os.getpid()}')  # this writer's own
    os.makedirs(staging, exist_ok=True)
    jobs = [(preprocessor, data_folder, staging, key, cases[key][0], cases[key][1], plans_manager,
             configuration_manager, dataset_json) for key in todo]
    prepared = list(run_in_processes(_prepare_case, jobs, num_processes, stage))
    shutil.rmtree(staging, ignore_errors=True)
    return prepared


def missing_cases(data_folder: str, keys: Sequence[str]) -> List[str]:
    """The keys whose case is not (completely) in ``data_folder``."""
    done = prepared_cases(data_folder)
    return [k for k in keys if k not in done]
