"""desd_pretrain_benchmark: argument handling, the ratios and the report, and one real run on CPU."""
import csv
import math

import pytest
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.benchmarks import cads, timing
from nnunetv2_desd.benchmarks.pretraining import BenchmarkResult, markdown, rows
from nnunetv2_desd.benchmarks.timing import Phase
from nnunetv2_desd.cli.pretrain_benchmark import parse_args
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.sources import write_synthetic_dataset

PHASE_NAMES = ('desd_in_memory', 'desd_real_loading', 'supervised')
QUANTITIES = [f'{p}_{q}' for p in PHASE_NAMES for q in ('seconds_per_iteration', 'seconds_per_iteration_std',
                                                          'iterations_per_second', 'peak_memory')] + \
             ['desd_to_supervised_step_ratio', 'real_loading_to_in_memory_throughput_ratio']


def test_parse_args_reuses_desd_pretrain_options_and_adds_its_own():
    cfg, options = parse_args(['-d', '911', '--batch-size', '3', '--out-dim', '64', '--warmup-iters', '2',
                               '--measure-iters', '7', '--out', '/x'])
    assert (cfg.dataset, cfg.batch_size, cfg.out_dim) == ('911', 3, 64)
    assert options == {'warmup_iters': 2, 'measure_iters': 7, 'out': '/x', 'supervised_compile': False}


