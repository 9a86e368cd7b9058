"""``desd_pretrain``: self-supervised pre-training of an nnU-Net-planned encoder on an (unlabelled) dataset."""
import argparse
import os
from typing import List, Optional, Tuple

from nnunetv2_desd.errors import ArgumentParser, DesdError, command_errors
from nnunetv2_desd.pretraining.config import METHOD_DEFAULTS, RECIPES, SCALED_EPOCH_COUNTS, PretrainConfig
from nnunetv2_desd.pretraining.models.heads import HEAD_NORMS
from nnunetv2_desd.pretraining.views.drr import ATTENUATIONS, VIEWS

METHODS = ('desd', 'cads', 'refs')


def _default(key: str) -> str:
    """The default of a config field as help text, per method where the methods differ."""
    base = getattr(PretrainConfig(''), key)
    per_method = {m: METHOD_DEFAULTS[m].get(key, base) for m in METHODS}
    if len(set(map(str, per_method.values()))) == 1:
        text = str(base)
    else:
        text = ', '.join(f'{m} {v}' for m, v in per_method.items())
    if key in RECIPES['small-batch']:
        text = f'{RECIPES["small-batch"][key]}; --recipe official: {text}'
    if key in SCALED_EPOCH_COUNTS:
        text += '; scaled to runs shorter than the official epochs'
    return f'(default: {text})'


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_pretrain', description=__doc__)
    p.add_argument('-d', dest='dataset', required=True, help='dataset id or name in nnUNet_raw (labels optional)')
    p.add_argument('-m', dest='method', default='desd', choices=METHODS,
                   help='desd: deep self-distillation; cads: DeSD + CT/DRR alignment with packed masking (CT only); '
                        'refs: DeSD + a supervised reference task with gradient matching (needs --reference)')
    p.add_argument('--recipe', choices=tuple(RECIPES),
                   help='small-batch: what makes self-distillation learn at nnU-Net\'s batch sizes (running head '
                        'statistics, sharper and faster teacher); official: the method\'s published recipe, for large '
                        'global batches. Options given explicitly override either ' + _default('recipe'))
    p.add_argument('-c', dest='configuration', help='nnU-Net 3D configuration ' + _default('configuration'))
    p.add_argument('-p', dest='plans', help='plans identifier (default: the planner\'s, nnUNetPlans)')
    p.add_argument('-pl', dest='planner', help='nnU-Net experiment planner, e.g. nnUNetPlannerResEncM '
                                                + _default('planner'))
    p.add_argument('--plans-from', help='use the plans nnU-Net made for this (labelled) dataset, so the encoder '
                                        'transfers 1:1 (-m refs: default --reference)')
    p.add_argument('--c', dest='continue_training', action='store_true', help='continue from checkpoint_latest')
    p.add_argument('--init', help='start student and teacher encoder from this checkpoint: a nnunetv2_desd export or '
                                  'an nnssl checkpoint (network_weights + nnssl_adaptation_plan) whose encoder the '
                                  'plans build; e.g. DeSD on top of an MAE-pretrained ResEnc-L')
    p.add_argument('-device', dest='device', choices=('cuda', 'cpu'), help=_default('device'))
    p.add_argument('--amp', choices=('on', 'off'), help='mixed precision: autocast (float16 on CUDA, bfloat16 on CPU) '
                                                       'with a GradScaler (default: on for -device cuda only)')
    p.add_argument('--epochs', type=int, help=_default('epochs'))
    p.add_argument('--iters-per-epoch', type=int, help=_default('iters_per_epoch'))
    p.add_argument('--batch-size', type=int, help='per process; each sample gives 2 views ' + _default('batch_size'))
    p.add_argument('--patch-size', type=int, nargs=3, help='default: the plans\' patch size')
    p.add_argument('--out-dim', type=int, help='K, the number of prototypes ' + _default('out_dim'))
    p.add_argument('--stages', type=int, nargs='+',
                   help='encoder stages to distil (default: the deepest 4; must include the deepest)')
    p.add_argument('--head-hidden-dim', type=int, help=_default('head_hidden_dim'))
    p.add_argument('--head-bottleneck-dim', type=int, help=_default('head_bottleneck_dim'))
    p.add_argument('--head-norm', choices=HEAD_NORMS,
                   help='normalisation in the heads: batch = DeSD\'s BatchNorm1d over the per-process batch, running = '
                        'batch norm with running statistics over steps (small batches), none = DINO\'s ViT recipe '
                        + _default('head_norm'))
    p.add_argument('--optimizer', choices=('sgd', 'adamw'), help=_default('optimizer'))
    p.add_argument('--lr', type=float, help='base lr per 256 samples (scaled by the global batch) ' + _default('lr'))
    p.add_argument('--min-lr', type=float, help=_default('min_lr'))
    p.add_argument('--warmup-epochs', type=int, help=_default('warmup_epochs'))
    p.add_argument('--weight-decay', type=float, help=_default('weight_decay'))
    p.add_argument('--weight-decay-end', type=float,
                   help='cosine schedule weight-decay -> this per iteration ' + _default('weight_decay_end'))
    p.add_argument('--clip-grad', type=float, help='per-parameter gradient-norm clipping, 0 = off '
                                                   + _default('clip_grad'))
    p.add_argument('--teacher-temp', type=float, help=_default('teacher_temp'))
    p.add_argument('--warmup-teacher-temp', type=float, help=_default('warmup_teacher_temp'))
    p.add_argument('--warmup-teacher-temp-epochs', type=int, help=_default('warmup_teacher_temp_epochs'))
    p.add_argument('--teacher-momentum', type=float, help=_default('teacher_momentum'))
    p.add_argument('--teacher-momentum-end', type=float, help='the teacher momentum\'s cosine schedule ends here '
                                                               + _default('teacher_momentum_end'))
    p.add_argument('--center-momentum', type=float, help='EMA momentum of the teacher centre '
                                                          + _default('center_momentum'))
    p.add_argument('--sinkhorn-queue', type=int, help='teacher targets by Sinkhorn-Knopp equipartition over the '
                                                       'current and this many past teacher rows (0: DeSD\'s centring) '
                                                       + _default('sinkhorn_queue'))
    p.add_argument('--freeze-last-layer-epochs', type=int, help=_default('freeze_last_layer_epochs'))
    g = p.add_argument_group('CADS')
    g.add_argument('--mask-ratio', type=float, help='share of 3D patches masked: 1 - 1/k^2 keeps 1 of every k x k '
                                                   'in-plane block (0 = no masking) ' + _default('mask_ratio'))
    g.add_argument('--mask-patch', type=int, nargs=3,
                   help='patch size of the masking, in voxels ' + _default('mask_patch'))
    g.add_argument('--drr-view', choices=VIEWS, help=_default('drr_view'))
    g.add_argument('--drr-attenuation', choices=ATTENUATIONS, help=_default('drr_attenuation'))
    g = p.add_argument_group('ReFs')
    g.add_argument('--reference', help='labelled dataset (id or name) of the reference task, preprocessed by '
                                       'nnU-Net with the pre-training plans')
    g.add_argument('--reference-weight', type=float, help='lambda_ref, weight of the reference loss '
                                                          + _default('reference_weight'))
    g.add_argument('--matching', choices=('fish', 'cosine'),
                   help='gradient matching: fish = first-order inner steps (Fish); cosine = explicit '
                        'lambda_match (1 - cos(g_ssl, g_ref)) with double backward ' + _default('matching'))
    g.add_argument('--matching-weight', type=float, help='lambda_match of the cosine form '
                                                         + _default('matching_weight'))
    g.add_argument('--matching-stages', type=int, help='cosine form: match the gradients of the deepest N encoder '
                                                       'stages only, to bound memory (default: all stages)')
    g.add_argument('--fish-inner-lr', type=float, help='alpha, lr of the inner SGD steps of the fish form '
                                                       + _default('fish_inner_lr'))
    g.add_argument('--reference-batch-size', type=int, help='reference cases per process and step (default: '
                                                            '--batch-size)')
    p.add_argument('--num-workers', type=int,
                   help='augmentation processes (default: nnU-Net\'s nnUNet_n_proc_DA logic; 0 = in-process)')
    p.add_argument('-np', dest='num_preprocessing_processes', type=int,
                   help='processes for checking, fingerprinting, preprocessing and DRRs '
                        + _default('num_preprocessing_processes'))
    p.add_argument('--seed', type=int, help=_default('seed'))
    p.add_argument('--preprocess-only', action='store_true',
                   help='check, plan and preprocess (and make the DRRs), then stop (run this once before torchrun '
                        'on a cluster)')
    return p


