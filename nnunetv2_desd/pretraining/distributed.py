"""torch.distributed set-up for torchrun: nccl on GPU, gloo on CPU. Single process when not under torchrun."""
import math
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Sequence

import numpy as np
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
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK (global rank and size; the local rank picks the GPU). Collectives
    keep torch's default timeout: no rank waits in one while rank 0 prepares the data (``run.prepare_data``).

    Under torchrun the process group is made even for one process (``--nproc_per_node 1``), so that path (nccl's
    collectives included) runs as it does on more GPUs; a plain ``desd_pretrain`` is a single process without one."""
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    if device == 'cuda' and not torch.cuda.is_available():
        from nnunetv2_desd.common.errors import DesdError
        raise DesdError('-device cuda: no CUDA device is visible. Use -device cpu.')
    if world_size == 1 and 'TORCHELASTIC_RUN_ID' not in os.environ:
        return DistContext(0, 1, torch.device(device))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'cuda':
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group('nccl' if device == 'cuda' else 'gloo')
    return DistContext(dist.get_rank(), dist.get_world_size(),
                       torch.device('cuda', local_rank) if device == 'cuda' else torch.device('cpu'))


def derived_seed(seed: int, *keys) -> int:
    """A 32-bit seed from ``seed`` and ``keys`` (process rank, worker, step, names), by numpy's SeedSequence: distinct
    keys give independent streams, the same keys the same one."""
    words = [int(seed)] + [k if isinstance(k, int) else zlib.crc32(str(k).encode()) for k in keys]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def check_finite_everywhere(values: Dict[str, float], step: int, device: torch.device,
                            skippable: Sequence[str] = ()) -> bool:
    """Every process calls this once per step with the same names: one all_gather of ``values``. A non-finite
    value on any process raises the same DesdError on every process (naming the processes), so no process is left
    waiting in a collective; where only ``skippable`` values are non-finite (AMP: the scaler skips the step
    everywhere), returns False. True where all values are finite everywhere."""
    from nnunetv2_desd.common.errors import DesdError
    mine = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered).cpu()
    else:
        table = mine.cpu()[None]
    bad = {name: [r for r in range(table.shape[0]) if not math.isfinite(table[r, i].item())]
           for i, name in enumerate(values)}
    fatal = {name: ranks for name, ranks in bad.items() if ranks and name not in skippable}
    if fatal:
        where = '; '.join(f'{name} is {", ".join(str(table[r, list(values).index(name)].item()) for r in ranks)} '
                          f'on process{"es" if len(ranks) > 1 else ""} {", ".join(map(str, ranks))}'
                          for name, ranks in fatal.items())
        raise DesdError(f'{where} at step {step}; lower --lr or check the data.')
    return not any(bad.values())


def gather_objects(value) -> list:
    """[value of process 0, value of process 1, ...] (all_gather_object); [value] without a process group. Every
    process must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def average_gradients(parameters) -> None:
    """Averages ``.grad`` over the processes, as DDP does for a plain backward: one all-reduce of all gradients
    (a parameter without gradient counts as zeros where another process has one; None where none has)."""
    params = list(parameters)
    has_grad = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    dist.all_reduce(has_grad)
    params = [p for p, h in zip(params, has_grad.tolist()) if h > 0]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
