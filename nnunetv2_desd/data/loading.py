"""Background augmentation for nnU-Net data loaders: first-come workers, or ordered workers for reproducible runs."""
from typing import Optional, Sequence

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter


class WorkerSeeded:
    """Mixin for an nnU-Net data loader. In a worker, torch's generator is seeded from the worker's numpy seed,
    which both augmenters set (batchgeneratorsv2's transforms draw from torch), and torch uses one thread."""

    def set_thread_id(self, thread_id: int) -> None:
        super().set_thread_id(thread_id)
        torch.set_num_threads(1)
        torch.manual_seed(int(np.random.randint(0, 2 ** 31 - 1)))


def start_augmenter(loader, num_workers: int, seeds: Optional[Sequence[int]] = None, pin_memory: bool = False,
                    ordered: bool = False):
    """Batches of ``loader`` (which applies its own transforms): in this process without workers; else from
    ``num_workers`` processes seeded by ``seeds``, taken in turn when ``ordered`` (the same batches in the same order
    on every run) or as they come (faster: a slow batch does not hold the others up)."""
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    if ordered:
        return MultiThreadedAugmenter(loader, None, num_workers, 2, seeds, pin_memory=pin_memory)
    return NonDetMultiThreadedAugmenter(loader, None, num_workers, max(6, num_workers // 2), seeds,
                                        pin_memory=pin_memory)
