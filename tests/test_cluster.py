"""Runs on a cluster: SIGTERM/SIGUSR1 stop at a step with a checkpoint (exit 75) and --c continues mid-epoch as if
never stopped; torchrun over two nodes; seeds per rank and per loader worker; every module on the device (ReFs's
decoder); a resume with another world size keeps its peak lr; schedule changes are refused unless allowed; the raw
dataset.json is checked field by field."""
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import BIN, TESTS, TINY, nnunet_env, run_command, with_results
from nnunetv2_desd.data.sources import write_synthetic_dataset
from test_distributed import _free_port

pytestmark = pytest.mark.e2e

RUN = 'desd__nnUNetPlans__3d_fullres'
EPOCHS, ITERS = 2, 8
LR, MIN_LR, WARMUP_EPOCHS, BATCH = 0.3, 1e-6, 1, 2  # BATCH: TINY's --batch-size


def _args(epochs: int = EPOCHS) -> list:
    return ['--epochs', str(epochs), '--iters-per-epoch', str(ITERS), '--lr', str(LR), '--min-lr', str(MIN_LR),
            '--warmup-epochs', str(WARMUP_EPOCHS), *TINY]


ARGS = _args()
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL, written out here rather than imported


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def _log_text(folder) -> str:
    return '\n'.join(p.read_text() for p in sorted(folder.glob('training_log_*.txt')))


@pytest.fixture(scope='module')
def pool(pool_900, tmp_path_factory):
    """Dataset 900 (2 cases, 24^3) prepared once (conftest's pool_900); each run writes into its own nnUNet_results
    below this module's root."""
    _, env, name = pool_900
    return tmp_path_factory.mktemp('cluster'), env, name


@pytest.fixture(scope='module')
def reference_run(pool):
    """The uninterrupted run."""
    root, env, name = pool
    run_command(['desd_pretrain', '-d', '900', *ARGS], with_results(env, root / 'reference'), timeout=900)
    return root / 'reference' / name / RUN


