"""Shared fixtures: nnU-Net folders in a tmp dir and a runner for the real commands in fresh processes.

nnunetv2.paths reads nnUNet_raw/... when it is imported, so every command that needs them runs in a
subprocess with its own environment.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent
BIN = Path(sys.executable).parent


def nnunet_env(root: Path) -> dict:
    env = dict(os.environ)
    for key, sub in (('nnUNet_raw', 'raw'), ('nnUNet_preprocessed', 'preprocessed'), ('nnUNet_results', 'results')):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[key] = str(root / sub)
    env.update(nnUNet_def_n_proc='1', nnUNet_n_proc_DA='1', nnUNet_compile='false',
               nnUNet_extTrainer=str(TESTS / 'ext_trainers'), PYTHONUNBUFFERED='1')
    return env


def run_command(args, env: dict, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a console script of this environment (desd_pretrain, nnUNetv2_train, ...)."""
    args = [str(a) for a in args]
    exe = BIN / args[0]
    proc = subprocess.run([str(exe) if exe.exists() else args[0], *args[1:]], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f'{" ".join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\n'
                             f'stderr:\n{proc.stderr[-4000:]}')
    return proc


# the smallest settings that still exercise every part of DeSD on CPU
TINY = ['-device', 'cpu', '--patch-size', '16', '16', '16', '--out-dim', '64', '--head-hidden-dim', '32',
        '--head-bottleneck-dim', '16', '--num-workers', '0', '-np', '1', '--batch-size', '2']


@pytest.fixture
def tmp_nnunet(tmp_path):
    return tmp_path, nnunet_env(tmp_path)


@pytest.fixture(scope='session')
def finetune_datasets(tmp_path_factory):
    """Planned labelled datasets 901 (1 channel, 6 cases) and 902 (2 channels, 5 cases), both PlainConvUNet with
    the same stages, plus a tiny DeSD export pre-trained on 901 with 901's plans. Shared: reuse, never modify."""
    from nnunetv2_desd.data.sources import write_synthetic_dataset
    root = tmp_path_factory.mktemp('finetune')
    env = nnunet_env(root)
    write_synthetic_dataset(env['nnUNet_raw'], 901, n_cases=6, shape=(20, 20, 20), labelled=True)
    write_synthetic_dataset(env['nnUNet_raw'], 902, n_cases=5, shape=(20, 20, 20), labelled=True, n_channels=2)
    run_command(['nnUNetv2_plan_and_preprocess', '-d', '901', '902', '-c', '3d_fullres', '-npfp', '1', '-np', '1'],
                env)
    run_command(['desd_pretrain', '-d', '901', '--epochs', '1', '--iters-per-epoch', '2', *TINY], env)
    export = root / 'results' / 'Dataset901_Synthetic' / 'desd__nnUNetPlans__3d_fullres' / 'pretrained_export.pth'
    return root, env, export


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA device is visible."""
    cuda_tests = [item for item in items if item.get_closest_marker('cuda') is not None]
    if not cuda_tests:
        return
    import torch
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a CUDA device: torch.cuda.is_available() is false')
    for item in cuda_tests:
        item.add_marker(skip)
