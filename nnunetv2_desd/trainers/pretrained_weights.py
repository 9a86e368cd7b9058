"""Moved to ``nnunetv2_desd.pretraining.engine.pretrained_weights`` (pre-training's ``--init`` reads checkpoints too);
this path works for one more release."""
import warnings

from nnunetv2_desd.pretraining.engine.pretrained_weights import *  # noqa: F401,F403
from nnunetv2_desd.pretraining.engine.pretrained_weights import (PretrainedExport, adapt_input_channels,  # noqa: F401
                                                                 mismatch_message, plan_loading, read_export)

warnings.warn('nnunetv2_desd.trainers.pretrained_weights moved to nnunetv2_desd.pretraining.engine.pretrained_weights',
              DeprecationWarning, stacklevel=2)
