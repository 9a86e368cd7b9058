"""The cells of ``desd_benchmark``: checked inputs, fraction folds, a stock ``nnUNetv2_train`` run per cell, the report.

``nnunetv2_desd.cli.benchmark`` documents the command: the baselines, the cells, which runs are reused or continued,
and what a DMD trainer is checked for before the first run.
"""
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results
from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
from tqdm import tqdm

from nnunetv2_desd.common.checkpoint import file_sha256
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.fractions import (SPLITS_FILE, check_fraction, find_fraction_fold, fraction_fold,
                                          fraction_fold_info, subset_size)
from nnunetv2_desd.data.pool import check_pool, preprocess_command, read_pool_record
from nnunetv2_desd.evaluation.report import ROLES, BenchmarkCell, ReportMeta, label_names, write_report
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE, with_ext_trainers

LOG_TAIL_LINES = 30
STEP_WORDS = {'train': 'training', 'val': 'validating', 'continue': 'continuing'}


@dataclass
class BenchmarkOptions:
    """What ``desd_benchmark`` compares on which cells, and how (its options; ``desd_benchmark -h`` explains each)."""
    dataset: str
    weights: Optional[str] = None
    trainer: str = 'nnUNetTrainerDeSD'
    baseline: str = 'nnUNetTrainer'
    scratch_baseline: str = 'auto'
    plans: str = 'nnUNetPlans'
    baseline_plans: str = 'nnUNetPlans'
    configuration: str = '3d_fullres'
    folds: Sequence[int] = (0, 1, 2, 3, 4)
    fractions: Sequence[float] = (1.0,)
    seed: int = 12345
    subset_seeds: int = 1
    device: str = 'cuda'
    only: Optional[str] = None           # a role of ROLES: run that side's cells only
    collect_only: bool = False           # train nothing, report what exists
    print_commands: bool = False         # print the commands of the cells still to run instead of running them
    output: Optional[str] = None         # default: nnUNet_results/<DatasetName>/desd_benchmark


def _unique(values: list) -> list:
    return list(dict.fromkeys(values))


def dataset_name(dataset: str) -> str:
    try:
        return str(maybe_convert_to_dataset_name(dataset))
    except (RuntimeError, ValueError):
        raise DesdError(f'Unknown dataset {dataset!r}: no Dataset{dataset}_* folder under nnUNet_raw, '
                        f'nnUNet_preprocessed or nnUNet_results (give an id such as 501 or a name such as '
                        f'Dataset501_Name).') from None


def data_identifier(plans_file: str, configuration: str) -> str:
    """The configuration's data_identifier, following 'inherits_from' as nnU-Net's plans manager does."""
    with open(plans_file) as f:
        configurations = json.load(f)['configurations']
    if configuration not in configurations:
        raise DesdError(f'Configuration {configuration!r} is not in {plans_file} '
                        f'(it has: {", ".join(configurations)}).')
    name, seen = configuration, []
    while 'data_identifier' not in configurations[name] and 'inherits_from' in configurations[name]:
        seen.append(name)
        name = configurations[name]['inherits_from']
        if name in seen or name not in configurations:
            raise DesdError(f'Configuration {configuration!r} of {plans_file} inherits from a missing or cyclic '
                            f'parent.')
    return configurations[name]['data_identifier']


