"""Whether two nnU-Net plans preprocess images alike: the one check behind ReFs's reference dataset and DMD's
unlabelled pool, whose voxels must match the network's own data.

What decides a preprocessed voxel: spacing, axis order (``transpose_forward``), normalisation schemes and masks,
the resampling functions, and for CT normalisation the intensity statistics it clips and scales with. Patch size,
batch size and architecture play no part, so plans that differ only there share preprocessed data.
"""
import copy
import math
from typing import List

import numpy as np
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

RESAMPLING_KEYS = ('resampling_fn_data', 'resampling_fn_data_kwargs', 'resampling_fn_seg', 'resampling_fn_seg_kwargs')
CT_STATISTICS = ('mean', 'std', 'percentile_00_5', 'percentile_99_5')  # what CTNormalization uses


def preprocessing_plans(plans: dict, configuration: str) -> dict:
    """The part of ``plans`` that preprocessing of ``configuration`` reads (inheritance resolved), still readable by
    nnU-Net's PlansManager: stored with data preprocessed outside nnU-Net's own folders, to check them later."""
    return {'plans_name': plans.get('plans_name'), 'transpose_forward': plans.get('transpose_forward'),
            'foreground_intensity_properties_per_channel': plans.get('foreground_intensity_properties_per_channel'),
            'configurations': {configuration: copy.deepcopy(
                PlansManager(plans).get_configuration(configuration).configuration)}}


def preprocessing_differences(expected: dict, actual: dict, configuration: str) -> List[str]:
    """What makes voxels preprocessed with ``actual`` plans differ from those of ``expected`` plans (both plans
    dicts, same configuration name), each as 'ENTRY ACTUAL instead of EXPECTED'; empty when they agree."""
    if configuration not in actual['configurations']:
        return [f'no configuration {configuration!r} (it has {sorted(actual["configurations"])})']
    pm_a, pm_b = PlansManager(expected), PlansManager(actual)
    cm_a, cm_b = pm_a.get_configuration(configuration), pm_b.get_configuration(configuration)
    differences = []

    def compare(what, a, b, numeric=False):
        same = np.allclose(a, b, rtol=1e-6, atol=0) if numeric and len(a) == len(b) else list(a) == list(b)
        if not same:
            differences.append(f'{what} {list(b)} instead of {list(a)}')

    compare('spacing', cm_a.spacing, cm_b.spacing, numeric=True)
    compare('transpose_forward', pm_a.transpose_forward, pm_b.transpose_forward)
    compare('normalization_schemes', cm_a.normalization_schemes, cm_b.normalization_schemes)
    compare('use_mask_for_norm', cm_a.use_mask_for_norm, cm_b.use_mask_for_norm)
    for key in RESAMPLING_KEYS:
        a, b = cm_a.configuration.get(key), cm_b.configuration.get(key)
        if a != b:
            differences.append(f'{key} {b!r} instead of {a!r}')
    stats_a = pm_a.foreground_intensity_properties_per_channel or {}
    stats_b = pm_b.foreground_intensity_properties_per_channel or {}
    for c, scheme in enumerate(cm_a.normalization_schemes):
        if scheme != 'CTNormalization':
            continue
        a, b = stats_a.get(str(c), {}), stats_b.get(str(c), {})
        if any(k not in b or not math.isclose(a.get(k, math.nan), b[k], rel_tol=1e-6) for k in CT_STATISTICS):
            differences.append(f'CT intensity statistics of channel {c} '
                               f'{ {k: round(b[k], 4) for k in CT_STATISTICS if k in b} } instead of '
                               f'{ {k: round(a[k], 4) for k in CT_STATISTICS if k in a} }')
    return differences
