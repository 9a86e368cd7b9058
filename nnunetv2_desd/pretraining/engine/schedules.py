"""Pre-training schedules: pure functions of the step, so resuming needs only the step counter."""
import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """start -> end along a half cosine over total_steps, then end.

    Used per iteration for the teacher EMA momentum (0.996 -> 1) and the weight decay (CADS 0.04 -> 0.4).
    """
    if step >= total_steps:
        return end
    return end + (start - end) * (1 + math.cos(math.pi * step / total_steps)) / 2


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float,
                  start: float = 0.0) -> float:
    """Linear start -> peak over warmup_steps, then cosine peak -> final over the remaining steps.

    Used per iteration for the learning rate (10 warm-up epochs, then cosine).
    """
    if step < warmup_steps:
        return start + (peak - start) * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def linear_warmup_constant(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear start -> end over warmup_steps, then constant end.

    Used per epoch for the teacher temperature (0.04 -> 0.07 over 20 epochs; CADS 50).
    """
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps
