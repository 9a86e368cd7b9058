"""Gradient matching between two tasks on shared parameters: Fish's first-order update direction and the cosine
between the tasks' gradients."""
import math
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor


def at_least_float32(t: Tensor) -> Tensor:
    """float32 or wider (AMP's half precision gradients would overflow in the sums of squares)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def gradient_cosine(loss_a: Tensor, loss_b: Tensor, params: Sequence[Tensor], create_graph: bool = True,
                    eps: float = 1e-12) -> Tensor:
    """cos(g_a, g_b) = <g_a, g_b> / (|g_a| |g_b|), g_t = dL_t/dparams flattened and concatenated over ``params``.

    With ``create_graph`` the result is differentiable in the parameters (the double backward of the cosine
    form). A parameter one loss does not reach contributes zeros. Computed in float32 or wider; scaling a loss
    (AMP's loss scale) does not change the result.
    """
    grads = []
    for loss in (loss_a, loss_b):
        g = torch.autograd.grad(loss, list(params), create_graph=create_graph, retain_graph=True, allow_unused=True)
        grads.append([torch.zeros_like(p) if gi is None else gi for gi, p in zip(g, params)])
    a, b = [[at_least_float32(g) for g in gs] for gs in grads]
    dot = sum((x * y).sum() for x, y in zip(a, b))
    norm_a = torch.sqrt(sum(x.pow(2).sum() for x in a))
    norm_b = torch.sqrt(sum(y.pow(2).sum() for y in b))
    return dot / (norm_a * norm_b).clamp_min(eps)


def fish_gradients(params: Dict[str, Tensor], losses: Sequence[Callable[[Dict[str, Tensor]], Tensor]],
                   inner_lr: float, loss_scale: Union[float, Tensor] = 1.0, match: Sequence[str] = ()
                   ) -> Tuple[Dict[str, Tensor], Optional[Tensor], Tensor]:
    """Fish's update direction G = (theta - theta~) / alpha = sum_k g_k(theta_{k-1}), where
    theta_0 = ``params`` and theta_k = theta_{k-1} - alpha g_k(theta_{k-1}) (one plain SGD step per loss, in the
    given order; ``losses[k](theta)`` evaluates loss k at the parameter values ``theta``, a dict like ``params``).

    ``loss_scale``: the losses come multiplied by it (AMP); the inner steps use the unscaled gradients, G stays
    scaled, as the gradients of a scaled backward would be. Returns (G by name (parameters no loss reaches are
    left out), the cosine between the first two inner gradients over the names in ``match`` as a 0-d tensor (None
    without ``match``, NaN after a non-finite gradient), whether every gradient was finite as a 0-d bool tensor).
    No host sync: the inner steps after a non-finite gradient are taken by ``torch.where`` (to the same point), so
    every loss is evaluated whatever happens and each process issues the same collectives (the SSL loss
    all-reduces its centre); G then holds the non-finite gradient, and AMP's scaler skips the step.
    """
    current = dict(params)
    total: Dict[str, Tensor] = {}
    cosine, all_finite = None, None
    for k, loss_at in enumerate(losses):
        names = list(current)
        grads = torch.autograd.grad(loss_at(current), [current[n] for n in names], allow_unused=True)
        grads = {n: g for n, g in zip(names, grads) if g is not None}
        if k == 1 and match:  # total holds the first gradient alone
            common = [n for n in match if n in total and n in grads]
            if common:
                dot = sum((at_least_float32(total[n]) * at_least_float32(grads[n])).sum() for n in common)
                norms = torch.sqrt(sum(at_least_float32(total[n]).pow(2).sum() for n in common)) * \
                    torch.sqrt(sum(at_least_float32(grads[n]).pow(2).sum() for n in common))
                cosine = dot / norms.clamp_min(1e-12)
        if grads:  # one flag over all gradients: the largest magnitudes are finite (NaN propagates)
            largest = torch._foreach_norm(list(grads.values()), math.inf)
            finite = torch.isfinite(torch.stack([at_least_float32(m) for m in largest])).all()
            all_finite = finite if all_finite is None else all_finite & finite
        if all_finite is not None and k < len(losses) - 1:
            with torch.no_grad():
                current = {n: (torch.where(all_finite, p - (inner_lr / loss_scale) * grads[n], p) if n in grads
                               else p.detach()).requires_grad_() for n, p in current.items()}
        for n, g in grads.items():  # fresh tensors from autograd: accumulated in place
            total[n] = total[n].add_(g) if n in total else g
    if all_finite is None:
        all_finite = torch.ones((), dtype=torch.bool, device=next(iter(params.values())).device)
    if cosine is not None:
        cosine = torch.where(all_finite, cosine, math.nan)
    return total, cosine, all_finite
