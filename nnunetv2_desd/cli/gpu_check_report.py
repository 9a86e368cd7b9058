"""The command that writes gpu_check.md, the summary of ``scripts/gpu_check.sh``.

    python -m nnunetv2_desd.cli.gpu_check_report --steps STEPS.tsv -o gpu_check.md [--gpu-info GPU.log]
        [--batch 2] [--benchmark-md A.md ...] [--benchmark-csv A.csv ...] [--syncs A.json ...]

STEPS.tsv has one line per step: name, exit code, seconds, log path, command, tab-separated. --syncs: the JSON files
of ``python -m nnunetv2_desd.cli.host_syncs``. The report and the 24 GiB batch extrapolation are
``nnunetv2_desd.benchmarks.gpu_check``'s. Nothing here imports torch or nnU-Net.
"""
import argparse
from typing import List, Optional

from nnunetv2_desd.benchmarks.gpu_check import BUDGET_GIB, write_gpu_check
from nnunetv2_desd.common.errors import ArgumentParser

PROG = 'python -m nnunetv2_desd.cli.gpu_check_report'


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', required=True, help='STEPS.tsv: name, exit code, seconds, log, command per line')
    p.add_argument('-o', '--out', required=True, help='the Markdown file to write')
    p.add_argument('--gpu-info', help='a text file with the GPU model (nvidia-smi, torch)')
    p.add_argument('--benchmark-md', nargs='*', default=[], help='md files pasted in as they are')
    p.add_argument('--benchmark-csv', nargs='*', default=[], help='csv files whose *_peak_memory rows are used')
    p.add_argument('--syncs', nargs='*', default=[],
                   help='host_syncs JSON files: host synchronisations per step, per method')
    p.add_argument('--batch', type=int, help='the batch the benchmarks measured at')
    p.add_argument('--budget-gib', type=float, default=BUDGET_GIB)
    return p


def main(argv: Optional[List[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    print(write_gpu_check(args.out, args.steps, args.benchmark_md, args.benchmark_csv, args.batch, args.gpu_info,
                          args.budget_gib, args.syncs))


if __name__ == '__main__':
    main()
