"""scripts/gpu_check.sh and its report helper, on CPU: the refusals, --dry-run, the step bookkeeping (with fake
commands on PATH instead of the GPU ones), the Markdown, the ``cuda`` marker's skip, and the host synchronisation
count's refusal without CUDA and its counting of warnings.

The 24 GiB batch is extrapolated linearly: floor(24 GiB * measured batch / measured peak), e.g. a 6 GiB peak at
batch 2 gives floor(24 * 2 / 6) = 8.
"""
import json
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

from nnunetv2_desd.benchmarks.gpu_check import Step, largest_batch, read_steps, report_markdown
from nnunetv2_desd.benchmarks.host_syncs import SYNC_WARNING, count_warnings

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'scripts' / 'gpu_check.sh'
BIN = Path(sys.executable).parent


def _run(args, env=None, timeout=60):
    env = {**os.environ, **(env or {})}
    return subprocess.run(['bash', str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def test_script_syntax():
    assert subprocess.run(['bash', '-n', str(SCRIPT)]).returncode == 0


def test_wrong_calls_exit_2_with_one_line(tmp_path):
    for args in ([], [tmp_path / 'a', tmp_path / 'b'], ['--dry-run'], ['--bogus', tmp_path / 'a']):
        proc = _run(args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and 'gpu_check.sh: error:' in proc.stderr, args
        assert proc.stdout == ''
    assert 'missing OUT_DIR' in _run([]).stderr
    proc = _run([tmp_path / 'out'], env={'GPU_CHECK_STEP_TIMEOUT': 'soon'})
    assert proc.returncode == 2 and 'GPU_CHECK_STEP_TIMEOUT' in proc.stderr
    assert not any(tmp_path.iterdir())


def test_no_cuda_device_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / 'out'
    out.mkdir()
    proc = _run([out], env={'CUDA_VISIBLE_DEVICES': '', 'PATH': f'{BIN}{os.pathsep}{os.environ["PATH"]}'})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count('\n') == 1 and 'no CUDA device is visible' in proc.stderr
    assert proc.stdout == '' and not any(out.iterdir())


def test_dry_run_prints_the_plan(tmp_path):
    out = tmp_path / 'out'
    proc = _run(['--dry-run', out], env={'PATH': f'{BIN}{os.pathsep}{os.environ["PATH"]}'})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert not out.exists()
    assert f'nnUNet_results={out}/work/nnUNet_results' in lines[0]
    assert 'bash scripts/install.sh' not in lines  # desd_demo is on PATH
    assert 'python -m pytest tests -m cuda -q -p no:cacheprovider -rs' in lines
    bench = [line for line in lines if line.startswith('desd_pretrain_benchmark ')]
    assert len(bench) == 3 and all('--batch-size 2 --warmup-iters 3 --measure-iters 10 --out' in b for b in bench)
    assert bench[0].startswith('desd_pretrain_benchmark -d 500 --plans-from 501 -device cuda ')
    assert bench[1].startswith('desd_pretrain_benchmark -d 500 -m cads --plans-from 501 -device cuda ')
    assert bench[2].startswith('desd_pretrain_benchmark -d 500 -m refs --reference 501 --matching fish '
                               '--plans-from 501 -device cuda --amp on ')
    assert bench[2].endswith(f'--out {out}/benchmark/refs')
    pretrain = [line for line in lines if line.startswith('desd_pretrain ')]
    assert pretrain == ['desd_pretrain -d 500 --plans-from 501 -device cuda --epochs 2 --iters-per-epoch 20 '
                        '--batch-size 2 --overwrite',
                        'desd_pretrain -d 500 -m refs --reference 501 --plans-from 501 -device cuda --epochs 1 '
                        '--iters-per-epoch 5 --batch-size 2 --overwrite']
    syncs = [line for line in lines if line.startswith('python -m nnunetv2_desd.cli.host_syncs ')]
    counted = '-device cuda --batch-size 2 --num-workers 2 --warmup-steps 3 --steps 5 --out'
    assert syncs == [f'python -m nnunetv2_desd.cli.host_syncs -d 500 --plans-from 501 {counted} '
                     f'{out}/benchmark/syncs_desd.json',
                     f'python -m nnunetv2_desd.cli.host_syncs -d 500 -m refs --reference 501 --plans-from 501 '
                     f'{counted} {out}/benchmark/syncs_refs.json']
    assert lines.index(pretrain[0]) < lines.index(pretrain[1]) < lines.index(syncs[0])  # the export's path first
    train = next(line for line in lines if line.startswith('nnUNetv2_train '))
    assert train.startswith('nnUNetv2_train 501 3d_fullres 0 -tr nnUNetTrainerDeSDTiny -device cuda '
                            '-pretrained_weights ') and train.endswith('pretrained_export.pth')
    assert any(line.startswith('nnUNetv2_predict ') and '-tr nnUNetTrainerDeSDTiny -f 0 -device cuda' in line
               for line in lines)
    ddp = next(line for line in lines if 'torchrun' in line)
    assert 'torchrun --nproc_per_node 1' in ddp and '--epochs 1 --iters-per-epoch 5' in ddp
    assert ddp.endswith(' --overwrite')
    assert f'nnUNet_results={out}/work/nnUNet_results_torchrun' in ddp
    assert lines[-1].startswith('python -m nnunetv2_desd.cli.gpu_check_report ')
    assert all(f'{out}/benchmark/refs/refs_vs_desd.{ext}' in lines[-1] for ext in ('md', 'csv'))
    assert lines[-1].endswith(f'--syncs {out}/benchmark/syncs_desd.json {out}/benchmark/syncs_refs.json')
    # without desd_demo on PATH it would install first
    proc = _run(['--dry-run', out], env={'PATH': '/usr/bin:/bin'})
    assert proc.returncode == 0 and proc.stdout.splitlines()[1] == 'bash scripts/install.sh'


def _fake(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text('#!/usr/bin/env bash\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


FAKE_BENCHMARK = '''out=; method=desd; prev=
for a in "$@"; do [ "$prev" = --out ] && out="$a"; [ "$prev" = -m ] && method="$a"; prev="$a"; done
mkdir -p "$out"
if [ "$method" = cads ]; then n=cads_vs_desd; rows='cads_peak_memory,3072.0,MiB (CUDA max allocated),'
elif [ "$method" = refs ]; then n=refs_vs_desd; rows='fish_peak_memory,12288.0,MiB (CUDA max allocated),'
else n=benchmark; rows='desd_in_memory_peak_memory,6144.0,MiB (CUDA max allocated),'; fi
printf '## fake %s table\\n\\n| a | b |\\n|---|---|\\n| 1 | 2 |\\n' "$n" > "$out/$n.md"
printf 'quantity,value,unit,target\\n%s\\n' "$rows" > "$out/$n.csv"
'''


def test_run_with_fake_commands_records_every_step(tmp_path):
    """The real (non-dry) path with the GPU commands replaced by fakes: one failing step (pytest) is recorded, the
    others still run, the export path desd_pretrain prints reaches nnUNetv2_train, the report is written, exit 1."""
    fakes = tmp_path / 'bin'
    fakes.mkdir()
    _fake(fakes, 'python', f'''case "$1 $2" in
  "-m nnunetv2_desd.cli.gpu_check_report") exec {sys.executable} "$@" ;;
  "-m pytest") echo "1 failed"; exit 3 ;;
  "-m nnunetv2_desd.cli.host_syncs") shift 2; out=; method=desd; prev=
    for a in "$@"; do [ "$prev" = --out ] && out="$a"; [ "$prev" = -m ] && method="$a"; prev="$a"; done
    [ "$method" = refs ] && counts='[5, 4, 6, 5, 5]' || counts='[1, 1, 2, 1, 1]'
    echo "{{\\"method\\": \\"$method\\", \\"syncs_per_step\\": $counts}}" > "$out"; exit 0 ;;
esac
echo "fake python $*"
''')
    for name in ('desd_demo', 'nnUNetv2_predict', 'torchrun'):
        _fake(fakes, name, f'echo "fake {name} $*"\n')
    _fake(fakes, 'desd_trainer_path', 'echo "export nnUNet_extTrainer=/nowhere"\n')
    _fake(fakes, 'nvidia-smi', 'echo "Fake GPU 9000, 24564 MiB, 1.0"\n')
    _fake(fakes, 'desd_pretrain', 'echo "export: /fake/export.pth"\n')
    _fake(fakes, 'nnUNetv2_train', 'echo "fake train $*"\n')
    _fake(fakes, 'desd_pretrain_benchmark', FAKE_BENCHMARK)
    out = tmp_path / 'out'
    proc = _run([out], env={'PATH': f'{fakes}:/usr/bin:/bin', 'GPU_CHECK_STEP_TIMEOUT': '30'})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert '[failed] pytest_cuda: exit 3' in proc.stdout
    steps = read_steps(str(out / 'logs' / 'steps.tsv'))
    assert [s.name for s in steps] == ['prepare', 'pytest_cuda', 'benchmark_desd', 'benchmark_cads', 'benchmark_refs',
                                       'pretrain', 'pretrain_refs', 'syncs_desd', 'syncs_refs', 'finetune',
                                       'predict_inputs', 'predict', 'torchrun']
    assert [s.exit_code for s in steps] == [0, 3] + [0] * 11
    assert all(Path(s.log).is_file() and Path(s.log).parent == out / 'logs' for s in steps)
    finetune = Path(next(s.log for s in steps if s.name == 'finetune')).read_text()
    assert 'fake train 501 3d_fullres 0 -tr nnUNetTrainerDeSDTiny -device cuda -pretrained_weights /fake/export.pth' \
        in finetune
    report = (out / 'gpu_check.md').read_text()
    assert 'Fake GPU 9000' in report and 'Result: 1 of 13 steps failed: pytest_cuda.' in report
    assert '| pytest_cuda | 3 |' in report and '| torchrun | 0 |' in report
    assert '### fake benchmark table' in report and '### fake cads_vs_desd table' in report
    assert '### fake refs_vs_desd table' in report
    assert '| desd_in_memory_peak_memory | 6,144 | 8 |' in report   # floor(24 * 2 / 6)
    assert '| cads_peak_memory | 3,072 | 16 |' in report          # floor(24 * 2 / 3)
    assert '| fish_peak_memory | 12,288 | 4 |' in report          # floor(24 * 2 / 12)
    assert '| benchmark/syncs_desd.json | desd | 5 | 1.20 | 2 |' in report   # 6 / 5
    assert '| benchmark/syncs_refs.json | refs | 5 | 5.00 | 6 |' in report   # 25 / 5


def test_largest_batch_by_hand():
    assert largest_batch(6 * 1024, 2) == 8           # floor(24 / 6 * 2)
    assert largest_batch(5000, 2) == 9               # floor(24576 * 2 / 5000) = floor(9.83)
    assert largest_batch(30 * 1024, 4) == 3          # floor(24 * 4 / 30) = floor(3.2)
    assert largest_batch(1024, 1, budget_gib=80) == 80


def test_report_markdown(tmp_path):
    (tmp_path / 'logs').mkdir()
    csv_file = tmp_path / 'benchmark.csv'
    csv_file.write_text('quantity,value,unit,target\n'
                        'desd_in_memory_seconds_per_iteration,0.25,s,\n'
                        'desd_in_memory_peak_memory,6144.0,MiB (CUDA max allocated),\n'
                        'supervised_peak_memory,4915.2,MiB (CUDA max allocated),\n'
                        'cpu_peak_memory,100.0,MiB (process peak RSS),\n'
                        'desd_to_supervised_step_ratio,1.2,,<= 1.5\n')
    md_file = tmp_path / 'benchmark.md'
    md_file.write_text('## DeSD pre-training benchmark: X\n\n| ratio | value |\n|---|---|\n| DeSD / sup | 1.2 |\n')
    steps = [Step('prepare', 'python -c x', 0, 12.34, str(tmp_path / 'logs' / '01_prepare.log')),
             Step('benchmark_desd', 'desd_pretrain_benchmark -d 500 | tee', 1, 61.0,
                  str(tmp_path / 'logs' / '02_benchmark_desd.log'))]
    text = report_markdown(steps, [str(md_file), str(tmp_path / 'missing.md')],
                           [str(csv_file), str(tmp_path / 'missing.csv')], batch=2,
                           gpu_info='NVIDIA H200, 143771 MiB', relative_to=str(tmp_path))
    assert text.startswith('# GPU check\n') and 'NVIDIA H200, 143771 MiB' in text
    assert 'Result: 1 of 2 steps failed: benchmark_desd.' in text
    assert '| prepare | 0 | 12.3 | logs/01_prepare.log |' in text
    assert '| benchmark_desd | 1 | 61.0 | logs/02_benchmark_desd.log |' in text
    assert 'benchmark_desd: desd_pretrain_benchmark -d 500 | tee' in text  # commands in a code block, unescaped
    assert '### DeSD pre-training benchmark: X' in text and '| DeSD / sup | 1.2 |' in text
    assert 'From `missing.md`:\n\n_not written' in text
    assert '## Largest batch in 24 GiB (extrapolated)' in text
    assert '| benchmark.csv | desd_in_memory_peak_memory | 6,144 | 8 |' in text       # floor(24 * 2 / 6)
    assert '| benchmark.csv | supervised_peak_memory | 4,915 | 10 |' in text         # floor(24 * 2 / 4.8)
    assert '| benchmark.csv | cpu_peak_memory | 100 | n/a' in text
    assert 'seconds_per_iteration' not in text.split('(extrapolated)')[-1]
    assert '| missing.csv | _not written_ |' in text
    assert 'Host synchronisations' not in text  # no JSON given: no section
    ok = report_markdown(steps[:1], batch=None)
    assert 'Result: all 1 steps exited 0.' in ok and 'no extrapolation' in ok


def test_report_host_syncs_section(tmp_path):
    sources = [{'where': 'torch/amp/grad_scaler.py:462', 'code': 'if not sum(v.item() for v in found_inf)',
                'message': SYNC_WARNING, 'sync': True, 'count': 5},
               {'where': 'x.py:1', 'code': 'warnings.warn(...)', 'message': 'other', 'sync': False, 'count': 2}]
    (tmp_path / 'desd.json').write_text(json.dumps({'method': 'desd', 'matching': None,
                                                    'syncs_per_step': [2, 3, 2, 4, 2], 'sources': sources}))
    (tmp_path / 'refs.json').write_text(json.dumps({'method': 'refs', 'matching': 'fish',
                                                    'syncs_per_step': [5, 5, 6], 'sources': []}))
    (tmp_path / 'broken.json').write_text('{"method": "desd"')
    steps = [Step('syncs_desd', 'python -m x', 0, 30.0, str(tmp_path / 'logs' / '01_syncs_desd.log'))]
    paths = [str(tmp_path / n) for n in ('desd.json', 'refs.json', 'missing.json', 'broken.json')]
    text = report_markdown(steps, syncs=paths, relative_to=str(tmp_path))
    section = text.split('## Host synchronisations per step\n', 1)[1]
    assert '| json | method | steps | mean syncs / step | max syncs / step |' in section
    assert '| desd.json | desd | 5 | 2.60 | 4 |' in section        # (2 + 3 + 2 + 4 + 2) / 5 = 13 / 5
    assert '| refs.json | refs (fish) | 3 | 5.33 | 6 |' in section  # 16 / 3
    assert '| missing.json | _not written_ | | | |' in section
    assert '| broken.json | _unreadable: ' in section
    assert '- desd: 5 x `torch/amp/grad_scaler.py:462`: `if not sum(v.item() for v in found_inf)`' in section
    assert 'x.py:1' not in section  # a warning that is no synchronisation


def _host_syncs(args, env=None):
    return subprocess.run([sys.executable, '-m', 'nnunetv2_desd.cli.host_syncs', *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, timeout=120, env={**os.environ, **(env or {})})


def test_host_syncs_needs_cuda_and_exits_2_with_one_line(tmp_path):
    out = tmp_path / 'syncs.json'
    for args, env, says in ((['-device', 'cpu'], None, '-device cpu:'),
                            ([], {'CUDA_VISIBLE_DEVICES': ''}, 'no CUDA device is visible')):
        proc = _host_syncs(['-d', '500', *args, '--steps', '2', '--out', out], env)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stderr.count('\n') == 1 and 'host_syncs: error:' in proc.stderr, proc.stderr
        assert says in proc.stderr and 'CUDA is needed' in proc.stderr
        assert proc.stdout == '' and not out.exists()
    proc = _host_syncs(['-d', '500', '--steps', '0', '--out', out])
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1 and '--steps 0' in proc.stderr


def test_count_warnings_per_call_and_sources():
    def syncs(n):
        def call():
            for _ in range(n):
                warnings.warn(SYNC_WARNING + ' (Triggered internally at x.cpp:1.)\nmore')
            warnings.warn('something else', DeprecationWarning)  # recorded as a source, not counted
        return call
    per_call, sources = count_warnings([syncs(2), syncs(0), syncs(3)])
    assert per_call == [2, 0, 3]
    assert [(s['count'], s['sync']) for s in sources] == [(5, True), (3, False)]  # most frequent first
    sync = sources[0]
    assert sync['message'] == SYNC_WARNING + ' (Triggered internally at x.cpp:1.)'  # the first line only
    assert sync['where'].endswith('test_gpu_check.py:' + sync['where'].rsplit(':', 1)[1])
    assert sync['code'].startswith('warnings.warn(SYNC_WARNING')
    assert count_warnings([])[0] == []


def test_cuda_marked_test_is_skipped_without_a_device():
    proc = subprocess.run([sys.executable, '-m', 'pytest', 'tests/test_masking.py', '-m', 'cuda', '-q', '-rs',
                           '-p', 'no:cacheprovider'], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert '1 skipped' in proc.stdout and 'deselected' in proc.stdout
    assert 'needs a CUDA device' in proc.stdout
