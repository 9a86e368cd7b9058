"""Deep Mutual Distillation inside nnU-Net: ``nnUNetTrainerDMD`` trains on labelled cases plus an unlabelled pool.

    desd_preprocess_unlabelled -d 501 -u 500
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerDMD

``DMDPair`` holds the two networks (built from the plans by the same call) as one module, so nnU-Net's checkpoint,
optimizer, ``--c`` and DDP handle both; in eval mode it answers with network 1. The recipe is a set of trainer
attributes (``dmd_lambda``, ``dmd_temperature``, the two batch sizes, ``dmd_pool_sources``, ...), changed in a
subclass. ``nnUNetTrainerDMDEnsemble`` validates and predicts with the mean of both networks' logits.
Design and measured cost: docs/dmd.md.
"""
import contextlib
import math
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from torch import autocast, nn

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.wrappers import unwrapped
from nnunetv2_desd.data.fractions import fraction_fold_info
from nnunetv2_desd.data.pool import (CASE_SEPARATOR, PoolDataset, check_pool, pool_paths, preprocess_command,
                                     read_pool_record)
from nnunetv2_desd.trainers.dmd_loss import DeepSupervisedMutualDistillation, MutualDistillationLoss
from nnunetv2_desd.trainers.finetune import weights_nnunet_will_load

DMD_FILE = 'dmd.json'  # written into fold_X: recipe and unlabelled pool of the run


class DMDPair(nn.Module):
    """Two networks of one architecture. Training mode: both outputs (out1, out2). Eval mode: network 1's output,
    or with ``ensemble`` the mean of both networks' logits (per deep-supervision output where there are several)."""

    def __init__(self, net1: nn.Module, net2: nn.Module, ensemble: bool = False):
        super().__init__()
        self.net1, self.net2 = net1, net2
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor):
        if self.training:
            return self.net1(x), self.net2(x)
        out1 = self.net1(x)
        if not self.ensemble:
            return out1
        out2 = self.net2(x)
        if isinstance(out1, (list, tuple)):
            return [(a + b) / 2 for a, b in zip(out1, out2)]
        return (out1 + out2) / 2


def split_batch(planned: int, labelled: Optional[int] = None, unlabelled: Optional[int] = None) -> Tuple[int, int]:
    """(labelled, unlabelled) patches per step. A size left None is the planned batch minus the other one (at
    least 1); both None: the planned batch split in two, the labelled part getting the larger half."""
    if labelled is None and unlabelled is None:
        labelled = max(1, math.ceil(planned / 2))
        unlabelled = max(1, planned - labelled)
    elif labelled is None:
        labelled = max(1, planned - unlabelled)
    elif unlabelled is None:
        unlabelled = max(1, planned - labelled)
    for name, value in (('labelled', labelled), ('unlabelled', unlabelled)):
        if int(value) != value or value < 1:
            raise DesdError(f'the DMD {name} batch size must be a positive integer, got {value!r}.')
    return int(labelled), int(unlabelled)


def _labelled_part(output, n: int):
    return [o[:n] for o in output] if isinstance(output, (list, tuple)) else output[:n]


