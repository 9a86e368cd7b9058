"""Shared fixtures: nnU-Net folders in a tmp dir and a runner for the real commands in fresh processes.

nnunetv2.paths reads nnUNet_raw/... when it is imported, so every command that needs them runs in a
subprocess with its own environment.
"""
import os
import shutil
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


def with_results(env: dict, results) -> dict:
    """The same raw and preprocessed folders, another (created) nnUNet_results: a run of its own on shared data."""
    os.makedirs(results, exist_ok=True)
    return dict(env, nnUNet_results=str(results))


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


@pytest.fixture(scope='session')
def benchmark_workspace(finetune_datasets, tmp_path_factory):
    """Folders for desd_benchmark runs on a copy of finetune_datasets' planned dataset 901 (which stays unchanged):
    (root, env with the ext trainers). Shared by the benchmark tests, so a cell one of them trained (the vanilla
    nnUNetTrainerTiny at fraction 0.5 of fold 0) is reused by the other, in either order, as desd_benchmark reuses
    finished cells for a user."""
    from nnunetv2_desd.trainers.lookup import with_ext_trainers
    root = tmp_path_factory.mktemp('benchmark_workspace')
    env = with_ext_trainers(nnunet_env(root))
    shutil.copytree(finetune_datasets[0] / 'preprocessed' / 'Dataset901_Synthetic',
                    root / 'preprocessed' / 'Dataset901_Synthetic')
    return root, env


@pytest.fixture(scope='session')
def pool_900(tmp_path_factory):
    """Dataset 900 (2 unlabelled cases, 24^3) prepared for DeSD with TINY's settings: (root, env, name). Shared:
    never modify raw or preprocessed; each run writes into its own nnUNet_results (``dict(env, nnUNet_results=..)``)."""
    from nnunetv2_desd.data.sources import write_synthetic_dataset
    root = tmp_path_factory.mktemp('pool_900')
    env = nnunet_env(root)
    name = write_synthetic_dataset(env['nnUNet_raw'], 900, n_cases=2, shape=(24, 24, 24))
    run_command(['desd_pretrain', '-d', '900', '--preprocess-only', *TINY], env, timeout=900)
    return root, env, name


@pytest.fixture(scope='session')
def refs_data(tmp_path_factory):
    """A pool (920, 2 cases) and a labelled reference (921, 2 cases, 24^3), planned and preprocessed for -m refs:
    the nnU-Net environment. Shared: never modify raw or preprocessed."""
    from nnunetv2_desd.data.sources import write_synthetic_dataset
    env = nnunet_env(tmp_path_factory.mktemp('refs_data'))
    write_synthetic_dataset(env['nnUNet_raw'], 920, n_cases=2, shape=(24, 24, 24))
    write_synthetic_dataset(env['nnUNet_raw'], 921, name='SyntheticLabelled', n_cases=2, shape=(24, 24, 24),
                            labelled=True, seed=1)
    run_command(['nnUNetv2_plan_and_preprocess', '-d', '921', '-c', '3d_fullres', '-npfp', '1', '-np', '1'], env,
                timeout=900)
    run_command(['desd_pretrain', '-d', '920', '-m', 'refs', '--reference', '921', '--preprocess-only', *TINY], env,
                timeout=900)
    return env


# ---------------------------------------------------------------------------------------------------- parallel runs
# scripts/test.sh runs the suite on pytest-xdist workers. Each worker has its own tmp dir, its own session fixtures
# and its own environment variables; ports are free ones picked at run time. A unit of work is one test module (so
# a module-scoped fixture is prepared once), or several modules that share a session fixture of this file (so it is
# prepared once, and its users never run at the same time): SHARED_FIXTURE_MODULES. Units go out longest first.

