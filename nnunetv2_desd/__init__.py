"""nnunetv2-desd: label-efficient learning (DeSD, CADS, ReFs, DMD) inside nnU-Net v2."""
from nnunetv2_desd import _moved  # noqa: F401  (the previous release's module paths, deprecated)
