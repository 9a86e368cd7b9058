"""``desd_plan_like_pretrained``: nnU-Net plans for a downstream dataset that fit a pre-trained export 1:1.

    desd_plan_like_pretrained -d 501 -w EXPORT.pth
    nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerDeSD -p nnUNetPlans_pretrained -pretrained_weights EXPORT.pth

nnU-Net's planner runs at the export's spacing; architecture, spacing, axis order (and, for the same channels,
normalisation) are then the export's, patch and batch the planner's. Only that configuration is written, under a
new plans name. Details: docs/finetuning.md.
"""
import argparse
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, command_errors
from nnunetv2_desd.planning.plan_like_pretrained import DEFAULT_PLANS_NAME, plan_like_pretrained


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_plan_like_pretrained', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='downstream dataset id or name (raw dataset, labelled)')
    p.add_argument('-w', dest='export_file', required=True, help='pre-trained export (pretrained_export.pth)')
    p.add_argument('-p', dest='plans_name', default=DEFAULT_PLANS_NAME,
                   help=f'name of the plans written (default {DEFAULT_PLANS_NAME})')
    p.add_argument('-c', dest='configuration', default='3d_fullres',
                   help='configuration to plan; the only one written (default 3d_fullres)')
    p.add_argument('-pl', dest='planner', default='ExperimentPlanner',
                   help='nnU-Net experiment planner class (default ExperimentPlanner)')
    p.add_argument('--gpu-memory-gb', dest='gpu_memory_gb', type=float, default=None,
                   help='GPU memory target passed to the planner (default: the planner\'s)')
    p.add_argument('--no-preprocess', dest='preprocess', action='store_false', help='write the plans only')
    p.add_argument('-np', dest='num_processes', type=int, default=2, help='processes (default 2)')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors('desd_plan_like_pretrained'):
        plan_like_pretrained(**vars(args))


if __name__ == '__main__':
    main()
