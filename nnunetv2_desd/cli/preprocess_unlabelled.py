"""``desd_preprocess_unlabelled``: images without labels, preprocessed with a labelled dataset's nnU-Net plans.

    nnUNetv2_plan_and_preprocess -d 501 -c 3d_fullres
    desd_preprocess_unlabelled -d 501 -u 500 [502 ...] [-p nnUNetPlans] [-c 3d_fullres]

Every image of the unlabelled datasets' imagesTr is checked first (every bad case named in one message, or left
out with --exclude-bad-cases), then preprocessed as nnU-Net preprocesses an image for prediction with 501's plans
and stored next to 501's data as nnUNetTrainerDMD's unlabelled pool. Resumable and incremental; --part I --parts N
splits the cases across jobs. List every unlabelled dataset in one call. Details: docs/dmd.md.
"""
import argparse
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, add_share_options, check_share, command_errors
from nnunetv2_desd.data.unlabelled import preprocess_unlabelled


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_preprocess_unlabelled', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='the labelled dataset (id or DatasetXXX_Name), planned')
    p.add_argument('-u', dest='unlabelled', nargs='+', required=True,
                   help='unlabelled dataset(s) in nnUNet_raw (imagesTr with the labelled dataset\'s channels)')
    p.add_argument('-p', dest='plans', default='nnUNetPlans',
                   help='plans of the labelled dataset (default: %(default)s)')
    p.add_argument('-c', dest='configurations', nargs='+', default=['3d_fullres'],
                   help='configurations to preprocess for (default: %(default)s)')
    p.add_argument('-np', dest='num_processes', type=int, default=None,
                   help='worker processes (default: nnU-Net\'s default_num_processes, nnUNet_def_n_proc)')
    p.add_argument('--allow-other-channel-names', action='store_true',
                   help='accept unlabelled channels named differently from the labelled dataset\'s (same count)')
    p.add_argument('--exclude-bad-cases', action='store_true',
                   help='leave out the cases the image check names (recorded in the pool\'s record) instead of '
                        'stopping')
    add_share_options(p)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors('desd_preprocess_unlabelled'):
        part, parts = check_share(args.part, args.parts)
        preprocess_unlabelled(args.dataset, args.unlabelled, args.plans, args.configurations, args.num_processes,
                              args.allow_other_channel_names, args.exclude_bad_cases, part, parts)


if __name__ == '__main__':
    main()
