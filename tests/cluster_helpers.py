"""In-process parts of tests/test_cluster.py, run in a fresh interpreter (``python -c``) so that nnunetv2.paths reads
the test's nnU-Net folders: each function writes its observations to ``out`` (torch.save) for the test to check."""
import sys

import numpy as np
import torch

PATCH = [16, 16, 16]
SMALL = dict(device='cpu', patch_size=PATCH, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16)


def _first_batches(prepared, seeds, n_batches):
    """The first ``n_batches`` 'data' tensors of a view loader with one worker per seed."""
    from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader
    loader = build_view_loader(prepared, PATCH, 2, len(seeds), seeds=list(seeds))
    try:
        return [next(loader)['data'].clone() for _ in range(n_batches)]
    finally:
        finish_loader(loader)


def seeds_per_rank_and_worker(dataset: str, folder: str, out: str) -> None:
    """Two ranks' Pretrainers (rank 1 built as a lone process, which is all its seeding needs), their draws after
    construction, their worker seeds, and the view loader's batches for those seeds (one worker per seed, and
    rank 0's two workers in one loader)."""
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.config import PretrainConfig
    from nnunetv2_desd.pretraining.distributed import DistContext
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer

    prepared = prepare_pretraining_data(dataset)
    cfg = PretrainConfig(dataset, epochs=1, iters_per_epoch=1, batch_size=2, seed=12345, **SMALL)
    result = {'ranks': {}}
    for rank in (0, 1):
        trainer = Pretrainer(cfg, prepared, DistContext(rank, 1, torch.device('cpu')), folder)
        seeds = trainer.context.worker_seeds(2)
        trainer.step = 7  # a resumed run starts its workers on other streams
        seeds_at_7 = trainer.context.worker_seeds(2)
        result['ranks'][rank] = {
            'network': {k: v.clone() for k, v in trainer.network.state_dict().items()},
            'torch_draw': torch.rand(16), 'numpy_draw': np.random.rand(16),
            'seeds': seeds, 'seeds_at_7': seeds_at_7}
    s = {rank: result['ranks'][rank]['seeds'] for rank in (0, 1)}
    result['first'] = {(rank, w): _first_batches(prepared, [s[rank][w]], 3) for rank in (0, 1) for w in (0, 1)}
    result['again'] = _first_batches(prepared, [s[0][0]], 1)[0]           # the same seed once more
    result['two_workers'] = _first_batches(prepared, s[0], 3)             # rank 0's loader with 2 workers
    torch.save(result, out)


def refs_float64_step(pool: str, reference: str, folder: str, out: str) -> None:
    """A ReFs Pretrainer cast to float64 (the stand-in for CUDA: every module must follow ``to``), one step on a
    float64 batch of views and reference."""
    from nnunetv2_desd.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.config import PretrainConfig
    from nnunetv2_desd.pretraining.distributed import DistContext
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer

    cfg = PretrainConfig(pool, method='refs', reference=reference, epochs=2, iters_per_epoch=2, batch_size=2,
                         head_norm='none', freeze_last_layer_epochs=0, warmup_epochs=0, **SMALL)
    trainer = Pretrainer(cfg, prepare_pretraining_data(pool, plans_from=reference),
                         DistContext(0, 1, torch.device('cpu')), folder)
    decoder_before = {k: v.clone() for k, v in trainer.network.decoder.state_dict().items()}
    trainer.to(torch.float64)
    g = torch.Generator().manual_seed(0)
    batch = {'data': torch.randn(2, 2, *PATCH, generator=g, dtype=torch.float64),
             'reference': {'data': torch.randn(2, 1, *PATCH, generator=g, dtype=torch.float64),
                           'target': [torch.randint(0, 3, (2, 1, s, s, s), generator=g).double() for s in (16, 8, 4)]}}
    result = {'decoder_before': decoder_before, 'error': None}
    try:
        loss = trainer.train_step(batch)
        result['loss'] = loss.detach().clone()
    except Exception as e:  # reported by the test with its type
        result['error'] = f'{type(e).__name__}: {e}'
    result['dtypes'] = {name: {str(p.dtype) for p in module.parameters()} | {str(b.dtype) for b in module.buffers()
                                                                               if b.is_floating_point()}
                        for name, module in (('network', trainer.network), ('decoder', trainer.network.decoder),
                                             ('student', trainer.student), ('teacher', trainer.teacher),
                                             ('loss', trainer.loss))}
    result['decoder_after'] = {k: v.clone() for k, v in trainer.network.decoder.state_dict().items()}
    result['step'] = trainer.step
    torch.save(result, out)


if __name__ == '__main__':
    globals()[sys.argv[1]](*sys.argv[2:])
