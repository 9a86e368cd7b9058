"""Host synchronisations per pre-training step on CUDA, counted by torch's sync debug mode
(``python -m nnunetv2_desd.cli.host_syncs``).

The run is built as desd_pretrain builds it (data
prepared, ``Pretrainer``, the view loader through the method's loader). After the warm-up steps,
``torch.cuda.set_sync_debug_mode('warn')`` makes every synchronising CUDA call warn while each counted step runs:
``Pretrainer.train_step`` and the per-step sums, the body of ``train_epoch`` on a step that does not log (its batch
is fetched before). The JSON holds the count per step and the distinct sources (the Python line that made the call,
the warning's first line, how often). CUDA only: without a CUDA device it exits 2.
"""
import linecache
import os
import tempfile
import warnings
from typing import Callable, Iterable, List, Tuple

from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.pretraining.config import PretrainConfig

SYNC_WARNING = 'called a synchronizing CUDA operation'  # torch's message in sync debug mode 'warn'


def record_warnings(call: Callable[[], object]) -> Tuple[object, list]:
    """``call()``'s result and every warning it emitted (none filtered out, none shown once only)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        result = call()
    return result, list(caught)


def _where(filename: str) -> str:
    """A warning's file, short: from site-packages on, or relative to the working folder."""
    marker = 'site-packages' + os.sep
    if marker in filename:
        return filename.split(marker, 1)[1]
    relative = os.path.relpath(filename) if os.path.isabs(filename) else filename
    return filename if relative.startswith('..') else relative


def count_warnings(calls: Iterable[Callable[[], object]], match: str = SYNC_WARNING) -> Tuple[List[int], List[dict]]:
    """(warnings whose message holds ``match``, per call; the distinct sources of every warning: where, code, the
    message's first line, whether it matched, count), the sources most frequent first."""
    per_call, sources = [], {}
    for call in calls:
        _, caught = record_warnings(call)
        per_call.append(sum(match in str(w.message) for w in caught))
        for w in caught:
            message = (str(w.message).strip().splitlines() or [''])[0]
            key = (_where(w.filename), w.lineno, message)
            if key not in sources:
                sources[key] = {'where': f'{key[0]}:{w.lineno}', 'message': message, 'sync': match in str(w.message),
                                'code': linecache.getline(w.filename, w.lineno).strip(), 'count': 0}
            sources[key]['count'] += 1
    return per_call, sorted(sources.values(), key=lambda s: (-s['count'], s['where']))


def count_host_syncs(cfg: PretrainConfig, warmup_steps: int, steps: int) -> dict:
    """Builds the run as desd_pretrain does, takes ``warmup_steps`` steps, then counts the synchronisation warnings
    of ``steps`` more; returns what the JSON holds."""
    # here: heavy (torch, and below the pretraining engine); desd_host_syncs imports this module for --help
    import torch
    if cfg.device != 'cuda':
        raise DesdError(f'-device {cfg.device}: torch.cuda.set_sync_debug_mode counts the host synchronisations, '
                        f'CUDA is needed (-device cuda).')
    if not torch.cuda.is_available():
        raise DesdError('no CUDA device is visible: torch.cuda.set_sync_debug_mode counts the host synchronisations, '
                        'CUDA is needed.')
    # here: heavy, as torch above
    from nnunetv2_desd.benchmarks.timing import device_name
    from nnunetv2_desd.pretraining.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader
    ctx = init_distributed(cfg.device)
    torch.backends.cudnn.benchmark = True  # as desd_pretrain
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    with tempfile.TemporaryDirectory(prefix='desd_host_syncs_') as folder:
        trainer = Pretrainer(cfg, prepared, ctx, folder)
        loader = trainer.method_loader(build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                                                         pin_memory=True, drr_files=prepared.drr_files,
                                                         seeds=trainer.context.worker_seeds(workers)), workers)

        def step(batch: dict) -> None:  # train_epoch's body on a step that does not log
            torch.cuda.set_sync_debug_mode('warn')
            try:
                trainer.epoch_sums.add(loss=trainer.train_step(batch), **trainer.metrics)
            finally:
                torch.cuda.set_sync_debug_mode('default')

        def counted():
            for _ in range(steps):
                batch = next(loader)
                torch.cuda.synchronize()  # the work queued before is not this step's
                yield lambda: step(batch)
        try:
            for _ in range(warmup_steps):
                trainer.train_step(next(loader))
            per_step, sources = count_warnings(counted())
        finally:
            finish_loader(loader)
    return {'method': cfg.method, 'matching': cfg.matching if cfg.method == 'refs' else None,
            'dataset': prepared.dataset_name, 'reference': cfg.reference, 'device': device_name(ctx.device),
            'amp': trainer.amp, 'batch_size': cfg.batch_size, 'patch': list(trainer.patch_size),
            'warmup_steps': warmup_steps,
            'counted': 'Pretrainer.train_step + epoch_sums.add (train_epoch\'s body on a step that does not log)',
            'syncs_per_step': per_step, 'mean': sum(per_step) / len(per_step), 'max': max(per_step),
            'sources': sources}