def parse_config(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool]:
    args = vars(build_parser().parse_args(argv))
    preprocess_only = args.pop('preprocess_only')
    args['amp'] = None if args['amp'] is None else args['amp'] == 'on'
    return PretrainConfig.create(**args), preprocess_only


def prepare_data(cfg: PretrainConfig, ctx):
    """Checks, plans and preprocesses (and for CADS makes the DRRs) on rank 0; the other ranks then find it done.
    ReFs: the reference is checked against the plans first."""
    from nnunetv2_desd.pretraining.data.planning import prepare_pretraining_data
    if cfg.method == 'cads':  # refuse what CADS cannot use before anything is written
        from nnunetv2_desd.pretraining.data.drrs import require_ct
        from nnunetv2_desd.pretraining.data.raw import read_raw_dataset
        from nnunetv2_desd.pretraining.views.masking import block_for_ratio
        block_for_ratio(cfg.mask_ratio)
        raw = read_raw_dataset(cfg.dataset)
        require_ct(raw.dataset_json['channel_names'], raw.name)
    if cfg.method == 'refs':  # refuse a reference that does not fit before anything is written
        check_reference_before_preparing(cfg)
    elif cfg.reference is not None:
        raise DesdError(f'--reference is an option of -m refs, not of -m {cfg.method}.')

    def prepare():
        prepared = prepare_pretraining_data(cfg.dataset, cfg.configuration, cfg.plans, cfg.planner, cfg.plans_from,
                                            cfg.num_preprocessing_processes)
        if cfg.method == 'cads':
            from nnunetv2_desd.pretraining.data.drrs import write_drrs
            prepared.drr_files = write_drrs(prepared, cfg.drr_view, cfg.drr_attenuation,
                                            cfg.num_preprocessing_processes)
        return prepared

    if ctx.is_main:
        prepared = prepare()
        ctx.barrier()
    else:
        ctx.barrier()
        prepared = prepare()  # finds rank 0's work done
    return prepared


