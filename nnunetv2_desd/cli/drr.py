"""``desd_drr``: one digitally reconstructed radiograph (DRR) per CT case, for CADS pre-training.

Plans and preprocesses the dataset if needed (exactly as desd_pretrain), then casts parallel rays through each
raw HU volume and stores the DRR beside the preprocessed case as <case>_drr_<view>_<attenuation>.npy: float32
in [-1, 1], on the preprocessed grid with size 1 on the projection axis. Existing DRRs are reused. The default
(lateral view, linear attenuation: ray sums min-max scaled) is the official CADS DRR. --png also writes one
picture per case.
"""
import argparse
import os
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, add_share_options, check_share, command_errors
from nnunetv2_desd.data.drr_projection import ATTENUATIONS, DEFAULT_ATTENUATION, DEFAULT_VIEW, VIEWS
from nnunetv2_desd.data.drrs import prepare_and_write_drrs, write_drr_pngs
from nnunetv2_desd.pretraining.config import PretrainConfig


def build_parser() -> argparse.ArgumentParser:
    d = PretrainConfig('')
    p = ArgumentParser(prog='desd_drr', description=__doc__,
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='dataset id or name in nnUNet_raw (CT, labels optional)')
    p.add_argument('-c', dest='configuration', default=d.configuration, help='nnU-Net 3D configuration')
    p.add_argument('-p', dest='plans', default=None, help='plans identifier (default: the planner\'s, nnUNetPlans)')
    p.add_argument('-pl', dest='planner', default=d.planner,
                   help='nnU-Net experiment planner, e.g. nnUNetPlannerResEncM')
    p.add_argument('--plans-from', default=None,
                   help='use the plans nnU-Net made for this (labelled) dataset, as desd_pretrain --plans-from')
    p.add_argument('--view', default=DEFAULT_VIEW, choices=VIEWS,
                   help='lateral: rays along the patient\'s left-right axis; frontal: along anterior-posterior')
    p.add_argument('--attenuation', default=DEFAULT_ATTENUATION, choices=ATTENUATIONS,
                   help='linear: ray sums of attenuation; beer_lambert: absorbed fraction 1 - exp(-ray sum)')
    p.add_argument('--png', default=None, metavar='OUTDIR', help='also write OUTDIR/<case>.png for every case')
    p.add_argument('-np', dest='num_processes', type=int, default=None,
                   help='processes for checking, fingerprinting, preprocessing and DRRs (default: nnU-Net\'s '
                        'default_num_processes, nnUNet_def_n_proc)')
    add_share_options(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors('desd_drr'):
        part, parts = check_share(args.part, args.parts)
        prepared, paths = prepare_and_write_drrs(args.dataset, args.configuration, args.plans, args.planner,
                                                 args.plans_from, args.view, args.attenuation, args.num_processes,
                                                 part, parts)
        print(f'{len(paths)} DRRs ({args.view}, {args.attenuation}) for {prepared.dataset_name}, '
              f'plans {prepared.plans_identifier}, {prepared.configuration}: '
              f'{os.path.join(prepared.data_folder, f"<case>_drr_{args.view}_{args.attenuation}.npy")}')
        if args.png is not None:
            pngs = write_drr_pngs(prepared, paths, args.png)
            print(f'{len(pngs)} pictures: {os.path.join(os.path.abspath(args.png), "<case>.png")}')


if __name__ == '__main__':
    main()
