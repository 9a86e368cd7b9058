"""DeSD deep self-distillation (Ye et al., MICCAI 2022): its inputs and its loss, which CADS reuses."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from nnunetv2_desd.pretraining.views.augmentation import split_views


def cross_view_pairs(n_views: int) -> List[Tuple[int, int]]:
    """All (teacher view a, student input b) with a != b; DeSD's 2 views give [(0, 1), (1, 0)]."""
    return [(a, b) for a in range(n_views) for b in range(n_views) if a != b]


class DeepSelfDistillationLoss(nn.Module):
    """Cross-view cross-entropy between the teacher's deepest output and every student depth.

        L = mean_d mean_{(a,b) in pairs} H(P_t^a, P_{s,d}^b),    H(p, q) = -mean_batch sum_k p_k log q_k
        P_t = softmax((t - c) / tau_t)   (no gradient),           P_s = softmax(s / tau_s)
        c <- m c + (1 - m) mean(t)       (mean over all teacher rows of the global batch, after the loss)

    DeSD: S = T = 2 views, pairs = cross_view_pairs(2). CADS: student inputs [view1, view2, DRR],
    pairs [(0, 1), (0, 2), (1, 0), (1, 2)]. Computed in float32 whatever the input dtype.
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, teacher_temp: float,
                pairs: Sequence[Tuple[int, int]]) -> Tensor:
        """student_logits (D, S, B, K), teacher_logits (T, B, K) -> scalar loss; then updates the centre."""
        if student_logits.dim() != 4 or teacher_logits.dim() != 3:
            raise ValueError(f"expected student (D, S, B, K) and teacher (T, B, K) logits, got "
                             f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
        _, n_student, batch, k = student_logits.shape
        n_teacher = teacher_logits.shape[0]
        if teacher_logits.shape[1:] != (batch, k) or k != self.center.shape[1]:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match student "
                             f"{tuple(student_logits.shape)} / out_dim {self.center.shape[1]}")
        if not pairs or any(not (0 <= a < n_teacher and 0 <= b < n_student) for a, b in pairs):
            raise ValueError(f"pairs {list(pairs)} empty or out of range for T={n_teacher}, S={n_student}")

        teacher = teacher_logits.detach().float()
        targets = F.softmax((teacher - self.center) / teacher_temp, dim=-1)         # (T, B, K)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (D, S, B, K)
        t_idx = torch.tensor([a for a, _ in pairs], device=teacher.device)
        s_idx = torch.tensor([b for _, b in pairs], device=teacher.device)
        # (D, P, B): cross-entropy per depth, pair and sample; equal group sizes -> one mean
        cross_entropy = -(targets[t_idx].unsqueeze(0) * log_probs[:, s_idx]).sum(dim=-1)
        loss = cross_entropy.mean()
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) * mean of all T*B teacher rows, summed over processes if distributed."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[1])
        total = rows.sum(dim=0, keepdim=True)
        n_rows = rows.shape[0]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            n_rows *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / n_rows, alpha=1 - self.center_momentum)


class DeSD:
    """DeSD's inputs: teacher and student both see the two augmented views of every volume.

    inputs(batch) -> teacher input (2B, C, *patch) and the student inputs ((2B, C, *patch),): rows are view 1 of
    the B volumes, then view 2. Student logits come back as (D, S = 2, B, K); pairs (t1, s2), (t2, s1).
    """
    n_student_inputs = 2
    pairs = cross_view_pairs(2)

    def inputs(self, batch: Dict[str, Tensor], device: torch.device) -> Tuple[Tensor, Tuple[Tensor, ...]]:
        views = split_views(batch['data'].to(device, non_blocking=True)).flatten(0, 1)
        return views, (views,)

    def metadata(self) -> dict:
        return {}