def _interrupt(env: dict, sig: int, epoch: int, timeout: float = 600):
    """Starts desd_pretrain and sends ``sig`` once the progress bar of ``epoch`` shows a finished step (so inside
    training, mid-epoch); returns (exit code, stderr)."""
    proc = subprocess.Popen([str(BIN / 'desd_pretrain'), '-d', '900', *ARGS], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    chunks, seen = [], threading.Event()
    bar = re.compile(rf'epoch {epoch}/{EPOCHS}:[^\r\n]*\| *([1-9]\d*)/{ITERS} ')

    def read():
        for chunk in iter(lambda: proc.stderr.read(64), ''):
            chunks.append(chunk)
            if not seen.is_set() and bar.search(''.join(chunks)[-4000:]):
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while not seen.wait(0.05):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            reader.join(10)
            pytest.fail(f'no step of epoch {epoch} seen before the run ended (exit {proc.returncode}):\n'
                        + ''.join(chunks)[-3000:])
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(30)
    return proc.returncode, ''.join(chunks)


def _interrupted_run(pool, label: str, sig: int, epoch: int):
    root, env, name = pool
    rc, stderr = _interrupt(with_results(env, root / label), sig, epoch)
    folder = root / label / name / RUN
    return {'rc': rc, 'stderr': stderr, 'folder': folder, 'results': root / label,
            'step': _load(folder / 'checkpoint_latest.pth')['step'] if (folder / 'checkpoint_latest.pth').exists()
            else None}


@pytest.fixture(scope='module')
def sigterm_run(pool):
    """A run stopped by SIGTERM in epoch 1; never modified (tests continue copies of it)."""
    return _interrupted_run(pool, 'sigterm', signal.SIGTERM, 1)


def _copy(run: dict, label: str):
    target = run['results'].parent / label
    shutil.copytree(run['results'], target)
    return target, target / run['folder'].relative_to(run['results'])


def _check_interrupted(run: dict, signal_name: str, epoch: int) -> None:
    assert run['rc'] == EXIT_INTERRUPTED, f'exit {run["rc"]}, expected 75:\n{run["stderr"][-3000:]}'
    step = run['step']
    assert step is not None and (step - 1) // ITERS == epoch - 1 and step % ITERS != 0, \
        f'the checkpoint must be at a step inside epoch {epoch}, not {step}'
    lines = [line for line in run['stderr'].replace('\r', '\n').splitlines() if 'desd_pretrain:' in line]
    assert len(lines) == 1 and lines[0].startswith('desd_pretrain: interrupted: '), lines
    assert f'{signal_name} received' in lines[0] and f'at step {step} ' in lines[0]
    assert 'Traceback' not in run['stderr']
    assert not (run['folder'] / 'checkpoint_final.pth').exists()
    assert not (run['folder'] / 'pretrained_export.pth').exists()
    state = _load(run['folder'] / 'checkpoint_latest.pth')
    # the epoch's partial sums: one count per step taken in this epoch
    assert state['epoch_sums']['sums'][1, state['epoch_sums']['names'].index('loss')].item() == step % ITERS
    assert f'{signal_name} received: checkpoint_latest.pth written at step {step}' in _log_text(run['folder'])


def _assert_same_as_reference(folder, reference) -> None:
    final_a, final_b = _load(reference / 'checkpoint_final.pth'), _load(folder / 'checkpoint_final.pth')
    assert final_a['step'] == final_b['step'] == EPOCHS * ITERS
    for part in ('teacher', 'network', 'student_heads', 'loss'):
        assert final_a[part].keys() == final_b[part].keys()
        for k, v in final_a[part].items():
            assert torch.equal(v, final_b[part][k]), f'{part}.{k} differs after the interrupted run was continued'
    # the epoch means include the steps before the stop (its partial sums came back from the checkpoint)
    for key, series in final_a['progress'].items():
        if key != 'epoch_time':
            assert final_b['progress'][key] == series, key
    assert _load(reference / 'pretrained_export.pth')['desd_export']['content_sha256'] == \
        _load(folder / 'pretrained_export.pth')['desd_export']['content_sha256']


def test_sigterm_mid_epoch_then_continue_equals_uninterrupted_run(pool, sigterm_run, reference_run):
    _check_interrupted(sigterm_run, 'SIGTERM', 1)
    results, folder = _copy(sigterm_run, 'sigterm_continued')
    proc = run_command(['desd_pretrain', '-d', '900', '--c', *ARGS], with_results(pool[1], results), timeout=900)
    assert f'continuing from {folder / "checkpoint_latest.pth"} at step {sigterm_run["step"]} (epoch 1)' in proc.stdout
    _assert_same_as_reference(folder, reference_run)


def test_sigusr1_mid_epoch_then_continue_equals_uninterrupted_run(pool, reference_run):
    run = _interrupted_run(pool, 'sigusr1', signal.SIGUSR1, 2)  # in the second epoch this time
    _check_interrupted(run, 'SIGUSR1', 2)
    run_command(['desd_pretrain', '-d', '900', '--c', *ARGS], with_results(pool[1], run['results']), timeout=900)
    _assert_same_as_reference(run['folder'], reference_run)


def _peak_lr_by_hand(world_size: int) -> float:
    return LR * BATCH * world_size / 256


def _lr_by_hand(step: int, peak: float) -> float:
    """Linear warm-up 0 -> peak over WARMUP_EPOCHS epochs, then half a cosine to MIN_LR at the last step."""
    warmup, total = WARMUP_EPOCHS * ITERS, EPOCHS * ITERS
    if step < warmup:
        return peak * step / warmup
    return MIN_LR + (peak - MIN_LR) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_continue_with_another_world_size_keeps_the_peak_lr(pool, sigterm_run):
    """A run of 1 process stopped in epoch 1, continued by torchrun with 2 (gloo): the lr follows the 1-process
    schedule (peak 0.3 * 2 / 256), not the doubled global batch's."""
    assert sigterm_run['rc'] == EXIT_INTERRUPTED and sigterm_run['step'] % ITERS
    results, folder = _copy(sigterm_run, 'world2')
    env = dict(with_results(pool[1], results), OMP_NUM_THREADS='1')
    run_command(['torchrun', '--nproc_per_node', '2', '--master_port', str(_free_port()), BIN / 'desd_pretrain',
                 '-d', '900', '--c', *ARGS], env, timeout=900)
    log = _log_text(folder)
    one, two = _peak_lr_by_hand(1), _peak_lr_by_hand(2)
    assert (f'1 process(es) before, 2 now: the global batch is 4 instead of 2; the run keeps its peak lr '
            f'{one:.3g}') in log
    assert 'batch 2 x 2 process(es)' in log
    final = _load(folder / 'checkpoint_final.pth')
    assert final['step'] == EPOCHS * ITERS and final['world_size'] == 2 and final['peak_lr'] == pytest.approx(one)
    # the last step (step total - 1) ran at the 1-process schedule's lr
    last = _lr_by_hand(EPOCHS * ITERS - 1, one)
    assert last != pytest.approx(_lr_by_hand(EPOCHS * ITERS - 1, two))
    for group in final['optimizer']['param_groups']:
        assert group['lr'] == pytest.approx(last, rel=1e-9)
    # epoch 2's line logs the lr at its first step: the warm-up's end, the kept peak
    epoch2 = next(line for line in log.splitlines() if f'epoch 2/{EPOCHS}:' in line)
    assert f'lr {_lr_by_hand(ITERS, one):.4g},' in epoch2 and f'{two:.4g}' not in epoch2


def test_schedule_change_is_refused_unless_allowed(pool, sigterm_run):
    assert sigterm_run['rc'] == EXIT_INTERRUPTED and sigterm_run['step'] % ITERS
    results, folder = _copy(sigterm_run, 'schedule')
    env = with_results(pool[1], results)
    before = (folder / 'checkpoint_latest.pth').read_bytes()
    proc = run_command(['desd_pretrain', '-d', '900', '--c', *_args(3)], env, check=False, timeout=900)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert lines[-1].startswith('desd_pretrain: error: ') and 'Traceback' not in proc.stderr
    assert '--epochs 2 -> 3' in lines[-1] and '--allow-schedule-change' in lines[-1]
    assert (folder / 'checkpoint_latest.pth').read_bytes() == before  # nothing written

    # allowed: continues to the end of the new schedule (1 epoch: a short test), and says so
    proc = run_command(['desd_pretrain', '-d', '900', '--c', '--allow-schedule-change', *_args(1)], env, timeout=900)
    assert 'schedule changed (--epochs 2 -> 1), allowed by --allow-schedule-change' in proc.stdout
    assert 'schedule changed (--epochs 2 -> 1), allowed by --allow-schedule-change' in _log_text(folder)
    assert _load(folder / 'checkpoint_final.pth')['step'] == ITERS


def test_two_nodes_on_localhost(tmp_path):
    """Two torchrun launchers (--nnodes 2, c10d rendezvous) on one unprepared dataset: global rank 0 prepares
    while the other waits for its marker, then one set of outputs is written."""
    env = dict(nnunet_env(tmp_path), OMP_NUM_THREADS='1')
    name = write_synthetic_dataset(env['nnUNet_raw'], 901, n_cases=2, shape=(24, 24, 24))
    port = _free_port()
    launchers = []
    for node in (0, 1):
        command = [str(BIN / 'torchrun'), '--nnodes', '2', '--node_rank', str(node), '--nproc_per_node', '1',
                   '--rdzv-backend', 'c10d', '--rdzv-endpoint', f'127.0.0.1:{port}', '--rdzv-id', f'cluster{port}',
                   '--rdzv-conf', f'is_host={int(node == 0)}', str(BIN / 'desd_pretrain'), '-d', '901',
                   '--epochs', '1', '--iters-per-epoch', '2', *TINY]
        launchers.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True))
    outputs = []
    try:
        for p in launchers:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in launchers:
            if p.poll() is None:
                p.kill()
    for p, out in zip(launchers, outputs):
        assert p.returncode == 0, out[-4000:]
    folder = tmp_path / 'results' / name / RUN
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith('training_log_')) == \
        ['checkpoint_final.pth', 'checkpoint_latest.pth', 'pretrained_export.pth', 'progress.png']
    logs = list(folder.glob('training_log_*.txt'))
    assert len(logs) == 1 and 'batch 2 x 2 process(es)' in logs[0].read_text()
    assert sum('export written' in out for out in outputs) == 1  # one writer
    assert _load(folder / 'checkpoint_final.pth')['world_size'] == 2
    # rank 0's marker is gone, and the data was prepared once
    assert not any((tmp_path / 'preprocessed' / name / '.desd_ready').iterdir())
    assert len(list((tmp_path / 'preprocessed' / name / 'nnUNetPlans_3d_fullres').glob('*.b2nd'))) == 4