class BenchmarkSetup:
    """The checked inputs: folders, plans per side, export and its sha256."""

    def __init__(self, options: BenchmarkOptions):
        for name, value in (('nnUNet_preprocessed', nnUNet_preprocessed), ('nnUNet_results', nnUNet_results)):
            if not value:  # nnU-Net's _EnvPath: false when the variable is unset
                raise DesdError(f'{name} is not set: point it at your nnU-Net {name.split("_")[1]} folder.')
        self.fractions = _unique([check_fraction(f) for f in options.fractions])
        self.folds = _unique(options.folds)
        if any(f < 0 for f in self.folds):
            raise DesdError(f'Folds are non-negative integers, got {" ".join(map(str, options.folds))}.')
        if options.subset_seeds < 1:
            raise DesdError(f'--subset-seeds must be at least 1, got {options.subset_seeds}.')
        self.seeds = [options.seed + i for i in range(options.subset_seeds)]
        scratch = options.scratch_baseline
        if scratch == 'auto':
            pretrained = options.weights is not None and not is_dmd_trainer(options.trainer)
            scratch = f'{options.trainer}_scratch' if pretrained else 'none'
        self.trainers = {'tested': options.trainer, 'baseline': options.baseline}
        self.plans = {'tested': options.plans, 'baseline': options.baseline_plans}
        if scratch != 'none':
            self.trainers['scratch'], self.plans['scratch'] = scratch, options.plans
        self.roles = [r for r in ROLES if r in self.trainers]
        folders = {}
        for role in self.roles:
            other = folders.setdefault((self.trainers[role], self.plans[role]), role)
            if other != role:
                raise DesdError(f'The {other} and the {role} trainer are both {self.trainers[role]} with plans '
                                f'{self.plans[role]}: they would share their model folders. Choose another -tr, '
                                f'--baseline, --scratch-baseline or -p.')
        self.dataset = dataset_name(options.dataset)
        self.preprocessed = os.path.join(os.fspath(nnUNet_preprocessed), self.dataset)
        self.results = os.path.join(os.fspath(nnUNet_results), self.dataset)
        if not os.path.isdir(self.preprocessed):
            raise DesdError(f'{self.preprocessed} does not exist: run nnUNetv2_plan_and_preprocess '
                            f'-d {options.dataset} -c {options.configuration} first.')
        self.configuration = options.configuration
        self.data_folders = {}
        for role in self.roles:
            plans_file = os.path.join(self.preprocessed, self.plans[role] + '.json')
            if not os.path.isfile(plans_file):
                option = '--baseline-plans' if role == 'baseline' else '-p'
                raise DesdError(f'Plans file {plans_file} ({role} trainer, {option}) not found: plan the dataset '
                                f'(nnUNetv2_plan_and_preprocess, or '
                                f'desd_plan_like_pretrained for plans that match an export).')
            self.data_folders[role] = os.path.join(self.preprocessed, data_identifier(plans_file, self.configuration))
        dataset_json = os.path.join(self.preprocessed, 'dataset.json')
        if not os.path.isfile(dataset_json):
            raise DesdError(f'{dataset_json} not found: run nnUNetv2_plan_and_preprocess -d {options.dataset} first.')
        with open(dataset_json) as f:
            self.label_names = label_names(json.load(f))
        self.weights, self.weights_sha256 = None, None
        if options.weights is not None:
            if not os.path.isfile(options.weights):
                raise DesdError(f'Pre-trained export -w {options.weights} not found.')
            self.weights = os.path.abspath(options.weights)
            self.weights_sha256 = file_sha256(self.weights)
        self.output = os.path.abspath(options.output) if options.output else \
            os.path.join(self.results, 'desd_benchmark')
        self.device = options.device

    def model_folder(self, role: str, fold_id: int) -> str:
        return os.path.join(self.results, f'{self.trainers[role]}__{self.plans[role]}__{self.configuration}',
                            f'fold_{fold_id}')

    def subset_sizes(self) -> dict:
        """fraction -> 'fold f: k of n, ...' for the fractions below 1, where the splits file exists."""
        splits_file = os.path.join(self.preprocessed, SPLITS_FILE)
        if not os.path.isfile(splits_file):
            return {}
        with open(splits_file) as f:
            splits = json.load(f)
        return {fraction: ', '.join(f'fold {fold}: {subset_size(fraction, len(splits[fold]["train"]))} of '
                                    f'{len(splits[fold]["train"])}' for fold in self.folds if fold < len(splits))
                for fraction in self.fractions if fraction < 1}

    def meta(self) -> ReportMeta:
        return ReportMeta(dataset=self.dataset, configuration=self.configuration, trainers=dict(self.trainers),
                          plans=dict(self.plans), folds=self.folds, fractions=self.fractions, seeds=self.seeds,
                          subset_sizes=self.subset_sizes(),
                          pretrained=f'{self.weights} (sha256 {self.weights_sha256})' if self.weights else None)


def plan_cells(setup: BenchmarkSetup, create_folds: bool) -> List[BenchmarkCell]:
    """Every cell of every role, the tested trainer first in each (fraction, seed, fold), so that a wrong trainer
    name or export fails at the first run. Without create_folds, fraction folds not appended yet have no fold id."""
    # any preprocessed copy of the dataset lists its cases (needed only where splits_final.json is missing)
    data_folder = next((d for d in setup.data_folders.values() if os.path.isdir(d)), setup.data_folders['tested'])
    cells = []
    for fraction in setup.fractions:
        for seed in (setup.seeds if fraction < 1 else [None]):
            for fold in setup.folds:
                subset_seed = setup.seeds[0] if seed is None else seed
                if create_folds:
                    fold_id = fraction_fold(setup.preprocessed, data_folder, fold, fraction, subset_seed)
                else:
                    fold_id = find_fraction_fold(setup.preprocessed, fold, fraction, subset_seed)
                for role in setup.roles:
                    folder = None if fold_id is None else setup.model_folder(role, fold_id)
                    cells.append(BenchmarkCell(role, setup.trainers[role], setup.plans[role], fold, fraction, fold_id,
                                               folder, seed))
    return cells


