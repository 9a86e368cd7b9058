"""torch.distributed set-up for torchrun: nccl on GPU, gloo on CPU. Single process when not under torchrun."""
import math
import os
import zlib
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from nnunetv2_desd.common.errors import DesdError


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


def check_finite_everywhere(values: Dict[str, torch.Tensor], step: int, device: torch.device,
                            skippable: Sequence[str] = ()) -> None:
    """Every process calls this once per step with the same names (0-d tensors of this step): one all_gather and
    one host read of ``values``. A non-finite value on any process raises the same DesdError on every process
    (naming the processes), so no process is left waiting in a collective. Where every value is ``skippable``
    (AMP: the non-finite value reaches the gradients, ``nan_unless_finite``, and the scaler skips the step on
    every process) nothing is gathered or read."""
    if all(name in skippable for name in values):
        return
    mine = torch.stack([torch.as_tensor(v, device=device).detach().reshape(()).double() for v in values.values()])
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        table = torch.stack(gathered).tolist()  # the one host sync
    else:
        table = [mine.tolist()]
    names = list(values)
    bad = {name: [r for r, row in enumerate(table) if not math.isfinite(row[i])] for i, name in enumerate(names)}
    fatal = {name: ranks for name, ranks in bad.items() if ranks and name not in skippable}
    if fatal:
        where = '; '.join(f'{name} is {", ".join(str(table[r][names.index(name)]) for r in ranks)} '
                          f'on process{"es" if len(ranks) > 1 else ""} {", ".join(map(str, ranks))}'
                          for name, ranks in fatal.items())
        raise DesdError(f'{where} at step {step}; lower --lr or check the data.')


def nan_unless_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss``, or ``loss`` times NaN where it is not finite (no host sync): its backward then leaves NaN in every
    gradient it reaches, even where a non-finite loss has finite gradients (0 * inf), so AMP's scaler skips the
    step (on every process, once the gradients are averaged). A finite loss and its gradients are unchanged."""
    return loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)


def gather_objects(value) -> list:
    """[value of process 0, value of process 1, ...] (all_gather_object); [value] without a process group. Every
    process must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def average_gradients(parameters, patterns: Optional[dict] = None) -> None:
    """Averages ``.grad`` over the processes, as DDP does for a plain backward: one all-reduce of all gradients and
    of which parameters have one (a parameter without gradient counts as zeros where another process has one; None
    where none has). ``patterns``: a dict the caller keeps across steps; which parameters have a gradient anywhere
    is then read (one host sync) only the first time this process has a given set of gradients (a method's graph
    gives the same set at every step); without it, at every call."""
    params = list(parameters)
    local = tuple(p.grad is not None for p in params)
    patterns = {} if patterns is None else patterns
    if local not in patterns:  # [this process's pattern on the device, which parameters have a gradient anywhere]
        patterns[local] = [torch.tensor(local, dtype=torch.float32, device=params[0].device), None]
    entry = patterns[local]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params] +
                     [entry[0]])
    dist.all_reduce(flat)
    if entry[1] is None:
        entry[1] = [count > 0 for count in flat[-len(params):].tolist()]
    grads = flat[:-len(params)]
    grads /= dist.get_world_size()
    offset = 0
    for p, anywhere in zip(params, entry[1]):
        p.grad = grads[offset:offset + p.numel()].view_as(p).clone() if anywhere else None
        offset += p.numel()
