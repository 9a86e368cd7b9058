"""DDP with the gloo backend: 2 processes on half batches equal 1 process on the whole batch.

Heads run without batch norm here: torch's SyncBatchNorm is CUDA-only, so on CPU each process would
normalise over its own half batch. On CUDA the engine converts the heads to SyncBatchNorm.
"""
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import BIN, TINY, run_command, with_results

STEPS = 3
BATCH = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _steps(rank: int, world_size: int, env: dict, data: torch.Tensor, results) -> None:
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from nnunetv2_desd.pretraining.config import PretrainConfig
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.distributed import all_reduce_mean, init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer

    ctx = init_distributed('cpu')
    cfg = PretrainConfig('900', device='cpu', epochs=2, iters_per_epoch=2, batch_size=BATCH // world_size,
                         patch_size=[16, 16, 16], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                         head_norm='none', freeze_last_layer_epochs=0, lr=30.0, warmup_epochs=0)
    trainer = Pretrainer(cfg, prepare_pretraining_data('900'), ctx, env['nnUNet_results'])
    local = data.chunk(world_size, dim=1)[rank]  # (STEPS, BATCH / world, 2, *patch)
    # the step returns this process's loss: the mean over processes is what one process on the whole batch gives
    losses = [all_reduce_mean(trainer.train_step({'data': local[i]})).item() for i in range(STEPS)]
    if rank == 0:
        results[world_size] = {'losses': losses, 'center': trainer.loss.center.clone(),
                               'teacher': {k: v.clone() for k, v in trainer.teacher.state_dict().items()}}
    # resuming gives every process its own RNG state back (not process 0's, and not a fresh seed)
    torch.manual_seed(100 + rank)
    np.random.seed(200 + rank)
    trainer.save_checkpoint('rng_check.pth')  # every process calls it; process 0 writes
    after = (torch.rand(4), np.random.rand(4))
    ctx.barrier()
    trainer.load_checkpoint(os.path.join(trainer.output_folder, 'rng_check.pth'))
    again = (torch.rand(4), np.random.rand(4))
    results[(world_size, rank, 'rng')] = (torch.equal(after[0], again[0]) and bool(np.array_equal(after[1], again[1])))
    if ctx.enabled:
        torch.distributed.destroy_process_group()


def _spawn(world_size: int, env: dict, data: torch.Tensor, results) -> None:
    env = dict(env, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    os.environ.update(env)  # children read nnUNet_* when they import nnunetv2
    mp.start_processes(_steps, args=(world_size, env, data, results), nprocs=world_size, start_method='spawn')


@pytest.mark.e2e
def test_two_gloo_processes_equal_one_process(pool_900, tmp_path, monkeypatch):
    """On dataset 900 prepared once (conftest's pool_900), with this test's own nnUNet_results."""
    env = with_results(pool_900[1], tmp_path / 'results')
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results', 'MASTER_ADDR', 'MASTER_PORT'):
        monkeypatch.setenv(key, env.get(key, ''))
    data = torch.randn(STEPS, BATCH, 2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with mp.Manager() as manager:
        results = manager.dict()
        _spawn(1, env, data, results)
        _spawn(2, env, data, results)
        one, two = dict(results[1]), dict(results[2])
        rng = dict(results)
    assert len(set(round(v, 4) for v in one['losses'])) == STEPS  # the weights really move between steps
    torch.testing.assert_close(torch.tensor(two['losses']), torch.tensor(one['losses']), rtol=1e-4, atol=1e-5)
    assert one['center'].abs().sum() > 0
    torch.testing.assert_close(two['center'], one['center'], rtol=1e-4, atol=1e-6)
    for k, v in one['teacher'].items():
        torch.testing.assert_close(two['teacher'][k], v, rtol=1e-4, atol=1e-5)
    assert all(rng[(world, rank, 'rng')] for world in (1, 2) for rank in range(world))


@pytest.mark.e2e
def test_torchrun_cli_on_cpu(pool_900, tmp_path):
    """The documented multi-GPU command line, with gloo on CPU, on the prepared pool (its own nnUNet_results)."""
    _, env, name = pool_900
    run_command(['torchrun', '--nproc_per_node', '2', '--master_port', str(_free_port()), str(BIN / 'desd_pretrain'),
                 '-d', '900', '--epochs', '1', '--iters-per-epoch', '2', *TINY],
                with_results(env, tmp_path / 'results'))
    log = next((tmp_path / 'results' / name / 'desd__nnUNetPlans__3d_fullres').glob('training_log_*.txt'))
    assert 'batch 2 x 2 process(es)' in log.read_text()


def test_torchrun_with_one_process_makes_the_process_group(tmp_path):
    """torchrun --nproc_per_node 1 sets WORLD_SIZE=1: the group must still exist (the nccl path on one GPU)."""
    code = ('from nnunetv2_desd.pretraining.distributed import init_distributed\n'
            'import torch.distributed as dist\n'
            'ctx = init_distributed("cpu")\n'
            'print(dist.is_initialized(), dist.get_backend(), ctx.world_size, ctx.enabled)\n')
    env = dict(os.environ, WORLD_SIZE='1', RANK='0', LOCAL_RANK='0', TORCHELASTIC_RUN_ID='test',
               MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    proc = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ['True', 'gloo', '1', 'False']
