"""A pre-training run: check everything (options, raw images, the method's inputs, ``--init``), then prepare (plan,
preprocess, the method's own data), then train and export."""
import os
import sys
import time
import uuid
from typing import List, Optional, Tuple

import torch
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.pretrained_weights import read_export
from nnunetv2_desd.data.planning import PreparedPool, prepare_pool
from nnunetv2_desd.data.raw import RawDataset, read_raw_dataset
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.distributed import DistContext, gather_objects, init_distributed
from nnunetv2_desd.pretraining.engine.loop import EXPORT_FILE, Pretrainer, output_folder_for
from nnunetv2_desd.pretraining.methods.registry import METHODS
from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader

READY_FOLDER = '.desd_ready'  # rank 0's "prepared" markers, in the first dataset's preprocessed folder
READY_POLL_SECONDS = 5.0


def check_before_preparing(cfg: PretrainConfig) -> List[RawDataset]:
    """Everything that can be refused before anything is written; returns the raw datasets as read."""
    cfg.check()
    if cfg.init is not None and cfg.continue_training:
        raise DesdError('--init starts a new run from a checkpoint\'s encoder; --c continues this run: choose one.')
    raws = [read_raw_dataset(d) for d in cfg.datasets]
    for raw in raws:
        METHODS[cfg.method].check_before_preparing(cfg, raw)
    return raws


def prepare(cfg: PretrainConfig, raws: List[RawDataset], share: Tuple[int, int] = (0, 1)) -> PreparedPool:
    """Plans and preprocesses what is not prepared yet, then the method's own data (e.g. CADS's DRRs)."""
    part, parts = share
    pool = prepare_pool(cfg.datasets, cfg.configuration, cfg.plans, cfg.planner, cfg.plans_from,
                        cfg.num_preprocessing_processes, raws, part, parts, cfg.exclude_bad_cases, cfg.dataset_weights)
    for member, raw in zip(pool.members, raws):
        METHODS[cfg.method].prepare(cfg, member, raw, share)
    pool.preparation_command = preparation_command(cfg)
    if any(m.drr_files for m in pool.members):
        pool.drr_files = {pool.key(m, case): path for m in pool.members for case, path in (m.drr_files or {}).items()}
    return pool


def preparation_command(cfg: PretrainConfig) -> str:
    """The desd_pretrain command that prepares this run's data."""
    options = {'-d': ' '.join(cfg.datasets), '-m': cfg.method, '-c': cfg.configuration, '-p': cfg.plans,
               '-pl': cfg.planner, '--plans-from': cfg.plans_from, '--reference': cfg.reference}
    given = ' '.join(f'{k} {v}' for k, v in options.items() if v is not None)
    return f'desd_pretrain {given}{" --exclude-bad-cases" if cfg.exclude_bad_cases else ""} --preprocess-only'


def prepare_data(cfg: PretrainConfig, ctx: DistContext, share: Tuple[int, int] = (0, 1)) -> PreparedPool:
    """Checks, then prepares. Under torchrun rank 0 prepares while the other ranks wait for its marker file, outside
    any collective (preparation may take hours), then find everything done."""
    raws = check_before_preparing(cfg)
    if not ctx.enabled:
        return prepare(cfg, raws, share)
    token = gather_objects(uuid.uuid4().hex)[0]  # every rank is here: rank 0's token names this launch
    marker = os.path.join(nnUNet_preprocessed, raws[0].name, READY_FOLDER, token)
    os.makedirs(os.path.dirname(marker), exist_ok=True)
    if ctx.is_main:
        try:
            prepared = prepare(cfg, raws, share)
        except BaseException as e:  # the other ranks stop too, wherever they run
            with open(marker + '.failed', 'w') as f:
                f.write(str(e) or type(e).__name__)
            raise
        open(marker, 'w').close()
    else:
        _wait_for(marker, ctx.rank)
        prepared = prepare(cfg, raws, share)  # finds rank 0's work done
    ctx.barrier()
    if ctx.is_main:
        os.remove(marker)
    return prepared


def _wait_for(marker: str, rank: int) -> None:
    start = said = time.time()
    while not os.path.exists(marker):
        if os.path.exists(marker + '.failed'):
            raise DesdError('rank 0 could not prepare the data; its message says why.')
        if time.time() - said > 300:
            print(f'rank {rank}: waiting for rank 0 to prepare the data ({time.time() - start:.0f} s so far).',
                  file=sys.stderr, flush=True)
            said = time.time()
        time.sleep(READY_POLL_SECONDS)


RUN_FILES = ('checkpoint_latest.pth', 'checkpoint_final.pth', EXPORT_FILE)


def start_or_resume(cfg: PretrainConfig, folder: str, checkpoint: str) -> bool:
    """Whether to continue ``checkpoint``. ``--c`` continues it where it exists and starts a new run where not;
    without ``--c`` a run already in ``folder`` is refused unless ``--overwrite``."""
    if cfg.continue_training:
        return os.path.isfile(checkpoint)
    existing = [f for f in RUN_FILES if os.path.isfile(os.path.join(folder, f))]
    if existing and not cfg.overwrite:
        raise DesdError(f'{folder} holds a run already ({", ".join(existing)}): continue it with --c, or start over '
                        f'with --overwrite, which replaces it.')
    return False


def use_deterministic_torch() -> None:
    """torch's deterministic algorithms (a warning names an op that has none), cuDNN without autotuning, and the
    cuBLAS workspace that deterministic CUDA matrix products need (read when cuBLAS starts)."""
    os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def run(cfg: PretrainConfig, preprocess_only: bool = False, share: Tuple[int, int] = (0, 1)) -> Optional[str]:
    """Checks, prepares the data (rank 0), pre-trains, and returns the export path."""
    init = read_export(cfg.init) if cfg.init is not None else None  # its structure is checked before any work
    if cfg.deterministic:
        use_deterministic_torch()
    ctx = init_distributed('cpu' if preprocess_only else cfg.device)  # preparation needs no GPU
    if ctx.device.type == 'cuda' and not cfg.deterministic:
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer
    prepared = prepare_data(cfg, ctx, share)
    cfg.plans = prepared.plans_identifier
    if preprocess_only:
        return None
    folder = output_folder_for(prepared, cfg.method)
    checkpoint = os.path.join(folder, 'checkpoint_latest.pth')
    resume = start_or_resume(cfg, folder, checkpoint)
    os.makedirs(folder, exist_ok=True)

    trainer = Pretrainer(cfg, prepared, ctx, folder, init=init)
    if resume:
        trainer.load_checkpoint(checkpoint)
    elif cfg.continue_training:
        trainer.progress.log(f'--c: nothing to continue in {folder}; starting a new run.')
    if trainer.epoch >= cfg.epochs:
        trainer.progress.log(f'nothing to do: {checkpoint} has finished {trainer.epoch} epochs.')
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    loader = trainer.method_loader(build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                                                     pin_memory=ctx.device.type == 'cuda',
                                                     drr_files=prepared.drr_files,
                                                     seeds=trainer.context.worker_seeds(workers),
                                                     ordered=cfg.deterministic), workers)
    try:
        trainer.run(loader)
    finally:
        finish_loader(loader)
    return os.path.join(folder, EXPORT_FILE)
