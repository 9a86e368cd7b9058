"""``desd_pretrain``: self-supervised pre-training of an nnU-Net-planned encoder on an (unlabelled) dataset."""
import argparse
import os
import sys
from typing import List, Optional, Tuple

from nnunetv2_desd.errors import DesdError
from nnunetv2_desd.pretraining.config import PretrainConfig

METHODS = ('desd',)


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig('')
    p = argparse.ArgumentParser(prog='desd_pretrain', description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='dataset id or name in nnUNet_raw (labels optional)')
    p.add_argument('-m', dest='method', default=d.method, choices=METHODS)
    p.add_argument('-c', dest='configuration', default=d.configuration, help='nnU-Net 3D configuration')
    p.add_argument('-p', dest='plans', default=None, help='plans identifier (default: the planner\'s, nnUNetPlans)')
    p.add_argument('-pl', dest='planner', default=d.planner,
                   help='nnU-Net experiment planner, e.g. nnUNetPlannerResEncM')
    p.add_argument('--plans-from', default=None,
                   help='use the plans nnU-Net made for this (labelled) dataset, so the encoder transfers 1:1')
    p.add_argument('--c', dest='continue_training', action='store_true', help='continue from checkpoint_latest')
    p.add_argument('-device', dest='device', default=d.device, choices=('cuda', 'cpu'))
    p.add_argument('--epochs', type=int, default=d.epochs)
    p.add_argument('--iters-per-epoch', type=int, default=d.iters_per_epoch)
    p.add_argument('--batch-size', type=int, default=d.batch_size, help='per process; each sample gives 2 views')
    p.add_argument('--patch-size', type=int, nargs=3, default=None, help='default: the plans\' patch size')
    p.add_argument('--out-dim', type=int, default=d.out_dim, help='K, the number of prototypes')
    p.add_argument('--stages', type=int, nargs='+', default=None,
                   help='encoder stages to distil (default: the deepest 4; must include the deepest)')
    p.add_argument('--head-hidden-dim', type=int, default=d.head_hidden_dim)
    p.add_argument('--head-bottleneck-dim', type=int, default=d.head_bottleneck_dim)
    p.add_argument('--no-head-bn', dest='head_bn', action='store_false', help='no batch norm in the heads')
    p.add_argument('--optimizer', default=d.optimizer, choices=('sgd', 'adamw'))
    p.add_argument('--lr', type=float, default=d.lr, help='base lr per 256 samples (scaled by the global batch)')
    p.add_argument('--min-lr', type=float, default=d.min_lr)
    p.add_argument('--warmup-epochs', type=int, default=d.warmup_epochs)
    p.add_argument('--weight-decay', type=float, default=d.weight_decay)
    p.add_argument('--clip-grad', type=float, default=d.clip_grad)
    p.add_argument('--teacher-temp', type=float, default=d.teacher_temp)
    p.add_argument('--warmup-teacher-temp', type=float, default=d.warmup_teacher_temp)
    p.add_argument('--warmup-teacher-temp-epochs', type=int, default=d.warmup_teacher_temp_epochs)
    p.add_argument('--teacher-momentum', type=float, default=d.teacher_momentum)
    p.add_argument('--freeze-last-layer-epochs', type=int, default=d.freeze_last_layer_epochs)
    p.add_argument('--num-workers', type=int, default=None,
                   help='augmentation processes (default: nnU-Net\'s nnUNet_n_proc_DA logic; 0 = in-process)')
    p.add_argument('-np', dest='num_preprocessing_processes', type=int, default=d.num_preprocessing_processes,
                   help='processes for checking, fingerprinting and preprocessing')
    p.add_argument('--seed', type=int, default=d.seed)
    p.add_argument('--preprocess-only', action='store_true',
                   help='check, plan and preprocess, then stop (run this once before torchrun on a cluster)')
    return p


def parse_config(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    preprocess_only = args.pop('preprocess_only')
    return PretrainConfig(**args), preprocess_only


def run(cfg: PretrainConfig, preprocess_only: bool = False) -> Optional[str]:
    """Prepares the data (rank 0), pre-trains, and returns the export path."""
    from nnunetv2_desd.pretraining.data.loader import build_view_loader
    from nnunetv2_desd.pretraining.data.planning import prepare_pretraining_data
    from nnunetv2_desd.pretraining.engine.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import EXPORT_FILE, Pretrainer, output_folder_for

    ctx = init_distributed(cfg.device)
    if ctx.device.type == 'cuda':
        import torch
        torch.backends.cudnn.benchmark = True  # as nnU-Net's trainer

    def prepare():
        return prepare_pretraining_data(cfg.dataset, cfg.configuration, cfg.plans, cfg.planner, cfg.plans_from,
                                        cfg.num_preprocessing_processes)

    if ctx.is_main:
        prepared = prepare()
        ctx.barrier()
    else:
        ctx.barrier()
        prepared = prepare()  # finds rank 0's work done
    cfg.plans = prepared.plans_identifier
    if preprocess_only:
        return None
    folder = output_folder_for(prepared, cfg.method)
    checkpoint = os.path.join(folder, 'checkpoint_latest.pth')
    if cfg.continue_training and not os.path.isfile(checkpoint):
        raise DesdError(f'--c: nothing to continue, {checkpoint} does not exist.')
    os.makedirs(folder, exist_ok=True)

    trainer = Pretrainer(cfg, prepared, ctx, folder)
    if cfg.continue_training:
        trainer.load_checkpoint(checkpoint)
    if trainer.epoch >= cfg.epochs:
        trainer.progress.log(f'nothing to do: {checkpoint} has finished {trainer.epoch} epochs.')
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    workers = get_allowed_n_proc_DA() if cfg.num_workers is None else cfg.num_workers
    loader = build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                               pin_memory=ctx.device.type == 'cuda')
    try:
        trainer.run(loader)
    finally:
        if hasattr(loader, '_finish'):
            loader._finish()
    return os.path.join(folder, EXPORT_FILE)


def main(argv: Optional[List[str]] = None) -> None:
    cfg, preprocess_only = parse_config(argv)
    try:
        path = run(cfg, preprocess_only)
    except DesdError as e:
        print(f'desd_pretrain: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'preprocessed data ready for {cfg.dataset}' if path is None else f'export: {path}')


if __name__ == '__main__':
    main()
