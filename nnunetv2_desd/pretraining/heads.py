"""DINO/DeSD projection head and the pooling that feeds it."""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def global_average_pool(feature_map: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C): mean over every spatial axis (2D or 3D feature maps)."""
    return feature_map.flatten(2).mean(dim=2)


HEAD_NORMS = ('batch', 'running', 'none')


class RunningBatchNorm1d(nn.Module):
    """Batch norm whose statistics are a running, bias-corrected EMA over steps instead of the current batch.

        mu_t = beta mu_{t-1} + (1 - beta) mean(x_t),    var_t = beta var_{t-1} + (1 - beta) var(x_t)
        y = gamma (x - mu_t / (1 - beta^t)) / sqrt(var_t / (1 - beta^t) + eps) + b   (statistics not differentiated)

    At nnU-Net's batch (2 volumes x 2 views = 4 rows per process) BatchNorm1d's batch statistics are degenerate:
    every hidden unit of 4 near-identical rows comes out near +-1. Pooled features after instance norm differ
    little between volumes, so some normalisation across samples is needed to amplify those differences; the
    running statistics give it over ~1/(1 - beta) steps of rows. Eval mode uses the same statistics. Not a
    torch _BatchNorm, so SyncBatchNorm conversion leaves it alone; under DDP the buffers follow rank 0.
    """

    def __init__(self, num_features: int, momentum: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer('running_mean', torch.zeros(num_features))
        self.register_buffer('running_var', torch.zeros(num_features))
        self.register_buffer('steps', torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                rows = x.detach().float()
                self.running_mean.mul_(self.momentum).add_(rows.mean(0), alpha=1 - self.momentum)
                self.running_var.mul_(self.momentum).add_(rows.var(0, unbiased=False), alpha=1 - self.momentum)
                self.steps += 1
        # tensor arithmetic only (no host sync per call); never trained: statistics 0 and 1
        trained = self.steps > 0
        correction = 1 - self.momentum ** self.steps.clamp_min(1).float()
        mean = torch.where(trained, self.running_mean / correction, torch.zeros_like(self.running_mean))
        var = torch.where(trained, self.running_var / correction, torch.full_like(self.running_var, 1 - self.eps))
        return (x - mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype) * self.weight + self.bias


def head_norm_layer(kind: str, num_features: int) -> Optional[nn.Module]:
    """The normalisation after each hidden Linear of the head: 'batch' (DeSD's BatchNorm1d), 'running'
    (RunningBatchNorm1d) or 'none' (DINO's ViT recipe)."""
    if kind == 'batch':
        return nn.BatchNorm1d(num_features)
    if kind == 'running':
        return RunningBatchNorm1d(num_features)
    if kind == 'none':
        return None
    raise ValueError(f'head norm {kind!r}: choose one of {HEAD_NORMS}')


class ProjectionHead(nn.Module):
    """Projection head g(x) = W_proto normalize(MLP(x)), one per distilled stage.

    MLP: Linear(in->hidden)-N-GELU-[Linear(hidden->hidden)-N-GELU]*(n_layers-2)-Linear(hidden->bottleneck)
    (n_layers=1: a single Linear(in->bottleneck); N = ``head_norm_layer(norm)``, none for 'none'). The bottleneck
    output is
    L2-normalised, then projected on K = out_dim prototypes:

        logits = normalize(z) @ normalize(V, dim=1)^T,   V = self.prototypes  (out_dim, bottleneck_dim)

    i.e. a bias-free weight-normalised Linear whose gain weight_g is fixed to 1 (DINO's
    "norm_last_layer"): every logit is a cosine similarity in [-1, 1], and rescaling V changes nothing.
    The trainer freezes `prototypes` during the first epoch(s) (see `cancel_prototype_gradients`).
    """

    def __init__(self, in_dim: int, out_dim: int = 60000, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 norm: str = 'batch', n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:  # hidden layers only
                norm_layer = head_norm_layer(norm, d_out)
                if norm_layer is not None:
                    layers.append(norm_layer)
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.prototypes = nn.Parameter(nn.init.trunc_normal_(torch.empty(out_dim, bottleneck_dim), std=0.02))
        self.apply(self._init_linear)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def cancel_prototype_gradients(self, epoch: int, frozen_epochs: int) -> None:
        """Drop the prototypes' gradient while ``epoch < frozen_epochs`` (DINO's frozen last layer)."""
        if epoch < frozen_epochs:
            self.prototypes.grad = None

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> logits (B, out_dim)."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=1))

