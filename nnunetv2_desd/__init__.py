from nnunetv2_desd import _moved  # noqa: F401  (the previous release's module paths, deprecated)
