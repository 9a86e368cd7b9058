"""``desd_pvt_benchmark``: the command that measures PVT-UNet against nnU-Net's PlainConvUNet on the same patch.

    desd_pvt_benchmark -d 501                                   # the dataset's nnUNetPlans and nnUNetPlans_pvt
    desd_pvt_benchmark --patch-size 64 128 128 --spacing 2.5 0.8 0.8   # the U-Net nnU-Net plans for that patch

Prints a Markdown table, one row per network: parameters (all, encoder), forward and training-step time, training
memory, the meta-device feature-map estimate and the batch for a 24 GB GPU; ``-o`` also writes the figures as JSON.
What is measured, and how: ``nnunetv2_desd.benchmarks.pvt``. Medians over ``--repeats`` after one warm-up.
"""
import argparse
import json
from typing import List, Optional

import torch

from nnunetv2_desd.benchmarks.pvt import markdown, run
from nnunetv2_desd.common.errors import ArgumentParser, command_errors

PROG = 'desd_pvt_benchmark'


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', help='dataset with nnUNetPlans and PVT plans')
    p.add_argument('-p', dest='plans_name', default='nnUNetPlans_pvt', help='PVT plans (default nnUNetPlans_pvt)')
    p.add_argument('--patch-size', type=int, nargs=3, help='default: the stock plans\' patch')
    p.add_argument('--spacing', type=float, nargs=3, help='without -d: spacing nnU-Net plans the U-Net for')
    p.add_argument('--batch-size', type=int, default=1, help='samples per timed step (default 1)')
    p.add_argument('-device', dest='device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--repeats', type=int, default=3)
    p.add_argument('-o', dest='output', help='also write the figures as JSON here')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors(PROG):
        report = run(args.dataset, args.patch_size, args.spacing, args.plans_name, args.batch_size, args.device,
                     args.repeats)
    print(markdown(report))
    if args.output:
        with open(args.output, 'w') as f:
            json.dump(report, f, indent=2)


if __name__ == '__main__':
    main()
