"""``desd_pool_benchmark``: the command that measures how pre-training cost grows with the number of cases in the pool.

    desd_pool_benchmark                                  # synthetic CT-like pools of 100 and 1000 cases, on CPU
    desd_pool_benchmark --sizes 20 60 -o /tmp/pool      # other sizes, another folder
    desd_pool_benchmark -d 500 --sizes 50 200           # the first 50 and 200 cases of an existing dataset

Per pool size N: preparation seconds per case, start-up seconds to the first batch, the loader workers' peak RSS
and the seconds per training step, of DeSD and CADS. Writes pool_benchmark.md/.csv/.png/.json in --out and prints
the table. What is measured, and how: docs/scale.md (``nnunetv2_desd.benchmarks.pool``).
"""
import argparse
import shlex
import sys
from typing import List, Optional

from nnunetv2_desd.cli.pretrain import parse_config
from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import ArgumentParser, command_errors

PROG = 'desd_pool_benchmark'


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=_HelpFormatter)
    p.add_argument('--sizes', type=int, nargs='+', default=None,
                   help='pool sizes N (default: 100 1000; with -d and no --sizes: all its cases)')
    p.add_argument('-d', dest='dataset', default=None,
                   help='cut the pools from this dataset of nnUNet_raw (its first N cases, symlinked) instead of '
                        'writing synthetic ones')
    p.add_argument('-o', '--out', dest='out', default='./pool_benchmark', help='folder for the report and the pools')
    p.add_argument('--shape', type=int, nargs=3, default=[32, 32, 32], help='synthetic volume size (x y z)')
    p.add_argument('--shape-jitter', type=int, default=4, help='+- voxels per axis, per synthetic case')
    p.add_argument('--patch-size', type=int, nargs=3, default=[32, 32, 32],
                   help='training patch (CADS\'s masked view must reach the deepest stage: 32^3 at the least)')
    p.add_argument('--batch-size', type=int, default=2)
    p.add_argument('--num-workers', type=int, default=2, help='loader (augmentation) processes, at least 1')
    p.add_argument('-np', dest='num_processes', type=int, default=2, help='desd_pretrain -np: preparation processes')
    p.add_argument('--warmup-steps', type=int, default=2, help='untimed steps (the first on the start-up batch)')
    p.add_argument('--steps', type=int, default=10, help='timed steps per method')
    p.add_argument('-device', dest='device', default='cpu', choices=('cpu', 'cuda'))
    p.add_argument('--seed', type=int, default=0, help='seed of the synthetic pools')
    p.add_argument('--keep', action='store_true', help='keep each N\'s nnU-Net folders under <out>/pools')
    return p


def worker_main(argv: List[str]) -> None:
    """``python -m nnunetv2_desd.cli.pool_benchmark --worker RESULT.json [--warmup-steps W] [--steps S] --
    <desd_pretrain options>``: measures one prepared run (``benchmarks.pool.measure_run``) and writes it as JSON."""
    from nnunetv2_desd.benchmarks.pool import measure_run  # heavy (torch, the pretraining engine): not for --help
    split = argv.index('--') if '--' in argv else len(argv)
    p = ArgumentParser(prog=f'{PROG} --worker')
    p.add_argument('--worker', required=True, help='the JSON file for the result')
    p.add_argument('--warmup-steps', type=int, default=2)
    p.add_argument('--steps', type=int, default=10)
    args = p.parse_args(argv[:split])
    with command_errors(p.prog):
        cfg, _ = parse_config(argv[split + 1:])
        result = measure_run(cfg, args.warmup_steps, args.steps)
    atomic_write_json(result, args.worker)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if '--worker' in argv:
        worker_main(argv)
        return
    args = vars(build_parser().parse_args(argv))
    with command_errors(PROG):
        from nnunetv2_desd.benchmarks.pool import Settings, run_benchmark, write_outputs  # heavy, as above
        sizes = args.pop('sizes')
        if sizes is None:
            if args['dataset'] is None:
                sizes = [100, 1000]
            else:
                from nnunetv2_desd.benchmarks.pool import read_source  # heavy, as above
                sizes = [len(read_source(args['dataset']).cases)]
        args.update(shape=tuple(args['shape']), patch_size=tuple(args['patch_size']))
        settings = Settings(sizes=sizes, **args).check()
        results = run_benchmark(settings, log=lambda line: print(line, flush=True))
        text = write_outputs(settings, results, shlex.join([PROG, *argv]))
    print(text)
    print(f'written to {settings.out}: pool_benchmark.md/.csv/.png/.json')


if __name__ == '__main__':
    main()
