"""Short schedules for tests and the CPU demo, for the vanilla, the pre-trained and the DMD trainers alike.

A benchmark compares a pre-trained or DMD trainer with the vanilla trainer of the same schedule:
nnUNetTrainerDeSDTiny / nnUNetTrainerDMDTiny with nnUNetTrainerTiny, nnUNetTrainerDeSDDemo / nnUNetTrainerDMDDemo
with nnUNetTrainerDemo.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD
from nnunetv2_desd.trainers.finetune import nnUNetTrainerCADS, nnUNetTrainerDeSD, nnUNetTrainerReFs

TINY = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1, warmup_epochs=1)
DEMO = dict(num_epochs=10, num_iterations_per_epoch=10, num_val_iterations_per_epoch=2, warmup_epochs=2)


class _ShortSchedule:
    """Overrides the schedule attributes after the trainer's own __init__ (warmup_epochs only where it exists)."""
    schedule = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in self.schedule.items():
            if key != 'warmup_epochs' or hasattr(self, key):
                setattr(self, key, value)


class nnUNetTrainerTiny(_ShortSchedule, nnUNetTrainer):
    """Tests: 2 epochs x 2 iterations."""
    schedule = TINY


class nnUNetTrainerDeSDTiny(_ShortSchedule, nnUNetTrainerDeSD):
    """Tests: 2 epochs x 2 iterations, 1 warm-up epoch."""
    schedule = TINY


class nnUNetTrainerCADSTiny(_ShortSchedule, nnUNetTrainerCADS):
    """Tests: 2 epochs x 2 iterations, 1 warm-up epoch."""
    schedule = TINY


class nnUNetTrainerDMDTiny(_ShortSchedule, nnUNetTrainerDMD):
    """Tests: 2 epochs x 2 iterations of DMD."""
    schedule = TINY


class _NoMirroring:
    """No mirroring, in training augmentation or at test time (as nnU-Net's nnUNetTrainerNoMirroring): the demo's
    validation then runs 1 instead of 8 sliding-window passes per case."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerDemo(_NoMirroring, _ShortSchedule, nnUNetTrainer):
    """CPU demo: 10 epochs x 10 iterations, no mirroring."""
    schedule = DEMO


class nnUNetTrainerDeSDDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerDeSD):
    """CPU demo: 10 epochs x 10 iterations, 2 warm-up epochs, no mirroring."""
    schedule = DEMO


class nnUNetTrainerCADSDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerCADS):
    """CPU demo: 10 epochs x 10 iterations, 2 warm-up epochs, no mirroring."""
    schedule = DEMO


class nnUNetTrainerDMDDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerDMD):
    """CPU demo: 10 epochs x 10 iterations of DMD, no mirroring."""
    schedule = DEMO


class nnUNetTrainerReFsTiny(_ShortSchedule, nnUNetTrainerReFs):
    """Tests: 2 epochs x 2 iterations, 1 warm-up epoch."""
    schedule = TINY


class nnUNetTrainerReFsDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerReFs):
    """CPU demo: 10 epochs x 10 iterations, 2 warm-up epochs, no mirroring."""
    schedule = DEMO
