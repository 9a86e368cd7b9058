"""torch.distributed set-up for torchrun: nccl on GPU, gloo on CPU. Single process when not under torchrun."""
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistContext:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def init_distributed(device: str) -> DistContext:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK. The long timeout covers preprocessing done by rank 0.

    Under torchrun the process group is made even for one process (``--nproc_per_node 1``), so that path (nccl's
    collectives included) runs as it does on more GPUs; a plain ``desd_pretrain`` is a single process without one."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if device == 'cuda' and not torch.cuda.is_available():
        from nnunetv2_desd.errors import DesdError
        raise DesdError('-device cuda: no CUDA device is visible. Use -device cpu.')
    if world_size == 1 and 'TORCHELASTIC_RUN_ID' not in os.environ:
        return DistContext(0, 1, torch.device(device))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'cuda':
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo', timeout=timedelta(hours=4))
    return DistContext(dist.get_rank(), dist.get_world_size(),
                       torch.device('cuda', local_rank) if device == 'cuda' else torch.device('cpu'))


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
