"""DeSD deep self-distillation (Ye et al., MICCAI 2022): its inputs and its loss, which CADS reuses."""
from typing import Dict, List, Tuple

import torch
from torch import Tensor

from nnunetv2_desd.pretraining.methods.base import PretrainingMethod
from nnunetv2_desd.pretraining.views.augmentation import split_views


def cross_view_pairs(n_views: int) -> List[Tuple[int, int]]:
    """All (teacher view a, student input b) with a != b; DeSD's 2 views give [(0, 1), (1, 0)]."""
    return [(a, b) for a in range(n_views) for b in range(n_views) if a != b]


class DeSD(PretrainingMethod):
    """DeSD's inputs: teacher and student both see the two augmented views of every volume.

    inputs(batch) -> teacher input (2B, C, *patch) and the student inputs ((2B, C, *patch),): rows are view 1 of
    the B volumes, then view 2. Student logits come back as (D, S = 2, B, K); pairs (t1, s2), (t2, s1).
    """
    name = 'desd'
    official_settings = dict(epochs=300)
    n_student_inputs = 2
    pairs = cross_view_pairs(2)

    def inputs(self, batch: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        views = split_views(batch['data'].to(device, non_blocking=True)).flatten(0, 1)
        return views, (views,)
