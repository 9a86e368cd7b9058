"""Moved to ``nnunetv2_desd.pretraining.engine.pretrained_weights`` (pre-training's ``--init`` reads checkpoints too);
this path works for one more release."""
import warnings

from nnunetv2_desd.pretraining.engine.pretrained_weights import *  # noqa: F401,F403

warnings.warn('nnunetv2_desd.trainers.pretrained_weights moved to nnunetv2_desd.pretraining.engine.pretrained_weights',
              DeprecationWarning, stacklevel=2)
