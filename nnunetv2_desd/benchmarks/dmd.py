"""The DMD benchmark: iteration time of a DMD trainer against nnU-Net's vanilla trainer on the same plans (a
measurement, not a test).

Run by ``desd_dmd_benchmark`` (``nnunetv2_desd.cli.dmd_benchmark``). Both trainers are built as nnUNetv2_train builds
them and run their own ``train_step``, alternating: on batches drawn beforehand (wall and CPU time) and end to end
with live loaders. The DMD fold needs unlabelled cases. Details and measured results: docs/benchmark.md, docs/dmd.md.
"""
import contextlib
import os
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

from nnunetv2_desd.benchmarks.timing import sync
from nnunetv2_desd.data.raw import resolve_dataset_name
from nnunetv2_desd.trainers.lookup import with_ext_trainers


def _build(trainer_name: str, dataset: str, plans_name: str, configuration: str, fold: int, device: str):
    folder = os.path.join(os.fspath(nnUNet_preprocessed), dataset)
    plans = load_json(os.path.join(folder, plans_name + '.json'))
    plans['continue_training'] = False
    with contextlib.redirect_stdout(sys.stderr):
        trainer = recursive_find_trainer_class_by_name(trainer_name)(
            plans, configuration, fold, load_json(os.path.join(folder, 'dataset.json')), torch.device(device))
        trainer.initialize()
        trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    trainer.network.train()
    trainer.lr_scheduler.step(0)
    return trainer


def _timed_step(trainer, batch) -> Tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process's threads) of one train_step."""
    sync(trainer.device)
    start, start_cpu = time.perf_counter(), time.process_time()
    trainer.train_step(batch)
    sync(trainer.device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _shutdown(trainer) -> None:
    for loader in (trainer.dataloader_train, trainer.dataloader_val, getattr(trainer, 'dataloader_unlabelled', None)):
        if isinstance(loader, NonDetMultiThreadedAugmenter):
            with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
                loader._finish()


def measure(trainer_names: List[str], dataset: str, plans_name: str, configuration: str, fold: int, device: str,
            iterations: int, warmup: int) -> Dict[str, dict]:
    """{trainer: {'compute': [s, ...], 'end_to_end': [s, ...], 'batch': description}}. The trainers' steps
    alternate (A B A B ...), so that load from other processes on the machine falls on all of them alike."""
    torch.manual_seed(0)
    trainers = {name: _build(name, dataset, plans_name, configuration, fold, device) for name in trainer_names}
    figures = {name: {'compute': [], 'compute_cpu': [], 'end_to_end': []} for name in trainer_names}
    try:
        n = warmup + iterations
        prefetched, live = {}, {}
        for name, trainer in trainers.items():
            prefetched[name] = [next(trainer.dataloader_train) for _ in range(n)]
            live[name] = getattr(trainer, 'dataloader_unlabelled', None)
            if live[name] is not None:
                trainer.dataloader_unlabelled = iter([next(live[name]) for _ in range(n)])
        for i in range(n):
            for name, trainer in trainers.items():
                seconds, cpu_seconds = _timed_step(trainer, prefetched[name][i])
                if i >= warmup:
                    figures[name]['compute'].append(seconds)
                    figures[name]['compute_cpu'].append(cpu_seconds)
        for name, trainer in trainers.items():
            if live[name] is not None:
                trainer.dataloader_unlabelled = live[name]
        for i in range(n):
            for name, trainer in trainers.items():
                seconds, _ = _timed_step(trainer, next(trainer.dataloader_train))
                if i >= warmup:
                    figures[name]['end_to_end'].append(seconds)
        for name, trainer in trainers.items():
            unlabelled = getattr(trainer, 'unlabelled_batch_size', None)
            figures[name]['batch'] = f'{trainer.batch_size}' + \
                (f' labelled + {unlabelled} unlabelled' if unlabelled else '')
            figures[name]['patch_size'] = list(trainer.configuration_manager.patch_size)
        return figures
    finally:
        for trainer in trainers.values():
            _shutdown(trainer)


def run(dataset: str, plans: str, configuration: str, fold: int, trainer: str, baseline: str, device: str,
        iterations: int, warmup: int) -> Tuple[List[str], Dict[str, dict]]:
    """Times ``trainer`` against ``baseline`` (see ``measure``) with this package's trainers findable and the
    trainers' log folders in a temporary nnUNet_results; returns (summary lines, figures)."""
    os.environ.update(with_ext_trainers(os.environ))
    dataset = resolve_dataset_name(dataset)
    with tempfile.TemporaryDirectory() as results:
        os.environ['nnUNet_results'] = results  # the trainers' log folders; nothing of the user's is touched
        figures = measure([baseline, trainer], dataset, plans, configuration, fold, device, iterations, warmup)
    base, dmd = figures[baseline], figures[trainer]
    lines = [f'{dataset}, plans {plans} ({configuration}), patch {base["patch_size"]}, device '
             f'{device}, {iterations} timed iterations after {warmup} warm-up, '
             f'nnUNet_n_proc_DA={os.environ.get("nnUNet_n_proc_DA", "default")}']
    for kind in ('compute', 'compute_cpu', 'end_to_end'):
        b, d = np.array(base[kind]), np.array(dmd[kind])
        lines.append(f'{kind}: {baseline} ({base["batch"]}) {b.mean():.3f} +- {b.std(ddof=1):.3f} s/it '
                     f'(median {np.median(b):.3f}); {trainer} ({dmd["batch"]}) {d.mean():.3f} +- '
                     f'{d.std(ddof=1):.3f} s/it (median {np.median(d):.3f}); ratio of means {d.mean() / b.mean():.2f}, '
                     f'of medians {np.median(d) / np.median(b):.2f}')
    return lines, figures
