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
