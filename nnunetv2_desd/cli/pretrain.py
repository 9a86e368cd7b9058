"""``desd_pretrain``: self-supervised pre-training of an nnU-Net-planned encoder on an (unlabelled) dataset."""
import argparse
from dataclasses import MISSING, fields
from typing import List, Optional, Tuple

from nnunetv2_desd.common.errors import ArgumentParser, add_share_options, check_share, command_errors
from nnunetv2_desd.pretraining.config import OPTIONS, RECIPES, SCALED_EPOCH_COUNTS, PretrainConfig
from nnunetv2_desd.pretraining.methods.registry import METHODS


def _default(key: str) -> str:
    """The default of a config field as help text, per method where the methods differ ('' where it is None)."""
    base = getattr(PretrainConfig(''), key)
    per_method = {m: method.official_settings.get(key, base) for m, method in METHODS.items()}
    if key not in RECIPES['small-batch'] and all(v is None for v in per_method.values()):
        return ''
    if len(set(map(str, per_method.values()))) == 1:
        text = str(base)
    else:
        text = ', '.join(f'{m} {v}' for m, v in per_method.items())
    if key in RECIPES['small-batch']:
        text = f'{RECIPES["small-batch"][key]}; --recipe official: {text}'
    if key in SCALED_EPOCH_COUNTS:
        text += '; scaled to runs shorter than the official epochs'
    return f'(default: {text})'


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """One option per PretrainConfig field, as its Option declares it. Every option but -d defaults to None (not
    given: the method's and the recipe's default applies); ``--amp`` takes on|off."""
    groups = {}
    for f in fields(PretrainConfig):
        spec = OPTIONS[f.name]
        if spec.group is not None and spec.group not in groups:
            groups[spec.group] = parser.add_argument_group(spec.group)
        required = f.default is MISSING and f.default_factory is MISSING
        default = '' if required or spec.type is bool or 'default' in spec.help else _default(f.name)
        kwargs = dict(dest=f.name, help=' '.join(filter(None, (spec.help, default))))
        if spec.type is bool and f.default is False:
            kwargs.update(action='store_true')
        elif spec.type is bool:
            kwargs.update(choices=('on', 'off'))
        else:
            kwargs.update(type=spec.type, choices=spec.choices or None, required=required,
                          nargs=spec.length or ('+' if spec.many else None))
        groups.get(spec.group, parser).add_argument(spec.flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog='desd_pretrain', description=__doc__)
    add_config_options(p)
    p.add_argument('--preprocess-only', action='store_true',
                   help='check, plan and preprocess (and make the DRRs), then stop. Resumes where an interrupted '
                        'preparation stopped and prepares only cases not prepared yet')
    add_share_options(p)
    return p


def config_from_options(options: dict) -> PretrainConfig:
    """The run's configuration from the parsed options that are PretrainConfig fields (``--amp on|off`` read as a
    switch; one dataset as a name, several as a list; options left out take the method's and the recipe's
    defaults)."""
    amp, dataset = options.get('amp'), options['dataset']
    if isinstance(dataset, list) and len(dataset) == 1:
        dataset = dataset[0]
    given = {k: v for k, v in options.items() if v is not None}
    return PretrainConfig.create(**{**given, 'dataset': dataset, 'amp': None if amp is None else amp == 'on'})


def parse_options(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool, Tuple[int, int]]:
    """(the run's configuration, --preprocess-only, (part, parts))."""
    args = vars(build_parser().parse_args(argv))
    preprocess_only = args.pop('preprocess_only')
    share = check_share(args.pop('part'), args.pop('parts'), preprocess_only)
    return config_from_options(args), preprocess_only, share


def parse_config(argv: Optional[List[str]] = None) -> Tuple[PretrainConfig, bool]:
    return parse_options(argv)[:2]


def main(argv: Optional[List[str]] = None) -> None:
    with command_errors('desd_pretrain'):
        from nnunetv2_desd.pretraining.run import run  # heavy (nnU-Net's planning, the engine): not for --help
        cfg, preprocess_only, share = parse_options(argv)
        path = run(cfg, preprocess_only, share)
    print(f'preprocessed data ready for {" ".join(cfg.datasets)}' if path is None else f'export: {path}')


if __name__ == '__main__':
    main()
