"""Re-exports nnunetv2-desd's trainers for nnU-Net's lookup (``nnUNet_extTrainer`` points at this folder)."""
from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD, nnUNetTrainerDMDEnsemble  # noqa: F401
from nnunetv2_desd.trainers.finetune import nnUNetTrainerCADS, nnUNetTrainerDeSD, nnUNetTrainerReFs  # noqa: F401
from nnunetv2_desd.trainers.variants import (  # noqa: F401
    nnUNetTrainerCADS_pretrainedRecipe, nnUNetTrainerCADS_pretrainedRecipe_scratch, nnUNetTrainerCADS_scratch,
    nnUNetTrainerCADSDemo, nnUNetTrainerCADSDemo_pretrainedRecipe, nnUNetTrainerCADSDemo_pretrainedRecipe_scratch,
    nnUNetTrainerCADSDemo_scratch, nnUNetTrainerCADSTiny, nnUNetTrainerCADSTiny_pretrainedRecipe,
    nnUNetTrainerCADSTiny_pretrainedRecipe_scratch, nnUNetTrainerCADSTiny_scratch, nnUNetTrainerDemo,
    nnUNetTrainerDeSD_pretrainedRecipe, nnUNetTrainerDeSD_pretrainedRecipe_scratch, nnUNetTrainerDeSD_scratch,
    nnUNetTrainerDeSDDemo, nnUNetTrainerDeSDDemo_pretrainedRecipe, nnUNetTrainerDeSDDemo_pretrainedRecipe_scratch,
    nnUNetTrainerDeSDDemo_scratch, nnUNetTrainerDeSDTiny, nnUNetTrainerDeSDTiny_pretrainedRecipe,
    nnUNetTrainerDeSDTiny_pretrainedRecipe_scratch, nnUNetTrainerDeSDTiny_scratch, nnUNetTrainerDMDDemo,
    nnUNetTrainerDMDTiny, nnUNetTrainerReFs_pretrainedRecipe, nnUNetTrainerReFs_pretrainedRecipe_scratch,
    nnUNetTrainerReFs_scratch, nnUNetTrainerReFsDemo, nnUNetTrainerReFsDemo_pretrainedRecipe,
    nnUNetTrainerReFsDemo_pretrainedRecipe_scratch, nnUNetTrainerReFsDemo_scratch, nnUNetTrainerReFsTiny,
    nnUNetTrainerReFsTiny_pretrainedRecipe, nnUNetTrainerReFsTiny_pretrainedRecipe_scratch,
    nnUNetTrainerReFsTiny_scratch, nnUNetTrainerTiny)
