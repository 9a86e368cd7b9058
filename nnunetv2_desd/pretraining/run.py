"""A pre-training run: check everything (options, raw images, the method's inputs, ``--init``), then prepare (plan,
preprocess, the method's own data), then train and export."""
import os
from typing import Optional

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.pretrained_weights import read_export
from nnunetv2_desd.data.planning import prepare_pretraining_data
from nnunetv2_desd.data.raw import read_raw_dataset
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.distributed import init_distributed
from nnunetv2_desd.pretraining.engine.loop import EXPORT_FILE, Pretrainer, output_folder_for
from nnunetv2_desd.pretraining.methods.registry import METHODS
from nnunetv2_desd.pretraining.views.loader import build_view_loader, finish_loader


def check_before_preparing(cfg: PretrainConfig):
    """Everything that can be refused before anything is written; returns the raw dataset as read."""
    cfg.check()
    if cfg.init is not None and cfg.continue_training:
        raise DesdError('--init starts a new run from a checkpoint\'s encoder; --c continues this run: choose one.')
    raw = read_raw_dataset(cfg.dataset)
    METHODS[cfg.method].check_before_preparing(cfg, raw)
    return raw


def prepare_data(cfg: PretrainConfig, ctx):
    """Checks, then plans and preprocesses (and writes the method's own data, e.g. CADS's DRRs) on rank 0; the
    other ranks then find it done."""
    raw = check_before_preparing(cfg)

    def prepare():
        prepared = prepare_pretraining_data(cfg.dataset, cfg.configuration, cfg.plans, cfg.planner, cfg.plans_from,
                                            cfg.num_preprocessing_processes, raw=raw)
        METHODS[cfg.method].prepare(cfg, prepared, raw)
        return prepared

    if ctx.is_main:
        prepared = prepare()
        ctx.barrier()
    else:
        ctx.barrier()
        prepared = prepare()  # finds rank 0's work done
    return prepared


def run(cfg: PretrainConfig, preprocess_only: bool = False) -> Optional[str]:
    """Checks, prepares the data (rank 0), pre-trains, and returns the export path."""
    init = read_export(cfg.init) if cfg.init is not None else None  # its structure is checked before any work
    ctx = init_distributed(cfg.device)
    if ctx.device.type == 'cuda':
        import torch
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    if preprocess_only:
        return None
    folder = output_folder_for(prepared, cfg.method)
    checkpoint = os.path.join(folder, 'checkpoint_latest.pth')
    if cfg.continue_training and not os.path.isfile(checkpoint):
        raise DesdError(f'--c: nothing to continue, {checkpoint} does not exist.')
    os.makedirs(folder, exist_ok=True)

    trainer = Pretrainer(cfg, prepared, ctx, folder, init=init)
    if cfg.continue_training:
        trainer.load_checkpoint(checkpoint)
    if trainer.epoch >= cfg.epochs:
        trainer.progress.log(f'nothing to do: {checkpoint} has finished {trainer.epoch} epochs.')
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    loader = trainer.method_loader(build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                                                     pin_memory=ctx.device.type == 'cuda',
                                                     drr_files=prepared.drr_files), workers)
    try:
        trainer.run(loader)
    finally:
        finish_loader(loader)
    return os.path.join(folder, EXPORT_FILE)
