"""Two-view batches from nnU-Net's preprocessed data: its dataset class, data loader and multi-process augmenter."""
from typing import Sequence

from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

from nnunetv2_desd.pretraining.data.planning import PreparedData
from nnunetv2_desd.pretraining.views.augmentation import TwoViews, context_patch_size, desd_view_pipeline


def build_view_loader(prepared: PreparedData, patch_size: Sequence[int], batch_size: int, num_workers: int,
                      pin_memory: bool = False):
    """Infinite iterator of {'data': (B, 2C, *patch), 'keys': ...}; random locations, no foreground oversampling."""
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    dataset = infer_dataset_class(prepared.data_folder)(prepared.data_folder, prepared.identifiers)
    label_manager = prepared.plans_manager.get_label_manager(prepared.dataset_json)
    loader = nnUNetDataLoader(dataset, batch_size, context_patch_size(patch_size), patch_size, label_manager,
                              oversample_foreground_percent=0.0,
                              transforms=TwoViews(desd_view_pipeline(patch_size)))
    if num_workers == 0:
        return SingleThreadedAugmenter(loader, None)
    return NonDetMultiThreadedAugmenter(loader, None, num_workers, 6, None, pin_memory=pin_memory)
