"""Two-view batches from nnU-Net's preprocessed data: its dataset class, data loader and multi-process augmenter."""
from typing import Dict, Optional, Sequence

import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from torch.nn import functional as F

from nnunetv2_desd.data.planning import PreparedData
from nnunetv2_desd.pretraining.views.augmentation import TwoViews, context_patch_size, desd_view_pipeline


def resize_drr(drr: torch.Tensor, patch_size: Sequence[int], channels: int) -> torch.Tensor:
    """(1, a0, a1, a2) DRR with size 1 on the projection axis -> (channels, *patch) with size 1 on that axis.

    The whole radiograph is resized (bilinear, anti-aliased) to the patch's two other axes, as CADS resizes its
    DRR to the 2D input size; every input channel gets the same radiograph.
    """
    from nnunetv2_desd.data.drrs import drr_projection_axis
    axis = drr_projection_axis(drr.shape)
    size = [int(p) for i, p in enumerate(patch_size) if i != axis]
    image = F.interpolate(drr.squeeze(1 + axis)[None].float(), size=size, mode='bilinear', antialias=True,
                          align_corners=False)[0]
    return image.unsqueeze(1 + axis).expand(channels, *[1 if i == axis else p for i, p in enumerate(patch_size)])


class ViewsAndDrrLoader(nnUNetDataLoader):
    """nnU-Net's loader with each case's DRR added to the batch: ``batch['drr']`` (B, C, *patch), size 1 on the
    projection axis. DRRs are read once per worker process and kept (a few KiB each)."""

    def __init__(self, *args, drr_files: Dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.drr_files = drr_files
        self._drrs: Dict[str, torch.Tensor] = {}

    def _drr(self, key: str, channels: int) -> torch.Tensor:
        if key not in self._drrs:
            from nnunetv2_desd.data.drrs import load_drr
            drr = torch.from_numpy(load_drr(self.drr_files[key]))
            self._drrs[key] = resize_drr(drr, self.final_patch_size, channels)
        return self._drrs[key]

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        channels = batch['data'].shape[1] // 2  # two views on the channel axis
        batch['drr'] = torch.stack([self._drr(k, channels) for k in batch['keys']])
        return batch


def build_view_loader(prepared: PreparedData, patch_size: Sequence[int], batch_size: int, num_workers: int,
                      pin_memory: bool = False, drr_files: Optional[Dict[str, str]] = None):
    """Infinite iterator of {'data': (B, 2C, *patch), 'keys': ...} (plus 'drr' given ``drr_files``);
    random locations, no foreground oversampling."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(prepared.data_folder)(prepared.data_folder, prepared.identifiers)
    label_manager = prepared.label_manager
    loader_class, extra = (nnUNetDataLoader, {}) if drr_files is None else (ViewsAndDrrLoader,
                                                                            {'drr_files': drr_files})
    loader = loader_class(dataset, batch_size, context_patch_size(patch_size), patch_size, label_manager,
                          oversample_foreground_percent=0.0, transforms=TwoViews(desd_view_pipeline(patch_size)),
                          **extra)
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, num_workers, 6, None, pin_memory=pin_memory)


def finish_loader(loader) -> None:
    """Stops a training loader's workers, where it has any (a view loader, or a method's loader around one)."""
    if hasattr(loader, '_finish'):
        loader._finish()