def check_reference_before_preparing(cfg: PretrainConfig) -> None:
    """-m refs: the reference must be preprocessed with the plans the pre-training data will get (those of
    ``--plans-from``, by default the reference's own)."""
    from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2_desd.pretraining.data.raw import read_raw_dataset, resolve_dataset_name
    from nnunetv2_desd.pretraining.data.reference import open_reference
    if not cfg.reference:
        raise DesdError('-m refs needs --reference DATASET: a labelled dataset preprocessed with nnU-Net '
                        '(nnUNetv2_plan_and_preprocess -d DATASET -c 3d_fullres).')
    raw = read_raw_dataset(cfg.dataset)
    reference = cfg.reference = resolve_dataset_name(cfg.reference)  # as the checkpoint records it
    source = resolve_dataset_name(cfg.plans_from or cfg.reference)
    source_plans = cfg.plans or 'nnUNetPlans'
    source_file = join(nnUNet_preprocessed, source, source_plans + '.json')
    if not isfile(source_file):
        raise DesdError(f'{source_file} does not exist: plan and preprocess {source} first '
                        f'(nnUNetv2_plan_and_preprocess -d {source[7:10]} -c {cfg.configuration}).')
    # the name planning.prepare_pretraining_data gives the copied plans
    open_reference(reference, load_json(source_file), f'{source_plans}_from{source[7:10]}', cfg.configuration,
                   raw.num_channels, plans_source=source)


def run(cfg: PretrainConfig, preprocess_only: bool = False) -> Optional[str]:
    """Prepares the data (rank 0), pre-trains, and returns the export path."""
    from nnunetv2_desd.pretraining.data.loader import build_view_loader
    from nnunetv2_desd.pretraining.engine.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import EXPORT_FILE, Pretrainer, output_folder_for

    from nnunetv2_desd.pretraining.engine.pretrained_weights import read_export

    if cfg.init is not None and cfg.continue_training:
        raise DesdError('--init starts a new run from a checkpoint\'s encoder; --c continues this run: choose one.')
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
    loader = build_view_loader(prepared, trainer.patch_size, cfg.batch_size, workers,
                               pin_memory=ctx.device.type == 'cuda', drr_files=prepared.drr_files)
    if trainer.reference is not None:
        loader = trainer.with_reference_loader(loader, workers)
    try:
        trainer.run(loader)
    finally:
        if hasattr(loader, '_finish'):
            loader._finish()
    return os.path.join(folder, EXPORT_FILE)


def main(argv: Optional[List[str]] = None) -> None:
    with command_errors('desd_pretrain'):
        cfg, preprocess_only = parse_config(argv)
        path = run(cfg, preprocess_only)
    print(f'preprocessed data ready for {cfg.dataset}' if path is None else f'export: {path}')


if __name__ == '__main__':
    main()
