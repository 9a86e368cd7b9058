"""``desd_plan_pvt``: nnU-Net plans ``nnUNetPlans_pvt`` that build PVT-UNet, CADS's downstream network.

    desd_plan_pvt -d 500 501                  # plans (and preprocesses, if not done yet) each dataset
    desd_pretrain -d 500 -m cads -p nnUNetPlans_pvt
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerCADS -p nnUNetPlans_pvt -pretrained_weights EXPORT

The stock plans (``-s``) are copied with one configuration changed: PVT-UNet's architecture, the patch rounded to
the total stride (16, 32, 32) and reduced until batch 2 fits, and nnU-Net's batch rule for a ``--gpu-memory-gb``
GPU. Spacing, normalisation and data_identifier stay the stock plans', so nothing is preprocessed twice.
Details: docs/pvt_unet.md.
"""
import argparse
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, command_errors
from nnunetv2_desd.architectures.pvt_unet import CONV_STAGE_FEATURES, PVT_V2_B1, default_arch_kwargs
from nnunetv2_desd.planning.plan_pvt import DEFAULT_GPU_MEMORY_GB, DEFAULT_PLANS_NAME, plan_pvt


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_plan_pvt', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='datasets', nargs='+', required=True, help='dataset ids or names (labels optional)')
    p.add_argument('-s', dest='source_plans', default='nnUNetPlans',
                   help='stock plans to derive from; planned and preprocessed first if missing (default nnUNetPlans)')
    p.add_argument('-p', dest='plans_name', default=DEFAULT_PLANS_NAME,
                   help=f'name of the plans written (default {DEFAULT_PLANS_NAME})')
    p.add_argument('-c', dest='configuration', default='3d_fullres', help='3D configuration (default 3d_fullres)')
    p.add_argument('-pl', dest='planner', default='ExperimentPlanner',
                   help='nnU-Net planner for missing source plans (default ExperimentPlanner)')
    p.add_argument('--gpu-memory-gb', type=float, default=DEFAULT_GPU_MEMORY_GB,
                   help=f'GPU memory the patch and batch are sized for (default {DEFAULT_GPU_MEMORY_GB:g})')
    p.add_argument('--patch-size', type=int, nargs=3, help='fixed patch (a multiple of the total stride)')
    p.add_argument('--batch-size', type=int, help='fixed batch size')
    a = p.add_argument_group('architecture (default PVTv2-b1)')
    a.add_argument('--embed-dims', type=int, nargs='+', default=list(PVT_V2_B1['embed_dims']))
    a.add_argument('--depths', type=int, nargs='+', default=list(PVT_V2_B1['depths']))
    a.add_argument('--num-heads', type=int, nargs='+', default=list(PVT_V2_B1['num_heads']))
    a.add_argument('--mlp-ratios', type=float, nargs='+', default=list(PVT_V2_B1['mlp_ratios']))
    a.add_argument('--sr-ratios', type=int, nargs='+', default=list(PVT_V2_B1['sr_ratios']))
    a.add_argument('--conv-features', type=int, nargs='+', default=list(CONV_STAGE_FEATURES),
                   help='channels of the full- and half-resolution conv stages (default 32 64)')
    a.add_argument('--drop-path-rate', type=float, default=0.1)
    p.add_argument('-np', dest='num_processes', type=int, default=1, help='preprocessing processes (default 1)')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors('desd_plan_pvt'):
        arch = default_arch_kwargs(args.embed_dims, args.conv_features, args.depths, args.num_heads,
                                   args.mlp_ratios, args.sr_ratios, drop_path_rate=args.drop_path_rate)
        for dataset in args.datasets:
            plan_pvt(dataset, args.source_plans, args.plans_name, args.configuration, args.gpu_memory_gb, arch,
                     args.patch_size, args.batch_size, args.planner, args.num_processes)


if __name__ == '__main__':
    main()