SHARED_FIXTURE_MODULES = {
    'finetune_datasets and benchmark_workspace': ('test_finetune_benchmark_e2e.py', 'test_dmd_e2e.py',
                                                  'test_finetune_e2e.py', 'test_nnssl.py', 'test_probe.py'),
    'pool_900 and refs_data': ('test_bad_input.py', 'test_cluster.py', 'test_distributed.py',
                               'test_refs_distributed.py'),
}
_UNIT_OF_MODULE = {module: unit for unit, modules in SHARED_FIXTURE_MODULES.items() for module in modules}

# Expected seconds of the slowest tests on 2 CPU cores (pytest --durations, setup included), used only to hand out
# the longest units first; a test not listed counts 20 s when marked e2e, else 1 s.
EXPECTED_SECONDS = {
    'test_finetune_benchmark_e2e.py::test_benchmark_runs_reports_and_reuses': 148,
    'test_dmd_e2e.py::test_dmd_preprocess_train_resume_benchmark_predict': 103,
    'test_finetune_e2e.py::test_stock_commands_train_predict_evaluate_and_rank': 56,
    'test_pool_benchmark.py::test_pool_benchmark_command_writes_a_column_per_size_and_the_ratios': 55,
    'test_pvt_e2e.py::test_cads_on_pvt_unet_fine_tunes_and_predicts_with_stock_nnunet': 49,
    'test_pretrain_e2e.py::test_resume_after_kill_equals_uninterrupted_run': 43,
    'test_cads_e2e.py::test_real_chest_ct_pretrains_and_fine_tunes_with_stock_nnunet': 41,
    'test_pretrain_e2e.py::test_stock_nnunet_train_loads_the_export': 39,
    'test_nnssl.py::test_an_nnssl_checkpoint_is_planned_like_fine_tuned_and_predicted': 38,
    'test_cluster.py::test_sigterm_mid_epoch_then_continue_equals_uninterrupted_run': 33,
}


def work_unit(nodeid: str) -> str:
    """The unit of work of a test, from its nodeid: its module, or the name of the modules that share a fixture."""
    module = nodeid.split('::', 1)[0].rsplit('/', 1)[-1]
    return _UNIT_OF_MODULE.get(module, module)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's loadscope scheduling with work_unit as the scope, in the workers' collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class WorkUnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return work_unit(nodeid)

    config.option.loadscopereorder = False  # keep the longest-first order of _order_for_workers
    return WorkUnitScheduling(config, log)


def pytest_configure(config):
    """A pytest-xdist worker gets its share of the CPU cores as torch's (OpenMP's) threads, for itself and the
    commands it starts (they inherit the environment), unless OMP_NUM_THREADS is set: two workers on 2 cores then
    run one thread each instead of four threads that wait for one another."""
    workers = getattr(config, 'workerinput', {}).get('workercount')
    if workers and 'OMP_NUM_THREADS' not in os.environ:
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        os.environ.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        if 'torch' in sys.modules:
            sys.modules['torch'].set_num_threads(int(threads))


def _order_for_workers(items) -> None:
    """Longest unit first, a unit's tests together and in their order (every worker orders alike)."""
    units = [work_unit(item.nodeid) for item in items]
    cost, first = {}, {}
    for i, (item, unit) in enumerate(zip(items, units)):
        path, _, name = item.nodeid.partition('::')
        test = f"{path.rsplit('/', 1)[-1]}::{name}"
        cost[unit] = cost.get(unit, 0) + EXPECTED_SECONDS.get(test, 20 if item.get_closest_marker('e2e') else 1)
        first.setdefault(unit, i)
    order = sorted(range(len(items)), key=lambda i: (-cost[units[i]], first[units[i]], i))
    items[:] = [items[i] for i in order]


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where no CUDA device is visible; on a pytest-xdist
    worker the tests are ordered for the scheduler."""
    cuda_tests = [item for item in items if item.get_closest_marker('cuda') is not None]
    if cuda_tests:
        import torch
        if not torch.cuda.is_available():
            skip = pytest.mark.skip(reason='needs a CUDA device: torch.cuda.is_available() is false')
            for item in cuda_tests:
                item.add_marker(skip)
    if hasattr(config, 'workerinput'):
        _order_for_workers(items)
