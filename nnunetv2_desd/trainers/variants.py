"""Short schedules for tests and the CPU demo, the other fine-tuning recipe, and the from-scratch twins.

A benchmark compares a pre-trained or DMD trainer with the vanilla trainer of the same schedule:
nnUNetTrainerDeSDTiny / nnUNetTrainerDMDTiny with nnUNetTrainerTiny, nnUNetTrainerDeSDDemo / nnUNetTrainerDMDDemo
with nnUNetTrainerDemo. For every pre-trained fine-tuning trainer T defined here or in ``finetune`` there are also:

- ``T_<recipe>Recipe``: T with the other recipe of ``finetune.FINETUNE_RECIPES`` (``nnUNetTrainerDeSD_pretrainedRecipe``);
- ``T_scratch`` (and ``T_<recipe>Recipe_scratch``): T's recipe and schedule from nnU-Net's random initialisation,
  without ``-pretrained_weights``: ``desd_benchmark``'s second baseline, which isolates the initialisation.

Your own subclass ``MyTrainer`` gets its twin with ``class MyTrainer_scratch(MyTrainer): from_scratch = True``.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD
from nnunetv2_desd.trainers.finetune import (FINETUNE_PRESETS, nnUNetTrainerCADS,
                                             nnUNetTrainerDeSD, nnUNetTrainerPretrained, nnUNetTrainerReFs)

TINY = dict(num_epochs=2, num_iterations_per_epoch=2, num_val_iterations_per_epoch=1)  # warm-up: 1 epoch (scaled)
DEMO = dict(num_epochs=10, num_iterations_per_epoch=10, num_val_iterations_per_epoch=2)  # warm-up: 1 epoch


class _ShortSchedule:
    """Overrides the schedule attributes after the trainer's own __init__."""
    schedule = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in self.schedule.items():
            setattr(self, key, value)


class nnUNetTrainerTiny(_ShortSchedule, nnUNetTrainer):
    """Tests: 2 epochs x 2 iterations."""
    schedule = TINY


class nnUNetTrainerDeSDTiny(_ShortSchedule, nnUNetTrainerDeSD):
    """Tests: 2 epochs x 2 iterations."""
    schedule = TINY


class nnUNetTrainerCADSTiny(_ShortSchedule, nnUNetTrainerCADS):
    """Tests: 2 epochs x 2 iterations."""
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
    """CPU demo: 10 epochs x 10 iterations, no mirroring."""
    schedule = DEMO


class nnUNetTrainerCADSDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerCADS):
    """CPU demo: 10 epochs x 10 iterations, no mirroring."""
    schedule = DEMO


class nnUNetTrainerDMDDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerDMD):
    """CPU demo: 10 epochs x 10 iterations of DMD, no mirroring."""
    schedule = DEMO


class nnUNetTrainerReFsTiny(_ShortSchedule, nnUNetTrainerReFs):
    """Tests: 2 epochs x 2 iterations."""
    schedule = TINY


class nnUNetTrainerReFsDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerReFs):
    """CPU demo: 10 epochs x 10 iterations, no mirroring."""
    schedule = DEMO


def _recipe_variant(trainer: type, recipe: str) -> type:
    return type(f'{trainer.__name__}_{recipe}Recipe', (trainer,),
                {'recipe': recipe, '__module__': __name__, '__doc__': f'{trainer.__name__} with the {recipe!r} '
                                                                         f'fine-tuning recipe.'})


def _scratch_twin(trainer: type) -> type:
    return type(f'{trainer.__name__}_scratch', (trainer,),
                {'from_scratch': True, '__module__': __name__,
                 '__doc__': f'{trainer.__name__} from nnU-Net\'s random initialisation (no -pretrained_weights).'})


def _generated_variants() -> dict:
    named = [v for v in globals().values() if isinstance(v, type) and issubclass(v, nnUNetTrainerPretrained)
             and v is not nnUNetTrainerPretrained]
    generated = {}
    for trainer in named:
        for recipe in FINETUNE_PRESETS:
            variant = trainer if recipe == trainer.recipe else _recipe_variant(trainer, recipe)
            generated[variant.__name__] = variant
            generated[variant.__name__ + '_scratch'] = _scratch_twin(variant)
    return generated


GENERATED_VARIANTS = _generated_variants()  # re-exported by ext/ for nnU-Net's lookup
globals().update(GENERATED_VARIANTS)
