"""``desd_probe``: a frozen-encoder linear probe per stage, exports against nnU-Net's random initialisation.

    desd_probe -d 501 -w EXPORT.pth [EXPORT2.pth ...] [--labels desd desd dino ...]

Answers "did pre-training learn anything useful?" in minutes on a CPU: each stage's features of the labelled
dataset's preprocessed cases feed a per-voxel logistic regression, k-fold over cases; Dice per foreground label and
voxel accuracy per stage, mean +- sd over folds. The plans must be the export's (else: desd_plan_like_pretrained).
Exports with the same ``--labels`` entry form a group (mean, sd, gain over the random initialisations).
Details: docs/benchmark.md.
"""
import argparse
from typing import List, Optional

from nnunetv2_desd.common.errors import ArgumentParser, command_errors
from nnunetv2_desd.evaluation.probe import DEFAULT_RANDOM_SEEDS, probe_markdown, run_probe


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_probe', description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('-d', dest='dataset', required=True, help='labelled dataset (id or name), preprocessed')
    p.add_argument('-w', dest='exports', nargs='+', required=True, help='export(s) of desd_pretrain')
    p.add_argument('--labels', nargs='+', help='one label per export; exports with the same label are averaged '
                                               '(default: the export\'s method)')
    p.add_argument('-p', dest='plans', help='plans identifier (default: the first plans of the dataset that fit '
                                            'the exports, their own plans name first)')
    p.add_argument('-c', dest='configuration', default='3d_fullres', help='configuration (default: %(default)s)')
    p.add_argument('--folds', type=_positive_int, default=5, help='k of the k-fold over cases, at most the number '
                                                                  'of cases (default: %(default)s)')
    p.add_argument('--random-seeds', type=_positive_int, default=DEFAULT_RANDOM_SEEDS,
                   help='random initialisations to compare with, seeds 0..N-1 (default: %(default)s)')
    p.add_argument('--voxels-per-class', type=_positive_int, default=2000,
                   help='training voxels per class and case (default: %(default)s)')
    p.add_argument('--patch-size', type=_positive_int, nargs=3, help='window per case (default: the plans\' patch)')
    p.add_argument('-device', default='auto', choices=('auto', 'cuda', 'cpu'),
                   help='where the encoders run (default: cuda when visible)')
    p.add_argument('-o', dest='output', help='report folder (default: nnUNet_results/<Dataset>/desd_probe)')
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with command_errors('desd_probe'):
        result, paths = run_probe(**vars(args))
    print(probe_markdown(result))
    print(f'table:  {paths["md"]}\ncsv:    {paths["csv"]}\nfigure: {paths["png"]}')


if __name__ == '__main__':
    main()
