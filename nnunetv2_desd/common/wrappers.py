"""The network inside the wrappers that training puts around it (DDP, torch.compile)."""
from torch import nn
from torch._dynamo import OptimizedModule
from torch.nn.parallel import DistributedDataParallel as DDP


def unwrapped(network: nn.Module) -> nn.Module:
    """``network`` without its DistributedDataParallel and torch.compile wrappers (either, both or none; nnU-Net
    compiles first, then wraps in DDP)."""
    network = network.module if isinstance(network, DDP) else network
    return network._orig_mod if isinstance(network, OptimizedModule) else network