def check_provenance(cell: BenchmarkCell, setup: BenchmarkSetup) -> Optional[str]:
    """DesdError where a tested run came from another export than -w; a warning where it records none."""
    if cell.role != 'tested' or setup.weights is None or cell.model_folder is None:
        return None
    provenance = os.path.join(cell.model_folder, PROVENANCE_FILE)
    if os.path.isfile(provenance):
        with open(provenance) as f:
            record = json.load(f)
        if record.get('file_sha256') != setup.weights_sha256:
            raise DesdError(f'{cell.model_folder} was trained from another export: its {PROVENANCE_FILE} has sha256 '
                            f'{record.get("file_sha256")} ({record.get("file")}), -w {setup.weights} has sha256 '
                            f'{setup.weights_sha256}. Give that export with -w, or move the fold folder away to '
                            f'retrain it.')
        return None
    if any(os.path.isfile(os.path.join(cell.model_folder, f)) for f in
           ('validation/summary.json', 'checkpoint_final.pth', 'checkpoint_latest.pth')):
        return f'warning: {cell.model_folder} has no {PROVENANCE_FILE}; it cannot be checked against -w.'
    return None


def is_dmd_trainer(name: str) -> bool:
    """Whether ``name`` is nnUNetTrainerDMD or one of this package's DMD variants. Names without 'DMD' are not
    looked up (that would import torch and nnU-Net's trainers); other DMD subclasses fail in their own run."""
    if 'DMD' not in name:
        return False
    # here, not at the top: nnU-Net's trainers are heavy to import, and only DMD names need them
    from nnunetv2_desd.trainers import variants  # noqa: F401  (defines the DMD variants)
    from nnunetv2_desd.trainers.dmd import nnUNetTrainerDMD
    classes, found = [nnUNetTrainerDMD], set()
    while classes:
        cls = classes.pop()
        found.add(cls.__name__)
        classes += cls.__subclasses__()
    return name in found


def check_unlabelled_pools(cells: List[BenchmarkCell], setup: BenchmarkSetup) -> None:
    """DesdError before the first run where a DMD cell to run has no unlabelled cases, a pool made with other
    plans, or -w (see ``desd_benchmark -h``)."""
    pending = [c for c in cells if c.role == 'tested' and c.fold_id is not None and next_step(c) is not None]
    if not pending or not is_dmd_trainer(setup.trainers['tested']):
        return
    trainer = setup.trainers['tested']
    if setup.weights is not None:
        raise DesdError(f'{trainer} trains two randomly initialised networks and takes no pre-trained weights: '
                        f'drop -w.')
    plans_file = os.path.join(setup.preprocessed, setup.plans['tested'] + '.json')
    with open(plans_file) as f:
        plans = json.load(f)
    data_id = data_identifier(plans_file, setup.configuration)
    record = read_pool_record(setup.preprocessed, data_id)
    if record is not None:
        with open(os.path.join(setup.preprocessed, 'dataset.json')) as f:
            num_channels = len(json.load(f)['channel_names'])
        check_pool(record, plans, setup.configuration, num_channels, setup.preprocessed)
        return
    empty = [c for c in pending if not (fraction_fold_info(setup.preprocessed, c.fold_id) or {}).get('left_out')]
    if empty:
        command = preprocess_command(setup.dataset, [], setup.plans['tested'], setup.configuration)
        raise DesdError(f'{trainer} needs unlabelled cases, and these cells have none (a labelled fraction of 1 '
                        f'leaves no case out): {"; ".join(c.describe() for c in empty)}. Preprocess unlabelled '
                        f'images first ({command}) or choose fractions below 1.')


def next_step(cell: BenchmarkCell) -> Optional[str]:
    """None (done: reuse), 'val' (trained, not validated), 'continue' (interrupted) or 'train' (fresh)."""
    if cell.done:
        return None
    if os.path.isfile(os.path.join(cell.model_folder, 'checkpoint_final.pth')):
        return 'val'
    if os.path.isfile(os.path.join(cell.model_folder, 'checkpoint_latest.pth')):
        return 'continue'
    return 'train'


