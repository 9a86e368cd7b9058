"""nnunetv2-desd: label-efficient learning (DeSD, CADS, ReFs, DMD) inside nnU-Net v2."""
