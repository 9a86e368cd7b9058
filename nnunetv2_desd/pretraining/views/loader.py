"""Two-view batches from nnU-Net's preprocessed data: its dataset class, data loader and multi-process augmenter."""
from typing import Dict, Optional, Sequence, Union

import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch.nn import functional as F

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.drrs import drr_projection_axis, load_drr
from nnunetv2_desd.data.loading import WorkerSeeded, start_augmenter
from nnunetv2_desd.data.planning import PreparedData, PreparedPool, as_pool
from nnunetv2_desd.data.pool import PoolDataset
from nnunetv2_desd.pretraining.views.augmentation import TwoViews, context_patch_size, desd_view_pipeline

LOADER_ERROR = 'desd_error'


def resize_drr(drr: torch.Tensor, patch_size: Sequence[int], channels: int) -> torch.Tensor:
    """(1, a0, a1, a2) DRR with size 1 on the projection axis -> (channels, *patch) with size 1 on that axis.

    The whole radiograph is resized (bilinear, anti-aliased) to the patch's two other axes, as CADS resizes its
    DRR to the 2D input size; every input channel gets the same radiograph.
    """
    axis = drr_projection_axis(drr.shape)
    size = [int(p) for i, p in enumerate(patch_size) if i != axis]
    image = F.interpolate(drr.squeeze(1 + axis)[None].float(), size=size, mode='bilinear', antialias=True,
                          align_corners=False)[0]
    return image.unsqueeze(1 + axis).expand(channels, *[1 if i == axis else p for i, p in enumerate(patch_size)])


class PoolLoader(WorkerSeeded, nnUNetDataLoader):
    """nnU-Net's loader whose batch becomes ``{LOADER_ERROR: message}`` when a case cannot be read, so the message
    reaches the training process through the batch queue (the engine raises it) instead of a worker's traceback."""

    def generate_train_batch(self):
        try:
            return super().generate_train_batch()
        except DesdError as e:
            return {LOADER_ERROR: str(e)}


class ViewsAndDrrLoader(PoolLoader):
    """nnU-Net's loader with each case's DRR added to the batch: ``batch['drr']`` (B, C, *patch), size 1 on the
    projection axis. DRRs are read from disk (memory-mapped) when needed; each worker keeps only the last
    ``cache_size`` resized ones, so its memory does not grow with the number of cases."""
    cache_size = 256  # resized DRRs kept per worker process (one patch-sized 2D image each)

    def __init__(self, *args, drr_files: Dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.drr_files = drr_files
        self._drrs: Dict[tuple, torch.Tensor] = {}  # (case, channels) -> resized DRR, least recently used first

    def _drr(self, key: str, channels: int) -> torch.Tensor:
        if (key, channels) in self._drrs:
            self._drrs[key, channels] = self._drrs.pop((key, channels))  # now the most recently used
            return self._drrs[key, channels]
        drr = torch.tensor(load_drr(self.drr_files[key], mmap=True))  # a copy of the mapped file
        self._drrs[key, channels] = resize_drr(drr, self.final_patch_size, channels)
        while len(self._drrs) > self.cache_size:
            del self._drrs[next(iter(self._drrs))]
        return self._drrs[key, channels]

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        if LOADER_ERROR in batch:
            return batch
        channels = batch['data'].shape[1] // 2  # two views on the channel axis
        try:
            batch['drr'] = torch.stack([self._drr(k, channels) for k in batch['keys']])
        except DesdError as e:
            return {LOADER_ERROR: str(e)}
        return batch


def build_view_loader(prepared: Union[PreparedPool, PreparedData], patch_size: Sequence[int], batch_size: int,
                      num_workers: int, pin_memory: bool = False, drr_files: Optional[Dict[str, str]] = None,
                      seeds: Optional[Sequence[int]] = None, ordered: bool = False):
    """Infinite iterator of {'data': (B, 2C, *patch), 'keys': ...} (plus 'drr' given ``drr_files``) over every case
    of the pool (``dataset_weights``: per-dataset sampling); random locations, no foreground oversampling. Without
    workers the loader draws from this process's RNGs; ``seeds`` (one per worker) and ``ordered``: see
    ``start_augmenter``."""
    prepared = as_pool(prepared)
    dataset = PoolDataset(prepared.cases(), prepared.preparation_command)
    loader_class, extra = (PoolLoader, {}) if drr_files is None else (ViewsAndDrrLoader, {'drr_files': drr_files})
    loader = loader_class(dataset, batch_size, context_patch_size(patch_size), patch_size, prepared.label_manager,
                          oversample_foreground_percent=0.0,
                          sampling_probabilities=prepared.sampling_probabilities(dataset.identifiers),
                          transforms=TwoViews(desd_view_pipeline(patch_size)), **extra)
    return start_augmenter(loader, num_workers, seeds, pin_memory, ordered)


def finish_loader(loader) -> None:
    """Stops a training loader's workers, where it has any (a view loader, or a method's loader around one)."""
    if hasattr(loader, '_finish'):
        loader._finish()