def test_parse_args_rejects_desd_pretrain_options_it_cannot_use(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(['-d', '911', '--preprocess-only'])
    assert e.value.code == 2 and '--preprocess-only' in capsys.readouterr().err


def _result(in_memory, real, supervised):
    phases = {n: Phase(n, n, s, 100.0) for n, s in zip(PHASE_NAMES, (in_memory, real, supervised))}
    return BenchmarkResult({'dataset': 'Dataset911_Synthetic', 'patch': '16 x 16 x 16'}, 'process peak RSS', phases)


def test_ratios_and_report_from_hand_made_timings():
    # in memory: mean 0.3 s; real loading: mean 0.4 s; supervised: mean 0.25 s
    result = _result([0.2, 0.4], [0.4, 0.4], [0.25])
    values = {q: v for q, v, _, _ in rows(result)}
    assert list(values) == QUANTITIES
    assert values['desd_in_memory_seconds_per_iteration'] == pytest.approx(0.3)
    assert values['desd_in_memory_seconds_per_iteration_std'] == pytest.approx(0.1)
    assert values['desd_in_memory_iterations_per_second'] == pytest.approx(1 / 0.3)
    assert values['desd_to_supervised_step_ratio'] == pytest.approx(0.3 / 0.25)   # 1.2 <= 1.5: met
    assert values['real_loading_to_in_memory_throughput_ratio'] == pytest.approx(0.75)  # 0.75 < 0.9: missed
    text = markdown(result)
    assert '| DeSD step / supervised step | 1.200 | <= 1.5 | yes |' in text
    assert '| real-loading / in-memory throughput | 0.750 | >= 0.9 | no |' in text


@pytest.mark.e2e
def test_benchmark_command_on_cpu(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 911, n_cases=3, shape=(24, 24, 24))
    tiny = [a for a in TINY if a not in ('--batch-size', '2')]  # the default batch (2)
    proc = run_command(['desd_pretrain_benchmark', '-d', '911', *tiny, '--warmup-iters', '1',
                        '--measure-iters', '2'], env, timeout=300)
    out = tmp_path / 'results' / name / 'desd_benchmark'  # the default --out
    assert '| DeSD step / supervised step |' in proc.stdout

    with open(out / 'benchmark.csv') as f:
        table = list(csv.DictReader(f))
    assert [r['quantity'] for r in table] == QUANTITIES
    for r in table:
        value = float(r['value'])
        assert math.isfinite(value) and (value >= 0 if r['quantity'].endswith('_std') else value > 0), r
    targets = {r['quantity']: r['target'] for r in table if r['target']}
    assert targets == {'desd_to_supervised_step_ratio': '<= 1.5',
                       'real_loading_to_in_memory_throughput_ratio': '>= 0.9'}
    assert table[3]['unit'] == 'MiB (process peak RSS)'

    report = (out / 'benchmark.md').read_text()
    for expected in ('PlainConvUNet', '| patch | 16 x 16 x 16 |', '| augmentation workers | 0 (in-process) |',
                     '| batch | 2 x 1 channel(s)', 'torch', '| device | CPU'):
        assert expected in report, expected
    assert (out / 'benchmark.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    # nnU-Net's trainer kept its log folder out of nnUNet_results
    assert sorted(p.name for p in (tmp_path / 'results' / name).iterdir()) == ['desd_benchmark']


def test_benchmark_reports_user_errors_like_desd_pretrain(tmp_path):
    env = nnunet_env(tmp_path)
    proc = run_command(['desd_pretrain_benchmark', '-d', '999', *TINY], env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith('desd_pretrain_benchmark: error: dataset') and 'Traceback' not in proc.stderr


def test_default_out_folder_needs_nnunet_results(monkeypatch):
    monkeypatch.delenv('nnUNet_results', raising=False)
    with pytest.raises(DesdError, match='--out'):
        timing.default_out_folder('Dataset911_Synthetic')


def test_activation_memory_by_hand():
    a = torch.randn(1024, requires_grad=True)
    # exp saves its output b (4 KiB), sin saves its input b again (same storage, counted once)
    assert timing.activation_mib(lambda: a.exp().sin().sum().backward()) == pytest.approx(4096 / 2 ** 20)
    w = torch.nn.Parameter(torch.randn(256))
    x = torch.randn(256, requires_grad=True)
    # mul keeps x (1 KiB) for w's gradient and w for x's; the parameter is excluded
    assert timing.activation_mib(lambda: (x * w).sum().backward(), [w]) == pytest.approx(1024 / 2 ** 20)
    assert timing.activation_mib(lambda: (x * w).sum().backward()) == pytest.approx(2048 / 2 ** 20)


def test_cads_comparison_ratios_from_hand_made_numbers():
    phases = {'desd': Phase('desd', 'DeSD', [0.4, 0.6], 900.0), 'cads': Phase('cads', 'CADS', [0.2, 0.2], 600.0)}
    cpu = cads.MethodComparison({'dataset': 'D'}, 'process peak RSS', phases, {'desd': 100.0, 'cads': 30.0})
    assert cpu.step_ratio() == pytest.approx(0.4) and cpu.memory_ratio() == pytest.approx(0.3)
    text = cads.comparison_markdown(cpu)
    assert '| CADS step / DeSD step | 0.400 | <= 0.5 | yes |' in text
    assert '| CADS memory / DeSD memory (activations) | 0.300 | <= 0.6 | yes |' in text
    gpu = cads.MethodComparison({'dataset': 'D'}, 'CUDA max allocated', phases, {'desd': 100.0, 'cads': 30.0})
    assert gpu.memory_ratio() == pytest.approx(600 / 900)
    assert '| CADS memory / DeSD memory (CUDA peak) | 0.667 | <= 0.6 | no |' in cads.comparison_markdown(gpu)


@pytest.mark.e2e
def test_cads_benchmark_command_on_cpu(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 912, n_cases=2, shape=(32, 32, 32))
    proc = run_command(['desd_pretrain_benchmark', '-d', '912', '-m', 'cads', *TINY, '--patch-size', '32', '32', '32',
                        '--warmup-iters', '1', '--measure-iters', '2'], env, timeout=300)
    assert '| CADS step / DeSD step |' in proc.stdout
    out = tmp_path / 'results' / name / 'desd_benchmark'
    with open(out / 'cads_vs_desd.csv') as f:
        values = {r['quantity']: float(r['value']) for r in csv.DictReader(f)}
    # the ratios' arithmetic is checked on hand-made numbers above; here what the measurement must show:
    # 4x fewer 3D voxels shrink the activations a lot, whatever the machine's speed, but not to nothing (the DRR
    # path and the heads still keep theirs), and both methods take a measurable time per step
    assert 0.05 < values['cads_to_desd_memory_ratio'] < 0.6
    assert values['cads_seconds_per_iteration'] > 0 and values['desd_seconds_per_iteration'] > 0
    assert (out / 'cads_vs_desd.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert '32 x 16 x 16' in (out / 'cads_vs_desd.md').read_text()
