"""``desd_pretrain_benchmark``: the command that times pre-training steps, DeSD's or (``-m``) a method's.

    desd_pretrain_benchmark -d 500 --plans-from 501 [-device cuda] [--batch-size 2] [--out FOLDER]
    desd_pretrain_benchmark -d 500 -m cads --plans-from 501 ...      # CADS vs DeSD
    desd_pretrain_benchmark -d 920 -m refs --reference 921 ...       # ReFs (both matching forms) vs DeSD

desd_pretrain's options, plus the benchmark's own; the report goes to --out (default
nnUNet_results/<dataset>/desd_benchmark). Targets: DeSD / supervised step <= 1.5 and real-loading / in-memory
throughput >= 0.9 (-m desd); CADS / DeSD step <= 0.5 and memory <= 0.6 (-m cads); ReFs fish / DeSD step <= 2.5
(-m refs). Details and measured results: docs/benchmark.md.
"""
import argparse
import dataclasses
from typing import List, Optional, Tuple

from nnunetv2_desd.cli import pretrain
from nnunetv2_desd.common.errors import command_errors
from nnunetv2_desd.pretraining.config import PretrainConfig

PROG = 'desd_pretrain_benchmark'
BENCH_OPTIONS = ('warmup_iters', 'measure_iters', 'out', 'supervised_compile')
REPORTS = {'cads': 'cads_vs_desd', 'refs': 'refs_vs_desd'}  # the report's name per method; the others: 'benchmark'


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    """``desd_pretrain``'s arguments plus the benchmark's own."""
    p = pretrain.build_parser()
    p.prog = PROG
    p.description = __doc__
    p.formatter_class = _HelpFormatter
    g = p.add_argument_group('benchmark')
    g.add_argument('--warmup-iters', type=int, default=5,
                   help='untimed iterations before each timed loop (and torch.compile, if any)')
    g.add_argument('--measure-iters', type=int, default=20, help='timed iterations per loop')
    g.add_argument('--out', default=None,
                   help='folder for the report\'s .md/.csv/.png; None means nnUNet_results/<dataset>/desd_benchmark')
    g.add_argument('--supervised-compile', action='store_true',
                   help='let nnU-Net torch.compile the supervised network as it does by default on CUDA '
                        '(off: DeSD runs eager, so the ratio compares eager with eager)')
    return p


def parse_args(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, dict]:
    """(PretrainConfig, benchmark options). desd_pretrain options that are no PretrainConfig field (say
    --preprocess-only) are accepted by the parser but only at their defaults."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    options = {k: args.pop(k) for k in BENCH_OPTIONS}
    config_keys = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in [k for k in args if k not in config_keys]:
        if args.pop(key) != parser.get_default(key):
            parser.error(f'--{key.replace("_", "-")} is a desd_pretrain option the benchmark does not use')
    return pretrain.config_from_options(args), options


def run(cfg: PretrainConfig, options: dict) -> Tuple[str, str]:
    """Measures and writes the report of ``cfg.method``; returns (its Markdown, the folder)."""
    # here and below: heavy (torch, the pretraining engine): not for --help
    from nnunetv2_desd.benchmarks.timing import default_out_folder
    if options['out'] is None:
        default_out_folder('')  # fail before measuring, not after
    warmup, measure = options['warmup_iters'], options['measure_iters']
    if cfg.method == 'cads':
        from nnunetv2_desd.benchmarks.cads import compare_cads_with_desd, write_comparison
        result, prepared = compare_cads_with_desd(cfg, warmup, measure)
        write = write_comparison
    elif cfg.method == 'refs':
        from nnunetv2_desd.benchmarks.refs import compare_refs_with_desd, write_refs_comparison
        result, prepared = compare_refs_with_desd(cfg, warmup, measure)
        write = write_refs_comparison
    else:
        from nnunetv2_desd.benchmarks.pretraining import run_benchmark, write_outputs
        result, prepared = run_benchmark(cfg, warmup, measure, options['supervised_compile'])
        write = write_outputs
    out = options['out'] or default_out_folder(prepared.dataset_name)
    return write(result, out), out


def main(argv: Optional[List[str]] = None) -> None:
    with command_errors(PROG):
        cfg, options = parse_args(argv)
        text, out = run(cfg, options)
    print(text)
    print(f'written to {out}: {REPORTS.get(cfg.method, "benchmark")}.md/.csv/.png')


if __name__ == '__main__':
    main()
