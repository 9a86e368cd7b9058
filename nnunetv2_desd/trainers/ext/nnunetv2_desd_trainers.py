"""Re-exports nnunetv2-desd's trainers for nnU-Net's lookup (``nnUNet_extTrainer`` points at this folder)."""
from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD, nnUNetTrainerDMDEnsemble  # noqa: F401
from nnunetv2_desd.trainers.finetune import nnUNetTrainerCADS, nnUNetTrainerDeSD, nnUNetTrainerReFs  # noqa: F401
from nnunetv2_desd.trainers.variants import (nnUNetTrainerCADSDemo, nnUNetTrainerCADSTiny,  # noqa: F401
                                             nnUNetTrainerDemo, nnUNetTrainerDeSDDemo, nnUNetTrainerDeSDTiny,
                                             nnUNetTrainerDMDDemo, nnUNetTrainerDMDTiny, nnUNetTrainerReFsDemo,
                                             nnUNetTrainerReFsTiny, nnUNetTrainerTiny)
from nnunetv2_desd.trainers.variants import GENERATED_VARIANTS

globals().update(GENERATED_VARIANTS)  # the other recipe and the _scratch twins
