"""The self-distillation loss of every method (DeSD, CADS, ReFs's SSL branch), its Sinkhorn-Knopp targets and its
entropy diagnostics."""
import math
from typing import Dict, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn import functional as F


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


class DeepSelfDistillationLoss(nn.Module):
    """Deep self-distillation: the cross-entropy between the teacher's deepest output and each student depth.

    Shapes: D student depths (distilled stages), S student inputs, T teacher inputs (views), B volumes, K
    prototypes (``out_dim``); ``pairs`` lists the (teacher input a, student input b) compared (DeSD: S = T = 2
    views, pairs (0, 1), (1, 0); CADS: S = 3 inputs [view 1, view 2, DRR], 4 pairs).

        L = 1/(D |pairs|) sum_{d=1..D} sum_{(a,b) in pairs} H(P_t^a, P_{s,d}^b)
        H(p, q) = -1/B sum_{i=1..B} sum_{k=1..K} p_ik log q_ik
        P_s = softmax(s / tau_s)                 s: student logits (D, S, B, K)
        P_t = softmax((t - c) / tau_t)           t: teacher logits (T, B, K), no gradient
        c <- m c + (1 - m) mean(t)               c: (1, K), over every teacher row of the global batch, after L

    ``queue_size`` Q > 0 replaces the centring by Sinkhorn-Knopp equipartition over the current teacher rows and
    the Q rows before them (a FIFO queue of the global batch's rows, all-gathered under DDP):

        P_t = the current rows of sinkhorn_knopp([queue; t] / tau_t)          ([queue; t]: (Q + T B, K))

    With nnU-Net's batch of 2 (4 teacher rows per process), a centre estimated from a few rows lets the teacher
    swing between one prototype for everything and a uniform output; equipartition over past rows rules out
    both. The centre is still updated (and all-reduced), so every process issues the same collectives (one
    all_gather, one all_reduce per step). Computed in float32 whatever the input dtype.

    After each call ``diagnostics`` holds (detached) the mean teacher entropy H(P_t), the mean student entropy
    H(P_s) and KL(P_t || P_s) = H(P_t, P_s) - H(P_t) over the pairs, so loss = H(P_t) over the pairs + KL. A
    uniform student scores ln K; a collapsed teacher shows as teacher_entropy -> 0 (one prototype) or -> ln K
    (uniform).
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
