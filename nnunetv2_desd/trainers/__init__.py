"""Fine-tuning inside stock nnU-Net: trainers that load pre-trained exports, DMD, and their short variants."""
from nnunetv2_desd.trainers.lookup import (EXT_TRAINER_FOLDER, PROVENANCE_FILE, TRAINER_FOR_METHOD,  # noqa: F401
                                           with_ext_trainers)
