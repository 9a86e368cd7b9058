"""Labelled fractions as extra folds of nnU-Net's own ``splits_final.json``.

A fraction f of fold k is one appended entry {'train': subset, 'val': fold k's val}, so stock nnU-Net trains it.
Subsets are nested prefixes of one seeded permutation of the fold's training cases, max(1, ceil(f * n)) cases each;
fraction 1.0 is fold k itself. Appended entries are recorded in ``desd_fraction_folds.json``; the standard entries
are never changed. Writes are atomic and serialised by an flock. Details: docs/benchmark.md.
"""
import contextlib
import fcntl
import json
import math
import os
from typing import Dict, Iterator, List, Optional

import numpy as np

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.checkpoint import atomic_write_json

SPLITS_FILE = 'splits_final.json'
REGISTRY_FILE = 'desd_fraction_folds.json'
LOCK_FILE = '.desd_fraction_folds.lock'
NNUNET_SPLIT_SEED = 12345  # nnUNetTrainer.do_split: generate_crossval_split(sorted ids, seed=12345, n_splits=5)
NNUNET_N_SPLITS = 5


def _read_json(path: str):
    with open(path) as f:
        return json.load(f)


@contextlib.contextmanager
def _locked(preprocessed_dataset_folder: str) -> Iterator[None]:
    with open(os.path.join(preprocessed_dataset_folder, LOCK_FILE), 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise DesdError(f'A labelled fraction must lie in (0, 1], got {fraction:g}.')
    return fraction


def standard_splits(data_identifier_folder: str) -> List[Dict[str, List[str]]]:
    """The 5 folds nnUNetTrainer.do_split writes when splits_final.json is missing (same ids, order and seed)."""
    # here: nnunet_dataset imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    # here: crossval_split imports sklearn (slow), and trainers/dmd imports this module
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    if not os.path.isdir(data_identifier_folder):
        raise DesdError(f'No preprocessed data in {data_identifier_folder}: run nnUNetv2_plan_and_preprocess first.')
    try:
        identifiers = infer_dataset_class(data_identifier_folder).get_identifiers(data_identifier_folder)
    except (AssertionError, KeyError, IndexError):
        identifiers = []
    if len(identifiers) < NNUNET_N_SPLITS:
        raise DesdError(f'{data_identifier_folder} holds {len(identifiers)} preprocessed cases; nnU-Net\'s '
                        f'{NNUNET_N_SPLITS}-fold split needs at least {NNUNET_N_SPLITS}.')
    keys_sorted = [str(k) for k in np.sort(list(identifiers))]
    splits = generate_crossval_split(keys_sorted, seed=NNUNET_SPLIT_SEED, n_splits=NNUNET_N_SPLITS)
    return [{'train': [str(k) for k in s['train']], 'val': [str(k) for k in s['val']]} for s in splits]


def subset_size(fraction: float, n: int) -> int:
    """max(1, ceil(fraction * n)); a product within 1e-9 of an integer counts as that integer (0.3 * 10 is 3)."""
    product = fraction * n
    nearest = round(product)
    return max(1, nearest if abs(product - nearest) < 1e-9 else math.ceil(product))


def nested_subset(train: List[str], fraction: float, fold: int, seed: int) -> List[str]:
    """The first subset_size(fraction, n) cases of a (seed, fold)-seeded permutation of the sorted cases,
    listed in the order of ``train``. The same permutation serves every fraction, so subsets are nested."""
    ordered = sorted(train)
    permutation = np.random.default_rng([int(seed), int(fold)]).permutation(len(ordered))
    keep = {ordered[i] for i in permutation[:subset_size(fraction, len(ordered))]}
    return [c for c in train if c in keep]


def _load_state(preprocessed_dataset_folder: str):
    splits_file = os.path.join(preprocessed_dataset_folder, SPLITS_FILE)
    registry_file = os.path.join(preprocessed_dataset_folder, REGISTRY_FILE)
    splits = _read_json(splits_file) if os.path.isfile(splits_file) else None
    registry = _read_json(registry_file) if os.path.isfile(registry_file) else {}
    return splits, registry


def _standard_folds(splits: list, registry: dict) -> List[int]:
    return [i for i in range(len(splits)) if str(i) not in registry]


def _find_registered(splits: Optional[list], registry: dict, preprocessed_dataset_folder: str, fold: int,
                     fraction: float, seed: int) -> Optional[int]:
    size = subset_size(fraction, len(splits[fold]['train'])) if splits is not None and fold < len(splits) else None
    for fold_id, entry in registry.items():
        same = entry['base_fold'] == fold and entry['seed'] == seed and entry.get('n_train') == size and \
            math.isclose(entry['fraction'], fraction, rel_tol=0, abs_tol=1e-9)
        if same:
            fold_id = int(fold_id)
            intact = splits is not None and fold < len(splits) and fold_id < len(splits) and \
                sorted(splits[fold_id]['train']) == sorted(nested_subset(splits[fold]['train'], fraction, fold, seed)) \
                and sorted(splits[fold_id]['val']) == sorted(splits[fold]['val'])
            if not intact:
                raise DesdError(
                    f'{os.path.join(preprocessed_dataset_folder, SPLITS_FILE)} no longer holds fold {fold_id} '
                    f'(fraction {fraction:g} of fold {fold}, seed {seed}) as {REGISTRY_FILE} recorded it; the splits '
                    f'file was replaced. Runs in fold_{fold_id} folders belong to the old split: remove them and '
                    f'{REGISTRY_FILE} to start the fractions over.')
            return fold_id
    return None


def _check_base_fold(splits: list, registry: dict, fold: int, preprocessed_dataset_folder: str) -> None:
    standard = _standard_folds(splits, registry)
    if fold not in standard:
        splits_file = os.path.join(preprocessed_dataset_folder, SPLITS_FILE)
        raise DesdError(f'Fold {fold} is not a standard fold of {splits_file} '
                        f'(standard folds: {", ".join(map(str, standard))}).')


def find_fraction_fold(preprocessed_dataset_folder: str, fold: int, fraction: float,
                       seed: int = 12345) -> Optional[int]:
    """Read-only counterpart of fraction_fold: the fold id, or None where that entry was not appended yet."""
    fraction = check_fraction(fraction)
    splits, registry = _load_state(preprocessed_dataset_folder)
    if splits is None:
        return fold if fraction == 1.0 else None
    _check_base_fold(splits, registry, fold, preprocessed_dataset_folder)
    if fraction == 1.0:
        return fold
    return _find_registered(splits, registry, preprocessed_dataset_folder, fold, fraction, seed)


def fraction_fold(preprocessed_dataset_folder: str, data_identifier_folder: str, fold: int, fraction: float,
                  seed: int = 12345) -> int:
    """The nnU-Net fold id that trains on ``fraction`` of fold ``fold``'s training cases and validates on its val.

    Creates nnU-Net's standard 5 folds first if splits_final.json is missing; appends (or reuses) the entry.
    """
    fraction = check_fraction(fraction)
    if not os.path.isdir(preprocessed_dataset_folder):
        raise DesdError(f'{preprocessed_dataset_folder} does not exist: run nnUNetv2_plan_and_preprocess first.')
    with _locked(preprocessed_dataset_folder):
        splits, registry = _load_state(preprocessed_dataset_folder)
        splits_file = os.path.join(preprocessed_dataset_folder, SPLITS_FILE)
        if splits is None:
            splits = standard_splits(data_identifier_folder)
            atomic_write_json(splits, splits_file)
        _check_base_fold(splits, registry, fold, preprocessed_dataset_folder)
        if fraction == 1.0:
            return fold
        fold_id = _find_registered(splits, registry, preprocessed_dataset_folder, fold, fraction, seed)
        if fold_id is not None:
            return fold_id
        subset = nested_subset(splits[fold]['train'], fraction, fold, seed)
        fold_id = len(splits)
        splits.append({'train': subset, 'val': list(splits[fold]['val'])})
        registry[str(fold_id)] = {'base_fold': fold, 'fraction': fraction, 'seed': seed, 'n_train': len(subset)}
        # splits first: a reader that finds the registry entry always finds the split it names
        atomic_write_json(splits, splits_file)
        atomic_write_json(registry, os.path.join(preprocessed_dataset_folder, REGISTRY_FILE))
        return fold_id


def fraction_fold_info(preprocessed_dataset_folder: str, fold_id: int) -> Optional[dict]:
    """For an appended fold: {'base_fold', 'fraction', 'seed', 'train', 'left_out', 'val'}; None for other folds.

    'left_out' holds the base fold's training cases outside the subset (an unlabelled pool for semi-supervision).
    """
    splits, registry = _load_state(preprocessed_dataset_folder)
    entry = registry.get(str(fold_id))
    if splits is None or entry is None:
        return None
    if fold_id >= len(splits) or entry['base_fold'] >= len(splits):
        raise DesdError(f'{REGISTRY_FILE} names fold {fold_id} of fold {entry["base_fold"]}, which '
                        f'{os.path.join(preprocessed_dataset_folder, SPLITS_FILE)} does not hold.')
    train = list(splits[fold_id]['train'])
    chosen = set(train)
    return {'base_fold': entry['base_fold'], 'fraction': entry['fraction'], 'seed': entry['seed'], 'train': train,
            'left_out': [c for c in splits[entry['base_fold']]['train'] if c not in chosen],
            'val': list(splits[fold_id]['val'])}
