"""Short schedules for tests and the CPU demo, the other fine-tuning recipe, and the from-scratch twins.

``*Tiny`` and ``*Demo`` trainers pair with ``nnUNetTrainerTiny`` / ``nnUNetTrainerDemo``. For every pre-trained
fine-tuning trainer T there are ``T_<recipe>Recipe`` (the other recipe of ``finetune.FINETUNE_PRESETS``) and
``T_scratch`` / ``T_<recipe>Recipe_scratch`` (the same recipe from random initialisation: ``desd_benchmark``'s
second baseline). Your own ``MyTrainer`` gets its twin with ``class MyTrainer_scratch(MyTrainer): from_scratch = True``.
Details: docs/finetuning.md.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD
from nnunetv2_desd.trainers.finetune import nnUNetTrainerCADS, nnUNetTrainerDeSD, nnUNetTrainerReFs

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


class _NoMirroring:
    """No mirroring, in training augmentation or at test time (as nnU-Net's nnUNetTrainerNoMirroring): validation
    and prediction then run 1 instead of 8 sliding-window passes per case."""

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, _ = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerTiny(_NoMirroring, _ShortSchedule, nnUNetTrainer):
    """Tests: 2 epochs x 2 iterations, no mirroring."""
    schedule = TINY


class nnUNetTrainerDeSDTiny(_NoMirroring, _ShortSchedule, nnUNetTrainerDeSD):
    """Tests: 2 epochs x 2 iterations, no mirroring."""
    schedule = TINY


class nnUNetTrainerCADSTiny(_NoMirroring, _ShortSchedule, nnUNetTrainerCADS):
    """Tests: 2 epochs x 2 iterations, no mirroring."""
    schedule = TINY


class nnUNetTrainerDMDTiny(_NoMirroring, _ShortSchedule, nnUNetTrainerDMD):
    """Tests: 2 epochs x 2 iterations of DMD, no mirroring."""
    schedule = TINY


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


class nnUNetTrainerReFsTiny(_NoMirroring, _ShortSchedule, nnUNetTrainerReFs):
    """Tests: 2 epochs x 2 iterations, no mirroring."""
    schedule = TINY


class nnUNetTrainerReFsDemo(_NoMirroring, _ShortSchedule, nnUNetTrainerReFs):
    """CPU demo: 10 epochs x 10 iterations, no mirroring."""
    schedule = DEMO


# The other fine-tuning recipe and the from-scratch twins of every pre-trained trainer above and in ``finetune``.


class nnUNetTrainerDeSD_scratch(nnUNetTrainerDeSD):
    """nnUNetTrainerDeSD from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerDeSD_pretrainedRecipe(nnUNetTrainerDeSD):
    """nnUNetTrainerDeSD with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerDeSD_pretrainedRecipe_scratch(nnUNetTrainerDeSD_pretrainedRecipe):
    """nnUNetTrainerDeSD_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADS_scratch(nnUNetTrainerCADS):
    """nnUNetTrainerCADS from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADS_pretrainedRecipe(nnUNetTrainerCADS):
    """nnUNetTrainerCADS with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerCADS_pretrainedRecipe_scratch(nnUNetTrainerCADS_pretrainedRecipe):
    """nnUNetTrainerCADS_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFs_scratch(nnUNetTrainerReFs):
    """nnUNetTrainerReFs from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFs_pretrainedRecipe(nnUNetTrainerReFs):
    """nnUNetTrainerReFs with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerReFs_pretrainedRecipe_scratch(nnUNetTrainerReFs_pretrainedRecipe):
    """nnUNetTrainerReFs_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerDeSDTiny_scratch(nnUNetTrainerDeSDTiny):
    """nnUNetTrainerDeSDTiny from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerDeSDTiny_pretrainedRecipe(nnUNetTrainerDeSDTiny):
    """nnUNetTrainerDeSDTiny with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerDeSDTiny_pretrainedRecipe_scratch(nnUNetTrainerDeSDTiny_pretrainedRecipe):
    """nnUNetTrainerDeSDTiny_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADSTiny_scratch(nnUNetTrainerCADSTiny):
    """nnUNetTrainerCADSTiny from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADSTiny_pretrainedRecipe(nnUNetTrainerCADSTiny):
    """nnUNetTrainerCADSTiny with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerCADSTiny_pretrainedRecipe_scratch(nnUNetTrainerCADSTiny_pretrainedRecipe):
    """nnUNetTrainerCADSTiny_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFsTiny_scratch(nnUNetTrainerReFsTiny):
    """nnUNetTrainerReFsTiny from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFsTiny_pretrainedRecipe(nnUNetTrainerReFsTiny):
    """nnUNetTrainerReFsTiny with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerReFsTiny_pretrainedRecipe_scratch(nnUNetTrainerReFsTiny_pretrainedRecipe):
    """nnUNetTrainerReFsTiny_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerDeSDDemo_scratch(nnUNetTrainerDeSDDemo):
    """nnUNetTrainerDeSDDemo from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerDeSDDemo_pretrainedRecipe(nnUNetTrainerDeSDDemo):
    """nnUNetTrainerDeSDDemo with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerDeSDDemo_pretrainedRecipe_scratch(nnUNetTrainerDeSDDemo_pretrainedRecipe):
    """nnUNetTrainerDeSDDemo_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADSDemo_scratch(nnUNetTrainerCADSDemo):
    """nnUNetTrainerCADSDemo from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerCADSDemo_pretrainedRecipe(nnUNetTrainerCADSDemo):
    """nnUNetTrainerCADSDemo with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerCADSDemo_pretrainedRecipe_scratch(nnUNetTrainerCADSDemo_pretrainedRecipe):
    """nnUNetTrainerCADSDemo_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFsDemo_scratch(nnUNetTrainerReFsDemo):
    """nnUNetTrainerReFsDemo from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True


class nnUNetTrainerReFsDemo_pretrainedRecipe(nnUNetTrainerReFsDemo):
    """nnUNetTrainerReFsDemo with the 'pretrained' fine-tuning recipe."""
    recipe = 'pretrained'


class nnUNetTrainerReFsDemo_pretrainedRecipe_scratch(nnUNetTrainerReFsDemo_pretrainedRecipe):
    """nnUNetTrainerReFsDemo_pretrainedRecipe from nnU-Net's random initialisation (no -pretrained_weights)."""
    from_scratch = True
