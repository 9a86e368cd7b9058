"""Semi-supervised training inside nnU-Net: Deep Mutual Distillation (DMD) over labelled cases plus an unlabelled pool.

- ``dmd_loss``: the DMD loss, 1 - Dice(softmax(z1 / T), softmax(z2 / T)).
- ``pool``: where an unlabelled pool is stored next to the labelled dataset's data, its record and checks.
- ``unlabelled``: ``desd_preprocess_unlabelled``, unlabelled images through nnU-Net's preprocessor with the
  labelled dataset's plans.
- The trainer, ``nnunetv2_desd.trainers.dmd.nnUNetTrainerDMD``, is found by stock ``nnUNetv2_train -tr``.
"""
