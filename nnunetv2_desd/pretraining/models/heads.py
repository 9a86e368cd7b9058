"""DINO/DeSD projection head and the pooling that feeds it."""
import torch
from torch import Tensor, nn
from torch.nn import functional as F


def global_average_pool(feature_map: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C): mean over every spatial axis (2D or 3D feature maps)."""
    return feature_map.flatten(2).mean(dim=2)


class ProjectionHead(nn.Module):
    """Projection head g(x) = W_proto normalize(MLP(x)), one per distilled stage.

    MLP: Linear(in->hidden)-BN-GELU-[Linear(hidden->hidden)-BN-GELU]*(n_layers-2)-Linear(hidden->bottleneck)
    (n_layers=1: a single Linear(in->bottleneck); BN only if use_bn). The bottleneck output is
    L2-normalised, then projected on K = out_dim prototypes:

        logits = normalize(z) @ normalize(V, dim=1)^T,   V = self.prototypes  (out_dim, bottleneck_dim)

    i.e. a bias-free weight-normalised Linear whose gain weight_g is fixed to 1 (DINO's
    "norm_last_layer"): every logit is a cosine similarity in [-1, 1], and rescaling V changes nothing.
    The trainer may freeze `prototypes` during the first epoch(s) (see `prototype_parameters`).
    """

    def __init__(self, in_dim: int, out_dim: int = 60000, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 use_bn: bool = True, n_layers: int = 3):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < n_layers - 1:  # hidden layers only
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
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

    def prototype_parameters(self):
        """The last layer's parameters (frozen during the first epoch(s) of pre-training)."""
        return [self.prototypes]

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, in_dim) -> logits (B, out_dim)."""
        z = F.normalize(self.mlp(x), dim=-1)
        return F.linear(z, F.normalize(self.prototypes, dim=1))