def train_command(cell: BenchmarkCell, step: str, setup: BenchmarkSetup,
                  executable: str = 'nnUNetv2_train') -> List[str]:
    command = [executable, setup.dataset, setup.configuration, str(cell.fold_id), '-tr', cell.trainer,
               '-p', cell.plans, '-device', setup.device]
    if step == 'val':
        command.append('--val')
    elif step == 'continue':
        command.append('--c')
    elif cell.role == 'tested' and setup.weights is not None:
        command += ['-pretrained_weights', setup.weights]
    return command


def nnunet_train_executable() -> str:
    exe = os.path.join(os.path.dirname(sys.executable), 'nnUNetv2_train')
    if os.path.isfile(exe):
        return exe
    exe = shutil.which('nnUNetv2_train')
    if exe is None:
        raise DesdError('nnUNetv2_train not found next to this Python or on PATH: install nnunetv2 in this '
                        'environment.')
    return exe


def log_file(setup: BenchmarkSetup, cell: BenchmarkCell) -> str:
    return os.path.join(setup.output, 'logs', f'{cell.trainer}__fold_{cell.fold_id}.log')


def run_cell(cell: BenchmarkCell, step: str, setup: BenchmarkSetup, env: Dict[str, str]) -> None:
    """Runs one stock nnUNetv2_train; its output is appended to the cell's log. DesdError with the log's tail."""
    if not os.path.isdir(setup.data_folders[cell.role]):
        raise DesdError(f'{setup.data_folders[cell.role]} does not exist: preprocess plans {cell.plans} '
                        f'(nnUNetv2_preprocess -d {setup.dataset} -plans_name {cell.plans} -c {setup.configuration}).')
    command = train_command(cell, step, setup, nnunet_train_executable())
    log = log_file(setup, cell)
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, 'a') as f:
        f.write(f'# {datetime.datetime.now().isoformat(timespec="seconds")} {shlex.join(command)}\n')
        f.flush()
        code = subprocess.run(command, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code != 0 or not cell.done:
        with open(log, errors='replace') as f:
            tail = ''.join(deque(f, maxlen=LOG_TAIL_LINES))
        why = f'exited with code {code}' if code != 0 else 'ended without writing validation/summary.json'
        raise DesdError(f'nnUNetv2_train for {cell.role} {cell.describe()} {why}. Log: {log}\n'
                        f'Last lines:\n{tail.rstrip()}')


def print_commands(cells: List[BenchmarkCell], setup: BenchmarkSetup, env: Dict[str, str]) -> None:
    print(f'export nnUNet_extTrainer={shlex.quote(env["nnUNet_extTrainer"])}')
    for cell in cells:
        step = next_step(cell)
        if step is not None:
            print(shlex.join(train_command(cell, step, setup)))


def benchmark(options: BenchmarkOptions) -> Optional[dict]:
    """Runs (or prints) the selected cells, then writes the report; returns write_report's result (None where
    ``options.print_commands``)."""
    setup = BenchmarkSetup(options)
    cells = plan_cells(setup, create_folds=not options.collect_only)
    selected = [c for c in cells if options.only in (None, c.role)]
    for cell in cells:
        warning = check_provenance(cell, setup)
        if warning and cell in selected:
            print(warning, file=sys.stderr)
    if not options.collect_only:
        check_unlabelled_pools(selected, setup)
    env = with_ext_trainers(os.environ)
    if options.print_commands:
        print_commands(selected, setup, env)
        return None
    if not options.collect_only:
        with tqdm(selected, desc='desd_benchmark', unit='cell', file=sys.stderr, dynamic_ncols=True) as bar:
            for cell in bar:
                step = next_step(cell)
                bar.set_postfix_str(f'{cell.role} fold {cell.fold} fraction {cell.fraction:g}' +
                                    ('' if cell.seed is None else f' seed {cell.seed}'))
                if step is None:
                    continue
                bar.write(f'{STEP_WORDS[step]} {cell.role} {cell.describe()} (log: {log_file(setup, cell)})',
                          file=sys.stderr)
                run_cell(cell, step, setup, env)
    result = write_report(setup.output, cells, setup.label_names, setup.meta())
    print(result['text'])
    print(f'written: {result["md"]}, {result["csv"]}, {result["png"]}')
    return result