def _helper(function: str, env: dict, *args, timeout: int = 600):
    proc = subprocess.run([sys.executable, str(TESTS / 'cluster_helpers.py'), function, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=str(TESTS))
    assert proc.returncode == 0, f'{function} exited {proc.returncode}:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'


def test_augmentations_differ_per_rank_and_worker_and_repeat_per_seed(tmp_path):
    """One case of 24^3 = the loader's region (1.5 x the 16^3 patch): every crop location is the same, so batches
    differ only by their augmentation draws (torch, in the workers)."""
    env = nnunet_env(tmp_path)
    write_synthetic_dataset(env['nnUNet_raw'], 903, n_cases=1, shape=(24, 24, 24))
    run_command(['desd_pretrain', '-d', '903', '--preprocess-only', *TINY], env, timeout=900)
    out = tmp_path / 'seeds.pt'
    _helper('seeds_per_rank_and_worker', env, '903', tmp_path / 'run', out)
    r = torch.load(out, weights_only=False)
    ranks = r['ranks']
    # the networks start alike on every rank; the draws after that are the rank's own
    for k, v in ranks[0]['network'].items():
        assert torch.equal(v, ranks[1]['network'][k]), k
    assert not torch.equal(ranks[0]['torch_draw'], ranks[1]['torch_draw'])
    assert not (ranks[0]['numpy_draw'] == ranks[1]['numpy_draw']).all()
    seeds = [ranks[rank]['seeds'][w] for rank in (0, 1) for w in (0, 1)]
    assert len(set(seeds)) == 4 and not set(seeds) & set(ranks[0]['seeds_at_7'] + ranks[1]['seeds_at_7'])

    first = r['first']
    for (a, b) in (((0, 0), (0, 1)), ((1, 0), (1, 1)), ((0, 0), (1, 0)), ((0, 1), (1, 1))):
        assert not torch.equal(first[a][0], first[b][0]), f'worker {a} and worker {b} drew the same batch'
    assert torch.equal(r['again'], first[(0, 0)][0])  # the same seed: the same first batch (a resume repeats it)
    # a loader with rank 0's two workers yields each worker's own stream, in order (batches interleave at random)
    streams = {w: [t for t in first[(0, w)]] for w in (0, 1)}
    taken = {0: 0, 1: 0}
    for batch in r['two_workers']:
        owners = [w for w in (0, 1) if taken[w] < 3 and torch.equal(batch, streams[w][taken[w]])]
        assert len(owners) == 1, 'a batch of the two-worker loader is not the next batch of exactly one worker'
        taken[owners[0]] += 1


def test_refs_cast_to_float64_steps(refs_data, tmp_path):
    """``Pretrainer.to`` moves every module the engine runs: cast to float64 (the CPU stand-in for a move to CUDA),
    one ReFs step on float64 views and reference runs, and the decoder (trained by the reference task) is float64
    and has moved. The pool (920) and reference (921) come prepared for -m refs (conftest's refs_data)."""
    env = with_results(refs_data, tmp_path / 'results')
    out = tmp_path / 'refs.pt'
    _helper('refs_float64_step', env, '920', '921', tmp_path / 'run', out)
    r = torch.load(out, weights_only=False)
    assert r['error'] is None, r['error']
    assert r['step'] == 1 and r['loss'].dtype == torch.float64 and torch.isfinite(r['loss'])
    for name, dtypes in r['dtypes'].items():
        assert dtypes == {'torch.float64'}, f'{name} holds {dtypes}'
    moved = [k for k, v in r['decoder_after'].items() if v.is_floating_point() and
             not torch.equal(v.float(), r['decoder_before'][k])]
    assert moved, 'the reference task must train the decoder'


GOOD_JSON = {'channel_names': {'0': 'CT'}, 'file_ending': '.nii.gz', 'numTraining': 1}


@pytest.mark.parametrize('content, field', [
    ('{"channel_names": {"0": "CT"}, "file_ending": ".nii.gz",', None),
    (json.dumps({**GOOD_JSON, 'channel_names': ['CT']}), 'channel_names'),
    (json.dumps({**GOOD_JSON, 'file_ending': 3}), 'file_ending'),
    (json.dumps({**GOOD_JSON, 'labels': {'background': 0, 'body': 'one'}}), 'labels'),
], ids=['malformed', 'channel_names-list', 'file_ending-number', 'labels-string'])
def test_bad_dataset_json_is_one_line(tmp_path, content, field):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 904, n_cases=1, shape=(24, 24, 24))
    dataset_json = tmp_path / 'raw' / name / 'dataset.json'
    dataset_json.write_text(content)
    proc = run_command(['desd_pretrain', '-d', '904', '--preprocess-only', '-device', 'cpu'], env, check=False,
                       timeout=600)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('desd_pretrain: error: ') and str(dataset_json) in lines[0], lines
    assert 'Traceback' not in proc.stderr + proc.stdout
    if field is None:
        assert 'not valid JSON' in lines[0]
    else:
        assert f'"{field}"' in lines[0]
    assert not (tmp_path / 'preprocessed' / name).exists() or \
        not any((tmp_path / 'preprocessed' / name).glob('nnUNetPlans*'))
