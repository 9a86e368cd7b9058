"""``desd_benchmark``: a pre-trained fine-tuning or a semi-supervised trainer against two baselines.

    desd_benchmark -d 501 -w EXPORT.pth -tr nnUNetTrainerDeSD --fractions 0.1 0.25 1.0 --subset-seeds 3
    desd_benchmark -d 501 -tr nnUNetTrainerDMD --fractions 0.1 0.2      # semi-supervised DMD: no -w

Baselines: vanilla nnU-Net (``--baseline``) and, for a pre-trained trainer T, its from-scratch twin
(``--scratch-baseline``, default T_scratch). Each (trainer, fold, fraction, subset seed) is one stock
nnUNetv2_train run; finished runs are reused. Clusters: ``--only``, ``--print-commands``, ``--collect-only``.
The report pairs per-case Dice (bootstrap CI, Wilcoxon). Details: docs/benchmark.md.
"""
import argparse
import sys
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, command_errors
from nnunetv2_desd.evaluation.benchmark import BenchmarkOptions, benchmark
from nnunetv2_desd.evaluation.report import ROLES


def build_parser() -> argparse.ArgumentParser:
    d = BenchmarkOptions('')
    p = ArgumentParser(prog='desd_benchmark', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='dataset id or name (DatasetXXX_Name)')
    p.add_argument('-w', dest='weights', default=d.weights,
                   help='pre-trained export (desd_pretrain\'s pretrained_export.pth), passed as -pretrained_weights '
                        'to fresh runs of the tested trainer')
    p.add_argument('-tr', dest='trainer', default=d.trainer, help='trainer under test (default: %(default)s)')
    p.add_argument('--baseline', default=d.baseline,
                   help='baseline trainer, the vanilla trainer of the same schedule (nnUNetTrainerTiny for '
                        'nnUNetTrainerDMDTiny, nnUNetTrainerDemo for nnUNetTrainerDMDDemo; default: %(default)s)')
    p.add_argument('--scratch-baseline', default=d.scratch_baseline,
                   help='second baseline: the tested trainer\'s recipe without pre-trained weights (default: '
                        'TESTED_scratch where -w is given; none: leave it out)')
    p.add_argument('-p', dest='plans', default=d.plans,
                   help='plans of the tested trainer and its scratch twin (default: %(default)s)')
    p.add_argument('--baseline-plans', default=d.baseline_plans, help='plans of the baseline (default: %(default)s)')
    p.add_argument('-c', dest='configuration', default=d.configuration, help='configuration (default: %(default)s)')
    p.add_argument('--folds', type=int, nargs='+', default=list(d.folds), help='standard folds (default: 0-4)')
    p.add_argument('--fractions', type=float, nargs='+', default=list(d.fractions),
                   help='labelled fractions of each fold\'s training cases, in (0, 1] (default: 1.0)')
    p.add_argument('--seed', type=int, default=d.seed, help='seed of the first labelled subsets (default: %(default)s)')
    p.add_argument('--subset-seeds', type=int, default=d.subset_seeds,
                   help='nested labelled subsets per fraction below 1: seeds --seed ... --seed + N - 1 (default: 1)')
    p.add_argument('-device', default=d.device, choices=['cuda', 'cpu'], help='passed to nnUNetv2_train')
    p.add_argument('--only', choices=ROLES, default=d.only, help='run the cells of one side only')
    mode = p.add_mutually_exclusive_group()
    mode.add_argument('--collect-only', action='store_true',
                      help='train nothing: write the report from the runs that exist and list the missing cells')
    mode.add_argument('--print-commands', action='store_true',
                      help='print the nnUNetv2_train command of every cell still to run (and the nnUNet_extTrainer '
                           'export they need), then exit; creates the fraction folds those commands name')
    p.add_argument('-o', dest='output', default=d.output,
                   help='report and log folder (default: nnUNet_results/<DatasetName>/desd_benchmark)')
    return p


def parse_options(argv: Optional[List[str]] = None) -> BenchmarkOptions:
    return BenchmarkOptions(**vars(build_parser().parse_args(argv)))


def main(argv: Optional[List[str]] = None) -> None:
    options = parse_options(argv)
    try:
        with command_errors('desd_benchmark'):
            benchmark(options)
    except KeyboardInterrupt:
        print('desd_benchmark: interrupted; run the same command again to continue (finished cells are reused, '
              'interrupted ones continue with --c).', file=sys.stderr)
        sys.exit(130)


if __name__ == '__main__':
    main()
