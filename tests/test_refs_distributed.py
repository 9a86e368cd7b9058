"""ReFs with the gloo backend: it averages its gradients itself (no DDP wrapper); 2 processes on half batches
equal 1 process on the whole batch.

alpha = 0 makes the fish step grad(L_ssl + L_ref), which that equality holds for (with alpha > 0 each process
takes its inner step on its own half batch). Heads without batch norm, as in test_distributed.py.
"""
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from test_distributed import _free_port

STEPS = 2
BATCH = 4


def _use_folders(refs_data: dict, monkeypatch) -> dict:
    """This process on the nnU-Net folders of conftest's refs_data (pool 920 and reference 921 prepared for
    -m refs); returns the environment for the spawned processes."""
    env = dict(refs_data)
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    return env


def _steps(rank: int, world_size: int, env: dict, views: torch.Tensor, images: torch.Tensor, targets, results):
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from nnunetv2_desd.pretraining.config import PretrainConfig
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.distributed import all_reduce_mean, init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer

    ctx = init_distributed('cpu')
    cfg = PretrainConfig('920', method='refs', reference='921', device='cpu', epochs=2, iters_per_epoch=2,
                         batch_size=BATCH // world_size, patch_size=[16, 16, 16], out_dim=64, head_hidden_dim=32,
                         head_bottleneck_dim=16, head_norm='none', freeze_last_layer_epochs=0, lr=30.0, warmup_epochs=0,
                         fish_inner_lr=0.0)
    trainer = Pretrainer(cfg, prepare_pretraining_data('920', plans_from='921'), ctx, env['nnUNet_results'])
    half = slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    losses = []
    for i in range(STEPS):
        batch = {'data': views[i, half], 'reference': {'data': images[i, half], 'target': [t[i, half] for t in targets]}}
        losses.append(all_reduce_mean(trainer.train_step(batch)).item())  # the step returns this process's loss
    metrics = {k: all_reduce_mean(torch.as_tensor(v)).item() for k, v in trainer.metrics.items()}  # every process
    if rank == 0:
        results[world_size] = {'losses': losses, 'metrics': metrics,
                               'network': {k: v.clone() for k, v in trainer.network.state_dict().items()}}
    if ctx.enabled:
        torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_two_gloo_processes_equal_one_process(refs_data, monkeypatch):
    env = _use_folders(refs_data, monkeypatch)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(STEPS, BATCH, 2, 16, 16, 16, generator=g)
    images = torch.randn(STEPS, BATCH, 1, 16, 16, 16, generator=g)
    targets = [torch.randint(0, 3, (STEPS, BATCH, 1, s, s, s), generator=g).float() for s in (16, 8, 4)]
    env = dict(env, MASTER_ADDR='127.0.0.1')
    with mp.Manager() as manager:
        results = manager.dict()
        for world_size in (1, 2):
            env['MASTER_PORT'] = str(_free_port())
            os.environ.update(env)
            mp.start_processes(_steps, args=(world_size, env, views, images, targets, results), nprocs=world_size,
                               start_method='spawn')
        one, two = dict(results[1]), dict(results[2])
    assert len(set(round(v, 4) for v in one['losses'])) == STEPS  # the weights really move between steps
    torch.testing.assert_close(torch.tensor(two['losses']), torch.tensor(one['losses']), rtol=1e-4, atol=1e-5)
    for key in ('ssl_loss', 'reference_loss'):
        assert two['metrics'][key] == pytest.approx(one['metrics'][key], rel=1e-4)
    for k, v in one['network'].items():  # encoder and the reference decoder alike
        torch.testing.assert_close(two['network'][k], v, rtol=1e-3, atol=1e-4)


def _failing_step(rank: int, world_size: int, env: dict, views, images, targets, results):
    """Rank 1's reference batch is NaN: its reference loss and every fish gradient are non-finite there only."""
    os.environ.update(env)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    from nnunetv2_desd.common.errors import DesdError
    from nnunetv2_desd.pretraining.config import PretrainConfig
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer

    ctx = init_distributed('cpu')
    cfg = PretrainConfig('920', method='refs', reference='921', device='cpu', epochs=2, iters_per_epoch=2,
                         batch_size=1, patch_size=[16, 16, 16], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                         head_norm='none', freeze_last_layer_epochs=0, lr=30.0, warmup_epochs=0, fish_inner_lr=0.01)
    trainer = Pretrainer(cfg, prepare_pretraining_data('920', plans_from='921'), ctx, env['nnUNet_results'])
    image = images[0, rank:rank + 1].clone()
    if rank == 1:
        image.fill_(float('nan'))
    batch = {'data': views[0, rank:rank + 1], 'reference': {'data': image, 'target': [t[0, rank:rank + 1]
                                                                                      for t in targets]}}
    for seed in range(4):  # both task orders of the fish step
        torch.manual_seed(seed)
        try:
            trainer.train_step(batch)
            results[(rank, seed)] = 'no error'
        except DesdError as e:
            results[(rank, seed)] = str(e)
    torch.distributed.destroy_process_group()


@pytest.mark.e2e
def test_a_non_finite_reference_step_on_one_process_stops_every_process_with_its_message(refs_data, monkeypatch):
    env = _use_folders(refs_data, monkeypatch)
    g = torch.Generator().manual_seed(0)
    views = torch.randn(1, 2, 2, 16, 16, 16, generator=g)
    images = torch.randn(1, 2, 1, 16, 16, 16, generator=g)
    targets = [torch.randint(0, 3, (1, 2, 1, s, s, s), generator=g).float() for s in (16, 8, 4)]
    env = dict(env, MASTER_ADDR='127.0.0.1', MASTER_PORT=str(_free_port()))
    os.environ.update(env)
    with mp.Manager() as manager:
        results = manager.dict()
        context = mp.start_processes(_failing_step, args=(2, env, views, images, targets, results), nprocs=2,
                                     start_method='spawn', join=False)
        deadline = time.time() + 240  # a process left waiting in a collective would never finish
        while not context.join(timeout=5):
            if time.time() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f'a process hangs; messages so far: {dict(results)}')
        results = dict(results)
    assert len(results) == 8
    for message in results.values():  # the same message everywhere, naming the failing process
        assert message.startswith('reference loss is nan on process 1; fish gradient is nan on process 1 at step 0')
