"""``desd_pretrain``: self-supervised pre-training of an nnU-Net-planned encoder on an (unlabelled) dataset."""
import argparse
from typing import List, Optional, Tuple

from nnunetv2_desd.common.errors import ArgumentParser, add_share_options, check_share, command_errors
from nnunetv2_desd.data.drr_projection import ATTENUATIONS, VIEWS
from nnunetv2_desd.pretraining.config import METHOD_DEFAULTS, RECIPES, SCALED_EPOCH_COUNTS, PretrainConfig
from nnunetv2_desd.pretraining.heads import HEAD_NORMS
from nnunetv2_desd.pretraining.methods.registry import METHODS


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
    p.add_argument('-d', dest='dataset', nargs='+', required=True,
                   help='dataset(s) in nnUNet_raw, ids or names (labels optional, not used); several pre-train one '
                        'encoder on all their images, prepared with the plans of --plans-from, else the first\'s')
    p.add_argument('--dataset-weights', type=float, nargs='+',
                   help='sampling weight per dataset of -d (default: every case equally likely)')
    p.add_argument('--exclude-bad-cases', action='store_true',
                   help='leave out the cases the image check names (recorded in the log and the export) instead of '
                        'stopping')
    p.add_argument('-m', dest='method', default='desd', choices=tuple(METHODS),
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
    p.add_argument('--c', dest='continue_training', action='store_true',
                   help='continue from checkpoint_latest, or start a new run where there is none (one job line '
                        'serves the first launch, a requeue and torchrun\'s restarts)')
    p.add_argument('--overwrite', action='store_true',
                   help='start over, replacing the run in the output folder (without it, and without --c, an '
                        'existing run is refused)')
    p.add_argument('--allow-schedule-change', action='store_true',
                   help='--c with other --epochs or --iters-per-epoch (the lr, teacher and weight-decay schedules '
                        'change mid-run)')
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
                   help='processes for checking, fingerprinting, preprocessing and DRRs (default: nnU-Net\'s '
                        'default_num_processes, nnUNet_def_n_proc)')
    p.add_argument('--seed', type=int, help=_default('seed'))
    p.add_argument('--deterministic', action='store_true',
                   help='reproducible pre-training: ordered loader workers and deterministic torch algorithms '
                        '(slower); the same seed gives the same run on the same machine')
    p.add_argument('--preprocess-only', action='store_true',
                   help='check, plan and preprocess (and make the DRRs), then stop. Resumes where an interrupted '
                        'preparation stopped and prepares only cases not prepared yet')
    add_share_options(p)
    return p


def config_from_options(options: dict) -> PretrainConfig:
    """The run's configuration from the parsed options that are PretrainConfig fields (``--amp on|off`` read as a
    switch; one dataset as a name, several as a list; options left out take the method's and the recipe's
    defaults)."""
    amp, dataset = options.get('amp'), options['dataset']
    if isinstance(dataset, list) and len(dataset) == 1:
        dataset = dataset[0]
    return PretrainConfig.create(**{**options, 'dataset': dataset, 'amp': None if amp is None else amp == 'on'})


def parse_options(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool, Tuple[int, int]]:
    """(the run's configuration, --preprocess-only, (part, parts))."""
    args = vars(build_parser().parse_args(argv))
    preprocess_only = args.pop('preprocess_only')
    share = check_share(args.pop('part'), args.pop('parts'), preprocess_only)
    return config_from_options(args), preprocess_only, share


def parse_config(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool]:
    return parse_options(argv)[:2]


def main(argv: Optional[List[str]] = None) -> None:
    with command_errors('desd_pretrain'):
        from nnunetv2_desd.pretraining.run import run
        cfg, preprocess_only, share = parse_options(argv)
        path = run(cfg, preprocess_only, share)
    print(f'preprocessed data ready for {" ".join(cfg.datasets)}' if path is None else f'export: {path}')


if __name__ == '__main__':
    main()
