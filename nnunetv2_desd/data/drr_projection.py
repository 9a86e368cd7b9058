"""Digitally reconstructed radiographs (DRRs): a parallel-beam X-ray of a CT volume, pure numpy (CADS).

The beam is parallel and follows a voxel axis, so a ray sum is a sum along one array axis of the attenuation
mu = MU_WATER * max(0, 1 + clip(HU) / 1000) times the spacing; ``linear`` keeps the ray sums, ``beer_lambert`` the
absorbed fraction 1 - exp(-sum); then min-max to [-1, 1]. Bright = more attenuation (bone), as on film.
The formulas and how they relate to the official DRR: docs/cads.md.
"""
from typing import Sequence, Tuple

import numpy as np

from nnunetv2_desd.common.errors import DesdError

# Linear attenuation coefficient of water at the 60-70 keV effective energy of a diagnostic beam:
# 0.0206 /mm at 60 keV, 0.0184 /mm at 80 keV (NIST XCOM). Bone (~+1000 HU) attenuates about twice as much.
MU_WATER_PER_MM = 0.02
HU_CLIP = (-1024.0, 1024.0)

VIEWS = ('lateral', 'frontal')  # rays along the patient's left-right / anterior-posterior axis
ATTENUATIONS = ('linear', 'beer_lambert')
DEFAULT_VIEW, DEFAULT_ATTENUATION = 'lateral', 'linear'  # the official CADS DRR

_VIEW_PHYSICAL_AXIS = {'lateral': 0, 'frontal': 1}  # LPS x (right -> left), LPS y (anterior -> posterior)


def check_view(view: str, attenuation: str = DEFAULT_ATTENUATION) -> None:
    if view not in VIEWS:
        raise DesdError(f'unknown DRR view {view!r}; choose one of {", ".join(VIEWS)}.')
    if attenuation not in ATTENUATIONS:
        raise DesdError(f'unknown DRR attenuation {attenuation!r}; choose one of {", ".join(ATTENUATIONS)}.')


def hu_to_mu(hu: np.ndarray, clip: Tuple[float, float] = HU_CLIP) -> np.ndarray:
    """mu = MU_WATER * max(0, 1 + clip(HU)/1000), in 1/mm (float32). Air (-1000 HU) -> 0, water (0 HU) -> MU_WATER."""
    hu = np.clip(np.asarray(hu, dtype=np.float32), clip[0], clip[1])
    return np.float32(MU_WATER_PER_MM) * np.maximum(np.float32(0), np.float32(1) + hu / np.float32(1000))


def line_integrals(hu: np.ndarray, spacing: Sequence[float], axis: int) -> np.ndarray:
    """p = sum_ray mu * spacing[axis]: parallel rays along array `axis` of a 3D HU volume -> 2D, dimensionless."""
    if hu.ndim != 3:
        raise ValueError(f'line_integrals expects a 3D volume, got shape {hu.shape}')
    return hu_to_mu(hu).sum(axis=axis, dtype=np.float64) * float(spacing[axis])


def attenuation_image(hu: np.ndarray, spacing: Sequence[float], axis: int,
                      attenuation: str = DEFAULT_ATTENUATION) -> np.ndarray:
    """The radiograph before scaling: p ('linear') or 1 - exp(-p) ('beer_lambert'); 2D float64.

    After min-max, 'linear' equals the official CADS DRR (min-max of ray sums of clipped HU): the two sums differ by
    an affine map, except where the clipped HU is below -1000 (mu floors at 0). 'beer_lambert' saturates in a
    body-sized path (a 300 mm lateral chest: p ~ 6) and mostly shows the silhouette.
    """
    check_view(DEFAULT_VIEW, attenuation)
    p = line_integrals(hu, spacing, axis)
    return p if attenuation == 'linear' else -np.expm1(-p)


def minmax_to_unit(image: np.ndarray) -> np.ndarray:
    """2 (x - min) / (max - min) - 1 as float32; a constant image maps to zeros."""
    image = np.asarray(image, dtype=np.float64)
    lo, hi = float(image.min()), float(image.max())
    if not hi > lo:
        return np.zeros(image.shape, dtype=np.float32)
    return (2.0 * (image - lo) / (hi - lo) - 1.0).astype(np.float32)


def projection_axis(direction: Sequence[float], view: str = DEFAULT_VIEW) -> int:
    """Numpy axis (array read by SimpleITK: z, y, x) along which the rays of `view` run.

    `direction` is SimpleITK's row-major 3x3: column a = physical (LPS) direction of SimpleITK index axis a.
    'lateral' rays run along LPS x (patient right -> left), 'frontal' along LPS y (anterior -> posterior).
    Chosen: the index axis a whose column has the largest |component| on that physical axis; numpy axis = 2 - a.
    """
    check_view(view)
    matrix = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    return 2 - int(np.argmax(np.abs(matrix[_VIEW_PHYSICAL_AXIS[view]])))
