"""``desd_dmd_benchmark``: the command that times a DMD trainer's iteration against nnU-Net's vanilla trainer.

    desd_dmd_benchmark -d 501 -p nnUNetPlans -f 5 [-device cpu] [--iterations 10] [-o figures.json]
    python -m nnunetv2_desd.cli.dmd_benchmark ...          # the same

Prints one line of setup and one per measure (compute, compute_cpu, end_to_end: mean +- std and median s/it of
each trainer, their ratios); ``-o`` also writes the summary and every timing as JSON. What is timed, and how:
``nnunetv2_desd.benchmarks.dmd``. The fold must have unlabelled cases for DMD (a labelled-fraction fold or a
desd_preprocess_unlabelled pool).
"""
import argparse
import json
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, command_errors

PROG = 'desd_dmd_benchmark'


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True)
    p.add_argument('-p', dest='plans', default='nnUNetPlans')
    p.add_argument('-c', dest='configuration', default='3d_fullres')
    p.add_argument('-f', dest='fold', type=int, default=0, help='a fold with unlabelled cases for DMD')
    p.add_argument('-tr', dest='trainer', default='nnUNetTrainerDMD')
    p.add_argument('--baseline', default='nnUNetTrainer')
    p.add_argument('-device', default='cpu', choices=['cpu', 'cuda'])
    p.add_argument('--iterations', type=int, default=10)
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('-o', dest='output', default=None, help='also write the figures to this json file')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors(PROG):
        from nnunetv2_desd.benchmarks.dmd import run  # heavy (torch, the pretraining engine): not for --help
        lines, figures = run(args.dataset, args.plans, args.configuration, args.fold, args.trainer, args.baseline,
                             args.device, args.iterations, args.warmup)
    print('\n'.join(lines))
    if args.output:
        with open(args.output, 'w') as f:
            json.dump({'summary': lines, 'figures': figures}, f, indent=2)


if __name__ == '__main__':
    main()
