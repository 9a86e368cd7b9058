"""``python -m nnunetv2_desd.cli.host_syncs``: host synchronisations per pre-training step on CUDA.

    python -m nnunetv2_desd.cli.host_syncs -d 500 --plans-from 501 -device cuda --steps 5 --out desd.json
    python -m nnunetv2_desd.cli.host_syncs -d 500 -m refs --reference 501 --plans-from 501 -device cuda \\
        --steps 5 --out refs.json

desd_pretrain's options, plus --warmup-steps, --steps and --out; the counting is
``nnunetv2_desd.benchmarks.host_syncs``'s. CUDA only: without a CUDA device it exits 2.
"""
import argparse
import dataclasses
import json
import os
from typing import List, Optional, Tuple

from nnunetv2_desd.benchmarks.host_syncs import count_host_syncs
from nnunetv2_desd.cli import pretrain
from nnunetv2_desd.common.errors import command_errors
from nnunetv2_desd.pretraining.config import PretrainConfig

PROG = 'python -m nnunetv2_desd.cli.host_syncs'
OWN_OPTIONS = ('warmup_steps', 'steps', 'out')


def build_parser() -> argparse.ArgumentParser:
    """``desd_pretrain``'s arguments plus the count's own."""
    p = pretrain.build_parser()
    p.prog = PROG
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    g = p.add_argument_group('host synchronisations')
    g.add_argument('--warmup-steps', type=int, default=3, help='steps before counting (default: %(default)s)')
    g.add_argument('--steps', type=int, default=5, help='counted steps (default: %(default)s)')
    g.add_argument('--out', required=True, help='the JSON file to write')
    return p


def parse_args(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, dict]:
    """(PretrainConfig, the count's options); desd_pretrain options that are no PretrainConfig field are refused
    unless at their defaults."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    options = {k: args.pop(k) for k in OWN_OPTIONS}
    if options['steps'] < 1:
        parser.error(f'--steps {options["steps"]}: count 1 step or more')
    if options['warmup_steps'] < 0:
        parser.error(f'--warmup-steps {options["warmup_steps"]}: 0 or more')
    config_keys = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in [k for k in args if k not in config_keys]:
        if args.pop(key) != parser.get_default(key):
            parser.error(f'--{key.replace("_", "-")} is a desd_pretrain option the count does not use')
    return pretrain.config_from_options(args), options


def main(argv: Optional[List[str]] = None) -> None:
    with command_errors(PROG):
        cfg, options = parse_args(argv)
        result = count_host_syncs(cfg, options['warmup_steps'], options['steps'])
        os.makedirs(os.path.dirname(os.path.abspath(options['out'])), exist_ok=True)
        with open(options['out'], 'w') as f:
            json.dump(result, f, indent=1)
    print(f'{cfg.method}: host synchronisations per step {result["syncs_per_step"]} (mean {result["mean"]:.2f}, max '
          f'{result["max"]}); written to {options["out"]}')
    for source in result['sources']:
        print(f'  {source["count"]:4d} x {source["where"]}: {source["code"]}  [{source["message"]}]')


if __name__ == '__main__':
    main()