class nnUNetTrainerDMD(nnUNetTrainer):
    """Deep Mutual Distillation (Xie et al., MICCAI 2023) over labelled cases plus an unlabelled pool."""
    ensemble_inference = False  # class attribute: build_network_architecture also runs at prediction

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dmd_lambda = 4.0
        self.dmd_temperature = 2.0
        self.dmd_labelled_batch_size = None
        self.dmd_unlabelled_batch_size = None
        self.dmd_deep_supervision = False
        self.dmd_pool_sources = ('left_out', 'unlabelled')
        self.unlabelled_batch_size = None  # -> _set_batch_size_and_oversample
        self.dmd_loss = None  # -> initialize
        self.unlabelled_pool = None  # pool key -> (preprocessed folder, case id); -> get_dataloaders
        self.dataloader_unlabelled = None

    @classmethod
    def build_network_architecture(cls, plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        nets = [nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                         num_output_channels, enable_deep_supervision)
                for _ in range(2)]  # two random initialisations of the planned network
        return DMDPair(*nets, ensemble=cls.ensemble_inference)

    @property
    def pair(self) -> DMDPair:
        return unwrapped(self.network)

    def initialize(self):
        if weights_nnunet_will_load() is not None:
            raise DesdError(f'{type(self).__name__} trains two randomly initialised networks that teach each other; '
                            f'-pretrained_weights is not supported. Remove it.')
        if self.is_cascaded:
            raise DesdError(f'{type(self).__name__} does not train cascade stages ({self.configuration_name}): '
                            f'unlabelled cases have no previous-stage predictions.')
        super().initialize()
        regions = self.label_manager.has_regions
        weights = self.loss.weight_factors if self.enable_deep_supervision and self.dmd_deep_supervision else None
        self.dmd_loss = DeepSupervisedMutualDistillation(
            MutualDistillationLoss(self.dmd_temperature, 'sigmoid' if regions else 'softmax',
                                   batch_dice=self.configuration_manager.batch_dice), weights)

    def _set_batch_size_and_oversample(self):
        super()._set_batch_size_and_oversample()
        planned = self.batch_size
        self.batch_size, self.unlabelled_batch_size = split_batch(planned, self.dmd_labelled_batch_size,
                                                                  self.dmd_unlabelled_batch_size)
        p = self.oversample_foreground_percent
        if p > 0 and round(self.batch_size * (1 - p)) >= self.batch_size:
            self.probabilistic_oversampling = True  # nnU-Net's rounding would never oversample this batch
        self.print_to_log_file(f'DMD batch: {self.batch_size} labelled + {self.unlabelled_batch_size} unlabelled '
                               f'patches per step (planned batch size {planned})')

    def set_deep_supervision_enabled(self, enabled: bool):
        for net in (self.pair.net1, self.pair.net2):
            net.decoder.deep_supervision = enabled

    # ---------------------------------------------------------------------------------------------- unlabelled data
    def find_unlabelled_pool(self) -> Dict[str, Tuple[str, str]]:
        """pool key -> (preprocessed folder, case id); DesdError naming the fix where the fold has no pool."""
        base, data_id = self.preprocessed_dataset_folder_base, self.configuration_manager.data_identifier
        dataset = self.plans_manager.dataset_name
        pool = {}
        if 'left_out' in self.dmd_pool_sources and self.fold != 'all':
            info = fraction_fold_info(base, int(self.fold))
            for case in (info or {}).get('left_out', []):
                pool[f'{dataset}{CASE_SEPARATOR}{case}'] = (self.preprocessed_dataset_folder, case)
        if 'unlabelled' in self.dmd_pool_sources:
            record = read_pool_record(base, data_id)
            if record is not None:
                folder = pool_paths(base, data_id)[0]
                for case in check_pool(record, self.plans_manager.plans, self.configuration_name,
                                       self.num_input_channels, base):
                    pool[case] = (folder, case)
        if not pool:
            raise DesdError(f'{type(self).__name__} needs unlabelled cases and fold {self.fold} has none. Preprocess '
                            f'unlabelled images with {dataset}\'s plans: '
                            f'{preprocess_command(dataset, [], self.plans_manager.plans_name, self.configuration_name)}'
                            f'; or train a labelled-fraction fold (desd_benchmark -d {dataset} -tr '
                            f'{type(self).__name__} --fractions 0.25), whose left-out cases form the pool.')
        return pool

    def get_dataloaders(self):
        self.unlabelled_pool = self.find_unlabelled_pool()  # before any worker starts: a missing pool fails fast
        dataloader_train, dataloader_val = super().get_dataloaders()
        self.dataloader_unlabelled = self.get_unlabelled_dataloader(self.unlabelled_pool)
        return dataloader_train, dataloader_val

    def get_unlabelled_dataloader(self, pool: Dict[str, Tuple[str, str]]):
        """nnUNetDataLoader over the pool: random patches (no foreground oversampling), nnU-Net's training
        augmentation, its own workers. The targets it yields are never used in a loss."""
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            self.configuration_manager.patch_size, rotation, None, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=False,
            foreground_labels=self.label_manager.foreground_labels, regions=None, ignore_label=None)
        loader = nnUNetDataLoader(PoolDataset(pool), self.unlabelled_batch_size, initial_patch_size,
                                  self.configuration_manager.patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, sampling_probabilities=None, pad_sides=None,
                                  transforms=transforms, probabilistic_oversampling=False)
        loader.has_ignore = False  # no annotated region to sample from: patches are drawn uniformly
        num_processes = get_allowed_n_proc_DA()
        if num_processes == 0:
            augmenter = SingleThreadedAugmenter(loader, None)
        else:
            augmenter = NonDetMultiThreadedAugmenter(loader, None, num_processes, max(6, num_processes // 2), None,
                                                     pin_memory=self.device.type == 'cuda', wait_time=0.002)
        next(augmenter)
        return augmenter

    def on_train_start(self):
        super().on_train_start()
        left_out = sum(folder == self.preprocessed_dataset_folder for folder, _ in self.unlabelled_pool.values())
        self.print_to_log_file(
            f'DMD: lambda {self.dmd_lambda}, temperature {self.dmd_temperature}, deep supervision of the DMD loss '
            f'{self.dmd_deep_supervision}, inference with {"both networks" if self.ensemble_inference else "network 1"}'
            f'; unlabelled pool: {len(self.unlabelled_pool)} cases ({left_out} left out of this labelled fraction, '
            f'{len(self.unlabelled_pool) - left_out} from desd_preprocess_unlabelled)')
        if self.local_rank == 0:
            atomic_write_json({
                'trainer': type(self).__name__, 'lambda': self.dmd_lambda, 'temperature': self.dmd_temperature,
                'nonlinearity': self.dmd_loss.loss.nonlinearity, 'batch_dice': self.dmd_loss.loss.batch_dice,
                'deep_supervision': self.dmd_deep_supervision, 'ensemble_inference': self.ensemble_inference,
                'planned_batch_size': self.configuration_manager.batch_size,
                'labelled_batch_size': self.batch_size, 'unlabelled_batch_size': self.unlabelled_batch_size,
                'pool_sources': list(self.dmd_pool_sources),
                'unlabelled_pool': {'num_cases': len(self.unlabelled_pool), 'left_out_cases': int(left_out),
                                    'cases': sorted(self.unlabelled_pool)},
            }, os.path.join(self.output_folder, DMD_FILE))

    def on_train_end(self):
        super().on_train_end()
        if isinstance(self.dataloader_unlabelled, NonDetMultiThreadedAugmenter):
            with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
                self.dataloader_unlabelled._finish()

    # ---------------------------------------------------------------------------------------------------- training
    def train_step(self, batch: dict) -> dict:
        unlabelled = next(self.dataloader_unlabelled)
        n_labelled = batch['data'].shape[0]
        data = torch.cat((batch['data'], unlabelled['data'])).to(self.device, non_blocking=True)
        target = batch['target']
        if isinstance(target, list):
            target = [t.to(self.device, non_blocking=True) for t in target]
        else:
            target = target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            out1, out2 = self.network(data)
            sup1 = self.loss(_labelled_part(out1, n_labelled), target)
            sup2 = self.loss(_labelled_part(out2, n_labelled), target)
            dmd = self.dmd_loss(out1, out2)
            loss = sup1 + sup2 + self.dmd_lambda * dmd

        nets = (self.pair.net1, self.pair.net2)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            for net in nets:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            for net in nets:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            self.optimizer.step()
        return {'loss': loss.detach().cpu().numpy(), 'sup_loss_1': sup1.detach().cpu().numpy(),
                'sup_loss_2': sup2.detach().cpu().numpy(), 'dmd_loss': dmd.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        parts = {k: float(np.mean([o[k] for o in train_outputs])) for k in ('sup_loss_1', 'sup_loss_2', 'dmd_loss')}
        self.print_to_log_file('DMD train losses (this process): ' +
                               ', '.join(f'{k} {v:.4f}' for k, v in parts.items()))


class nnUNetTrainerDMDEnsemble(nnUNetTrainerDMD):
    """DMD; validation and prediction average both networks' logits (2x inference time)."""
    ensemble_inference = True
