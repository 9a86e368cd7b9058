"""nnunetv2-desd: label-efficient learning (DeSD, CADS, ReFs, DMD) inside nnU-Net v2."""
from nnunetv2_desd._moved import MOVED  # noqa: F401  (importing it serves the previous release's module paths)
