"""Images of a dataset prepared with given nnU-Net plans, one case at a time: resumable, incremental, splittable.

Each case goes through the plans' preprocessor (nnU-Net's ``run_case_save``) into its writer's staging folder,
then its files are moved into the data folder (the data ``.b2nd``, by which nnU-Net lists cases, last), and a
ledger beside the data folder records the signature of the images it was made from. A case is prepared when its
three files are there and its record matches its images as they are now, so a kill at any moment costs at most
the cases in flight, changed images are prepared again, and cases added to a dataset are prepared alone.
A stamp next to the data folder records the plans' preprocessing; other plans make the folder start afresh.
"""
import os
import shutil
import socket
from typing import Dict, List, Optional, Sequence, Tuple

from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle, write_pickle

from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.workers import run_in_processes
from nnunetv2_desd.data.ledger import Ledger, current, file_signature, in_share
from nnunetv2_desd.data.locks import folder_lock
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences, preprocessing_plans

STAGING = '.desd_partial'  # a sub-folder: nnU-Net's dataset classes list files only
STAMP_SUFFIX = '.desd_prepared.json'
CASE_FILES = ('.pkl', '_seg.b2nd', '.b2nd')  # moved into place in this order


def case_ledger(data_folder: str) -> Ledger:
    """The prepared cases' records, beside the data folder (nnU-Net refuses a data folder holding other files)."""
    folder = os.path.normpath(data_folder)
    return Ledger(os.path.join(os.path.dirname(folder), 'desd_prepared', os.path.basename(folder)))


def prepared_cases(data_folder: str) -> set:
    """Identifiers whose three files are all in ``data_folder`` (one directory scan)."""
    if not os.path.isdir(data_folder):
        return set()
    with os.scandir(data_folder) as entries:
        names = {e.name for e in entries}
    return {n[:-4] for n in names if n.endswith('.pkl') and all(n[:-4] + s in names for s in CASE_FILES)}


def missing_cases(data_folder: str, keys: Sequence[str]) -> List[str]:
    """The keys whose case is not (completely) in ``data_folder``."""
    done = prepared_cases(data_folder)
    return [k for k in keys if k not in done]


def _sources(case: Tuple[Sequence[str], Optional[str]]) -> List[str]:
    images, seg = case
    return list(images) + ([seg] if seg is not None else [])


def _made_after(data_folder: str, key: str, sources: Sequence[str]) -> bool:
    """A case without record (made by nnU-Net's own preprocessing, or an older version): newer than its sources."""
    try:
        made = os.stat(os.path.join(data_folder, key + '.pkl')).st_mtime_ns
        return all(os.stat(f).st_mtime_ns <= made for f in sources)
    except OSError:
        return False


def _start(data_folder: str, plans: dict, configuration: str) -> None:
    """Under the folder's lock: keeps the folder's cases if they were made with these plans' preprocessing (or no
    stamp says otherwise), else removes them; stamps the folder; removes staging folders of dead writers here."""
    stamp = data_folder + STAMP_SUFFIX
    wanted = preprocessing_plans(plans, configuration)
    if os.path.isfile(stamp):
        try:
            differing = preprocessing_differences(wanted, load_json(stamp), configuration)
        except (ValueError, KeyError, TypeError):
            differing = ['an unreadable stamp']
        if differing:
            print(f'{data_folder} was prepared with other plans ({"; ".join(differing)}): preparing it again.')
            shutil.rmtree(data_folder, ignore_errors=True)
            shutil.rmtree(case_ledger(data_folder).folder, ignore_errors=True)
    os.makedirs(data_folder, exist_ok=True)
    if not os.path.isfile(stamp) or load_json(stamp) != wanted:
        atomic_write_json(wanted, stamp)
    staging = os.path.join(data_folder, STAGING)
    host = socket.gethostname()
    for writer in os.listdir(staging) if os.path.isdir(staging) else []:
        name, _, pid = writer.rpartition('-')
        if name == host and pid.isdigit() and not os.path.exists(f'/proc/{pid}'):
            shutil.rmtree(os.path.join(staging, writer), ignore_errors=True)


def _prepare_case(job) -> Tuple[str, list]:
    preprocessor, data_folder, staging, key, case, plans_manager, configuration_manager, dataset_json = job
    signature = file_signature(_sources(case))  # before reading: a change during preparation shows next time
    truncated = os.path.join(staging, key)
    preprocessor.run_case_save(truncated, list(case[0]), case[1], plans_manager, configuration_manager, dataset_json)
    if case[1] is None:  # no labels: nnUNetDataLoader reads class_locations; none means no oversampling
        properties = load_pickle(truncated + '.pkl')
        properties['class_locations'] = {}
        write_pickle(properties, truncated + '.pkl')
    for suffix in CASE_FILES:
        os.replace(truncated + suffix, os.path.join(data_folder, key + suffix))
    return key, signature


def prepare_cases(data_folder: str, cases: Dict[str, Tuple[Sequence[str], Optional[str]]], plans: dict,
                  configuration: str, dataset_json: dict, num_processes: Optional[int], stage: str, part: int = 0,
                  parts: int = 1) -> List[str]:
    """Preprocesses the cases of share ``part`` of ``parts`` not prepared yet; returns the keys it prepared.

    ``cases``: key (file name in ``data_folder``) -> (image files, seg file or None). A whole run holds the lock
    of the data folder's parent folder throughout; a share holds it to start, then works beside the other shares.
    """
    with folder_lock(os.path.dirname(os.path.normpath(data_folder))):
        _start(data_folder, plans, configuration)
        if parts <= 1:
            return _prepare(data_folder, cases, plans, configuration, dataset_json, num_processes, stage, 0, 1)
    return _prepare(data_folder, cases, plans, configuration, dataset_json, num_processes, stage, part, parts)


def _prepare(data_folder, cases, plans, configuration, dataset_json, num_processes, stage, part, parts) -> List[str]:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    ledger = case_ledger(data_folder)
    records, complete = ledger.read(), prepared_cases(data_folder)
    todo = []
    try:
        for key in sorted(cases):
            if not in_share(key, part, parts):
                continue
            sources = _sources(cases[key])
            if key in complete:
                if current(records.get(key), sources):
                    continue
                if key not in records and _made_after(data_folder, key, sources):
                    ledger.append(key, {'files': file_signature(sources)})  # adopted as it is
                    continue
            todo.append(key)
        if not todo:
            return []
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(configuration)
        preprocessor = configuration_manager.preprocessor_class(verbose=False)
        staging = os.path.join(data_folder, STAGING, f'{socket.gethostname()}-{os.getpid()}')  # this writer's own
        os.makedirs(staging, exist_ok=True)
        jobs = [(preprocessor, data_folder, staging, key, cases[key], plans_manager, configuration_manager,
                 dataset_json) for key in todo]
        for key, signature in run_in_processes(_prepare_case, jobs, num_processes, stage):
            ledger.append(key, {'files': signature})
        shutil.rmtree(staging, ignore_errors=True)
        return todo
    finally:
        ledger.close()
