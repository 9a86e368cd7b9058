"""DeSD deep self-distillation (Ye et al., MICCAI 2022): its inputs and its loss, which CADS reuses."""
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F

from nnunetv2_desd.pretraining.methods.base import PretrainingMethod
from nnunetv2_desd.pretraining.views.augmentation import split_views


def mean_entropy(probs: Tensor) -> Tensor:
    """H(p) = -sum_k p_k ln p_k, averaged over every leading axis (rows of distributions on the last axis)."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=-1).mean()


def sinkhorn_knopp(scores: Tensor, n_iters: int = 3) -> Tensor:
    """Equipartition targets (SwAV): Q = diag(u) exp(scores) diag(v) with columns scaled to sum N/K and rows to 1.

    scores (N, K) = logits / tau. Alternating normalisation in the log domain (sharp teachers underflow exp in
    float32): each iteration scales every column to mass 1/K, then every row to mass 1/N; returned rows sum to 1.
    """
    n, k = scores.shape
    log_q = scores.double()
    for _ in range(n_iters):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(k)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - math.log(n)
    return (log_q + math.log(n)).exp().to(scores.dtype)


def cross_view_pairs(n_views: int) -> List[Tuple[int, int]]:
    """All (teacher view a, student input b) with a != b; DeSD's 2 views give [(0, 1), (1, 0)]."""
    return [(a, b) for a in range(n_views) for b in range(n_views) if a != b]


class DeepSelfDistillationLoss(nn.Module):
    """Cross-view cross-entropy between the teacher's deepest output and every student depth.

        L = mean_d mean_{(a,b) in pairs} H(P_t^a, P_{s,d}^b),    H(p, q) = -mean_batch sum_k p_k log q_k
        P_t = softmax((t - c) / tau_t)   (no gradient),           P_s = softmax(s / tau_s)
        c <- m c + (1 - m) mean(t)       (mean over all teacher rows of the global batch, after the loss)

    ``queue_size`` > 0 replaces the centring by Sinkhorn-Knopp equipartition (SwAV) over the current teacher rows
    plus the last ``queue_size`` teacher rows (a FIFO queue; under DDP the rows of every process, all-gathered):

        P_t = rows of the current batch in sinkhorn_knopp([queue; t] / tau_t)

    With 4 teacher rows per process (nnU-Net's batch of 2, 2 views), a centre estimated from a few rows lets the
    teacher swing between one prototype for everything and a uniform output; equipartition over a queue of past
    rows rules out both. The centre is still updated (and all-reduced), so every process issues the same collectives
    (one all_gather, one all_reduce per step).

    DeSD: S = T = 2 views, pairs = cross_view_pairs(2). CADS: student inputs [view1, view2, DRR],
    pairs [(0, 1), (0, 2), (1, 0), (1, 2)]. Computed in float32 whatever the input dtype.

    After each call ``diagnostics`` holds (detached) the mean teacher entropy H(P_t), the mean student entropy
    H(P_s) (over depths, inputs and rows) and KL(P_t || P_s) = H(P_t, P_s) - H(P_t) over the loss's pairs, so
    loss = teacher_entropy_of_pairs + kl. A uniform student scores ln K; a collapsed teacher shows as
    teacher_entropy -> 0 (one prototype) or -> ln K (uniform) (docs/methods.md, "Small batches").
    """

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, queue_size: int = 0):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("queue", torch.zeros(queue_size, out_dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))
        self.filled_rows = 0  # queue_filled on the host: it grows by the same rows every step (no read per step)
        self.pair_index: Dict[tuple, Tuple[Tensor, Tensor]] = {}  # (pairs, device) -> teacher, student indices
        self.diagnostics: Dict[str, Tensor] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.filled_rows = int(self.queue_filled)  # once per load

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
        targets = self.teacher_targets(teacher, teacher_temp)                          # (T, B, K)
        log_probs = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # (D, S, B, K)
        key = (tuple(map(tuple, pairs)), teacher.device)
        if key not in self.pair_index:  # copied to the device once, not every step
            self.pair_index[key] = tuple(torch.tensor(idx, device=teacher.device) for idx in zip(*pairs))
        t_idx, s_idx = self.pair_index[key]
        # (D, P, B): cross-entropy per depth, pair and sample; equal group sizes -> one mean
        cross_entropy = -(targets[t_idx].unsqueeze(0) * log_probs[:, s_idx]).sum(dim=-1)
        loss = cross_entropy.mean()
        with torch.no_grad():
            teacher_entropy_of_pairs = mean_entropy(targets[t_idx])  # equal group sizes: the mean over pairs
            self.diagnostics = {'teacher_entropy': mean_entropy(targets), 'student_entropy': mean_entropy(
                log_probs.exp()), 'kl_teacher_student': loss.detach() - teacher_entropy_of_pairs}
        self.update_center(teacher_logits)
        return loss

    @torch.no_grad()
    def teacher_targets(self, teacher: Tensor, teacher_temp: float) -> Tensor:
        """(T, B, K) teacher logits -> targets: centred softmax, or Sinkhorn-Knopp over queue + batch (then the
        batch's rows enter the queue)."""
        if self.queue.shape[0] == 0:
            return F.softmax((teacher - self.center) / teacher_temp, dim=-1)
        local = teacher.reshape(-1, teacher.shape[-1])
        rows, offset = local, 0
        if dist.is_available() and dist.is_initialized():  # the global batch, as the centre's all_reduce sees it
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local.contiguous())
            rows, offset = torch.cat(gathered), dist.get_rank() * local.shape[0]
        size, n = self.queue.shape[0], min(rows.shape[0], self.queue.shape[0])
        queued = self.queue[size - self.filled_rows:]
        targets = sinkhorn_knopp(torch.cat([queued, rows]) / teacher_temp)[len(queued):]
        targets = targets[offset:offset + local.shape[0]]
        # a non-finite row (AMP's overflow: the step is skipped) enters the queue as the centre instead
        rows = torch.where(torch.isfinite(rows).all(dim=1, keepdim=True), rows, self.center)
        self.queue.copy_(torch.cat([self.queue[n:], rows[-n:]]) if n < size else rows[-size:])
        if self.filled_rows < size:  # the queue fills from its end: the newest rows are always last
            self.filled_rows = min(size, self.filled_rows + n)
            self.queue_filled.fill_(self.filled_rows)
        return targets.view_as(teacher)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """c <- m c + (1 - m) * mean of all T*B teacher rows, summed over processes if distributed. Non-finite rows
        (AMP's overflow) are left out; without any finite row the centre stays."""
        rows = teacher_logits.detach().float().reshape(-1, self.center.shape[1])
        finite = torch.isfinite(rows).all(dim=1, keepdim=True)
        # the rows' sum and their number in one tensor: one all_reduce
        total = torch.cat([torch.where(finite, rows, 0.0).sum(dim=0, keepdim=True),
                           finite.sum(dtype=rows.dtype).view(1, 1)], dim=1)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
        total, n_rows = total[:, :-1], total[:, -1:]
        updated = self.center * self.center_momentum
        updated.add_(total / n_rows.clamp_min(1), alpha=1 - self.center_momentum)
        self.center.copy_(torch.where(n_rows > 0, updated, self.center))


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
