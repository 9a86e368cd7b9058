"""Preparation through the real commands: killed and resumed, incremental, a dead worker, two writers at once, parts.

Expected values come from file listings, mtimes, the processes' pids and their progress bars, never from the
functions under test. Commands that must be interrupted part-way run through ``preparation_helpers.py``, which only
slows each case's preprocessing down so that a kill lands mid-preparation on a loaded machine.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import BIN, TESTS, nnunet_env, run_command
from nnunetv2_desd.data.locks import LOCK_FILE, folder_lock
from nnunetv2_desd.data.sources import write_synthetic_dataset

pytestmark = pytest.mark.e2e

DATA = 'nnUNetPlans_3d_fullres'  # the default planner's data folder
PREP = ['--preprocess-only', '-device', 'cpu']


# ---------------------------------------------------------------------------------------------------- helpers

def _argv(command: str, args, slow: bool) -> list:
    args = [str(a) for a in args]
    if slow:
        return [sys.executable, str(TESTS / 'preparation_helpers.py'), command, *args]
    return [str(BIN / command), *args]


def _start(command: str, args, env: dict, log: Path, delay: float = 0.0) -> subprocess.Popen:
    """Starts a command in its own session (killable as a group), stdout+stderr into files ``log``.out/.err."""
    env = dict(env, DESD_TEST_CASE_DELAY=str(delay))
    with open(f'{log}.out', 'w') as out, open(f'{log}.err', 'w') as err:  # the child keeps its own copies
        proc = subprocess.Popen(_argv(command, args, delay > 0), env=env, stdout=out, stderr=err,
                                start_new_session=True)
    proc.log = log
    return proc


def _finish(proc: subprocess.Popen, timeout: float) -> tuple:
    """(exit code, stdout, stderr); the process group is killed if it runs past ``timeout``."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f'{proc.args} did not end within {timeout} s:\n{_read(proc.log, ".err")[-3000:]}')
    return proc.returncode, _read(proc.log, '.out'), _read(proc.log, '.err')


def _read(log: Path, suffix: str) -> str:
    return Path(f'{log}{suffix}').read_text()


def _cases(raw_dataset: Path) -> list:
    """Case ids from the raw images' file names (one channel: CASE_0000.nii.gz)."""
    return sorted(p.name[:-len('_0000.nii.gz')] for p in (raw_dataset / 'imagesTr').glob('*_0000.nii.gz'))


def _files(folder: Path) -> dict:
    """name -> mtime_ns of the plain files directly in ``folder`` (staging sub-folders left out)."""
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.is_file()} if folder.is_dir() else {}


def _pkls(folder: Path) -> set:
    return {n[:-4] for n in _files(folder) if n.endswith('.pkl')}


def _case_files(case: str) -> list:
    return [case + '.b2nd', case + '_seg.b2nd', case + '.pkl']


def _assert_complete_and_loadable(folder: Path, cases: list) -> None:
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    names = set(_files(folder))
    assert names == {f for c in cases for f in _case_files(c)}, \
        f'the data folder holds other or missing files: {sorted(names ^ {f for c in cases for f in _case_files(c)})}'
    # nnU-Net lists cases by their .b2nd files: exactly the cases, nothing staged or half-moved
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(str(folder))) == cases
    for case in cases:
        data, seg, _, properties = nnUNetDatasetBlosc2(str(folder), [case]).load_case(case)
        array = np.asarray(data[:])
        assert array.ndim == 4 and array.shape[0] == 1 and np.isfinite(array).all() and array.std() > 0, case
        assert np.asarray(seg[:]).shape[1:] == array.shape[1:], case
        assert 'class_locations' in properties, case


NOTHING_TO_DO = ([], ['0'])  # no bar at all (workers.run_in_processes hides an empty one), or 'STAGE: 0it'


def _bar_totals(stderr: str, stage: str) -> list:
    """The totals of the tqdm bar lines of ``stage`` ('0' for a bar with nothing to do: 'STAGE: 0it')."""
    totals = re.findall(re.escape(stage) + r'[^:\n\r]*: +(?:\d+%\|[^|]*\| *\d+/(\d+)|(0)it )', stderr)
    return sorted({a or b for a, b in totals})


def _children(pid: int) -> list:
    found = []
    try:
        for task in os.listdir(f'/proc/{pid}/task'):
            with open(f'/proc/{pid}/task/{task}/children') as f:
                found += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return found


def _descendants(pid: int) -> list:
    found = []
    for child in _children(pid):
        found += [child, *_descendants(child)]
    return found


def _is_pool_worker(pid: int) -> bool:
    """A spawned multiprocessing worker (not the resource tracker, which is also a spawned child)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return b'spawn_main' in f.read()
    except OSError:
        return False


def _one_error_line(stderr: str) -> str:
    assert 'Traceback' not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith('desd_pretrain: error:')]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------------- tests

def _sigkill_once_prepared(proc, folder: Path, cases: int) -> None:
    """SIGKILLs ``proc``'s process group once ``cases`` cases are complete in ``folder`` (or after 300 s)."""
    deadline = time.time() + 300
    while proc.poll() is None and len(_pkls(folder)) < cases and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_sigkill_during_preparation_then_same_command_finishes_without_redoing(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 950, n_cases=12, shape=(24, 24, 24))
    cases = _cases(tmp_path / 'raw' / name)
    data = tmp_path / 'preprocessed' / name / DATA
    args = ['-d', '950', *PREP, '-np', '1']

    proc = _start('desd_pretrain', args, env, tmp_path / 'first', delay=0.5)
    _sigkill_once_prepared(proc, data, 2)
    first_err = _read(tmp_path / 'first', '.err')
    assert proc.returncode == -signal.SIGKILL, f'the first run ended before the kill:\n{first_err[-3000:]}'
    before = _files(data)
    done = _pkls(data)
    assert 2 <= len(done) < len(cases), f'{len(done)} cases done at the kill: it must land part-way'
    assert (tmp_path / 'preprocessed' / name / 'nnUNetPlans.json').is_file()
    ledger = _ledger(tmp_path / 'preprocessed' / name)

    second = run_command(['desd_pretrain', *args], env)
    after = _files(data)
    _assert_complete_and_loadable(data, cases)
    for case in done:  # finished before the kill: not redone
        for f in _case_files(case):
            assert after[f] == before[f], f'{f} was written again'
    # the check pass was not redone (every case is in the ledger): no case read, no record added; nor was planning
    assert _bar_totals(second.stderr, 'Checking images of') in NOTHING_TO_DO, second.stderr[-3000:]
    assert _ledger(tmp_path / 'preprocessed' / name) == ledger
    assert 'Extracting dataset fingerprint' not in second.stderr
    # exactly the unfinished cases went through preprocessing
    assert _bar_totals(second.stderr, 'Preparing') == [str(len(cases) - len(done))], second.stderr[-3000:]


def test_added_cases_are_prepared_alone(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 951, n_cases=4, shape=(20, 20, 20))
    raw = tmp_path / 'raw' / name
    pre = tmp_path / 'preprocessed' / name
    data = pre / DATA
    args = ['desd_pretrain', '-d', '951', *PREP, '-np', '1']
    run_command(args, env)
    original = _cases(raw)
    assert _pkls(data) == set(original)
    plans = pre / 'nnUNetPlans.json'
    plans_bytes, plans_mtime = plans.read_bytes(), plans.stat().st_mtime_ns
    fingerprint_mtime = (pre / 'dataset_fingerprint.json').stat().st_mtime_ns
    before = _files(data)

    # two more cases: another synthetic dataset's images, copied in under new case names
    other = write_synthetic_dataset(str(tmp_path / 'other_raw'), 951, n_cases=2, shape=(20, 20, 20), seed=5)
    added = ['synthetic_100', 'synthetic_101']
    for source, target in zip(_cases(tmp_path / 'other_raw' / other), added):
        shutil.copy(tmp_path / 'other_raw' / other / 'imagesTr' / f'{source}_0000.nii.gz',
                    raw / 'imagesTr' / f'{target}_0000.nii.gz')
    dataset_json = json.loads((raw / 'dataset.json').read_text())
    dataset_json['numTraining'] = len(original) + len(added)
    (raw / 'dataset.json').write_text(json.dumps(dataset_json))

    second = run_command(args, env)
    assert plans.read_bytes() == plans_bytes and plans.stat().st_mtime_ns == plans_mtime, 'the plans changed'
    assert (pre / 'dataset_fingerprint.json').stat().st_mtime_ns == fingerprint_mtime
    after = _files(data)
    assert {n: after[n] for n in before} == before, 'original cases were prepared again'
    _assert_complete_and_loadable(data, sorted(original + added))
    assert sorted(p.name for p in (pre / 'desd_body_masks').iterdir()) == \
        sorted(c + '.nii.gz' for c in original + added)
    assert _bar_totals(second.stderr, 'Checking images of') == ['2'], second.stderr[-3000:]
    assert _bar_totals(second.stderr, 'Preparing') == ['2'], second.stderr[-3000:]


def test_replaced_images_are_prepared_again(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 958, n_cases=3, shape=(20, 20, 20))
    images = tmp_path / 'raw' / name / 'imagesTr'
    data = tmp_path / 'preprocessed' / name / DATA
    args = ['desd_pretrain', '-d', '958', *PREP, '-np', '1']
    run_command(args, env)
    before = _files(data)
    # synthetic_000 replaced by a plain copy (new mtime), synthetic_001 by a copy that keeps an older mtime
    shutil.copy(images / 'synthetic_002_0000.nii.gz', images / 'synthetic_000_0000.nii.gz')
    shutil.copy(images / 'synthetic_002_0000.nii.gz', images / 'synthetic_001_0000.nii.gz')
    old = time.time() - 86400
    os.utime(images / 'synthetic_001_0000.nii.gz', (old, old))
    run_command(args, env)
    after = _files(data)
    assert after['synthetic_002.pkl'] == before['synthetic_002.pkl']
    assert after['synthetic_000.pkl'] != before['synthetic_000.pkl'], 'a replaced (newer) image was not prepared again'
    assert after['synthetic_001.pkl'] != before['synthetic_001.pkl'], \
        'an image replaced by a copy with an older mtime (cp -p, rsync -a) was not prepared again' 


def _kill_first_worker(proc: subprocess.Popen, ready=lambda: True, timeout: float = 240) -> int:
    """SIGKILLs the first pool worker of ``proc`` that appears once ``ready()`` is true (workers seen before
    are left alone); returns its pid."""
    seen = set()
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        now_ready = ready()
        for pid in _descendants(proc.pid):
            if pid in seen or not _is_pool_worker(pid):
                continue
            if now_ready:
                os.kill(pid, signal.SIGKILL)
                return pid
            seen.add(pid)
        time.sleep(0.02)
    raise AssertionError(f'no pool worker appeared (exit {proc.poll()}):\n{_read(proc.log, ".err")[-3000:]}')


def test_killed_worker_ends_the_command(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 952, n_cases=16, shape=(20, 20, 20))
    pre = tmp_path / 'preprocessed' / name
    args = ['-d', '952', *PREP, '-np', '2']

    # a worker of the image check
    proc = _start('desd_pretrain', args, env, tmp_path / 'check')
    _kill_first_worker(proc)
    killed_at = time.time()
    code, _, err = _finish(proc, timeout=60)
    assert code == 2 and time.time() - killed_at < 60, err[-3000:]
    assert _one_error_line(err).startswith(
        f'desd_pretrain: error: Checking images of {name}: a worker process died'), err[-3000:]

    # a worker of the preparation: the first pool started once the plans exist
    proc = _start('desd_pretrain', args, env, tmp_path / 'prepare')
    _kill_first_worker(proc, ready=lambda: (pre / 'nnUNetPlans.json').is_file())
    killed_at = time.time()
    code, _, err = _finish(proc, timeout=60)
    assert code == 2 and time.time() - killed_at < 60, err[-3000:]
    assert _one_error_line(err).startswith(f'desd_pretrain: error: Preparing {name}: a worker process died'), \
        err[-3000:]

    run_command(['desd_pretrain', *args], env)
    _assert_complete_and_loadable(pre / DATA, _cases(tmp_path / 'raw' / name))


def test_two_concurrent_preparations(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 953, n_cases=6, shape=(20, 20, 20))
    args = ['-d', '953', *PREP, '-np', '1']
    # each case takes >= 1 s: whoever holds the lock holds it for fingerprint + planning + 6 s, far longer than the
    # two commands' start-up times differ
    procs = [_start('desd_pretrain', args, env, tmp_path / f'run{i}', delay=1.0) for i in range(2)]
    results = [_finish(proc, timeout=300) for proc in procs]
    for code, out, err in results:
        assert code == 0 and 'Traceback' not in err, err[-3000:]
    _assert_complete_and_loadable(tmp_path / 'preprocessed' / name / DATA, _cases(tmp_path / 'raw' / name))

    # the lock is held for planning, then for the cases: each command may wait for the other once, never race
    waited = [i for i, (_, _, err) in enumerate(results) if 'is being prepared by' in err]
    assert waited, 'one of two simultaneous commands waits for the other\'s lock'
    for i in waited:
        err = results[i][2]
        # the holder is named, unless it was caught between taking the lock and writing its name
        assert f'being prepared by preparation by pid {procs[1 - i].pid} on ' in err or \
            'being prepared by another process' in err, err[-3000:]
        assert re.search(r'lock \S+\.desd_prepare\.lock acquired after \d+ s\.', err), err[-3000:]
    # the fingerprint was taken once, and every case was prepared once, by one command or the other
    assert sum('Extracting dataset fingerprint' in err for _, _, err in results) == 1
    totals = [int(t) for _, _, err in results for t in _bar_totals(err, 'Preparing')]
    assert sum(totals) == 6, totals


def test_the_lock_names_its_holder_only_while_held(tmp_path):
    """A waiter reads the holder's name from the lock file: it must never find the name of a holder that is gone
    (a command that released the lock after planning, then waits for it again)."""
    lock = tmp_path / LOCK_FILE
    with folder_lock(str(tmp_path), 'planning'):
        assert lock.read_text() == f'planning by pid {os.getpid()} on {socket.gethostname()}'
    assert lock.read_text() == ''


def _ledger(pre: Path) -> dict:
    """The check ledger's files (one per writing process) and their contents."""
    return {p.name: p.read_text() for p in (pre / 'desd_checks').iterdir()}


def _share(cases, part: int, parts: int = 2) -> set:
    """The cases of share ``part``, by the documented rule: crc32 of the case id modulo the number of parts."""
    return {c for c in cases if zlib.crc32(c.encode()) % parts == part}


def test_parts_run_at_once_split_the_cases(tmp_path):
    """Each part checks and prepares its own share, at the same time as the other part."""
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 954, n_cases=8, shape=(20, 20, 20))
    cases = _cases(tmp_path / 'raw' / name)
    pre = tmp_path / 'preprocessed' / name
    data = pre / DATA
    args = ['-d', '954', *PREP, '-np', '1', '--parts', '2']
    procs = [_start('desd_pretrain', [*args, '--part', str(i)], env, tmp_path / f'part{i}') for i in range(2)]
    results = [_finish(proc, timeout=300) for proc in procs]
    for code, _, err in results:
        assert code == 0 and 'Traceback' not in err, err[-3000:]

    shares = [_share(cases, i) for i in range(2)]
    assert shares[0] and shares[1] and shares[0] | shares[1] == set(cases)
    # every case was checked (a part whose share is done also checks what planning still needs) and each part
    # prepared exactly its own share
    checked = [json.loads(line)['key'] for text in _ledger(pre).values() for line in text.splitlines() if line]
    assert set(checked) == set(cases)
    for share, (_, _, err) in zip(shares, results):
        assert _bar_totals(err, 'Preparing') == [str(len(share))], err[-3000:]
    _assert_complete_and_loadable(data, cases)
    made = _files(data)

    # a later run without parts prepares nothing and checks nothing
    ledger = _ledger(pre)
    later = run_command(['desd_pretrain', '-d', '954', *PREP, '-np', '1'], env)
    assert _files(data) == made and _ledger(pre) == ledger
    assert _bar_totals(later.stderr, 'Checking images of') in NOTHING_TO_DO and 'Preparing' not in later.stderr


def test_parts_refuse_a_bad_case_of_another_share(tmp_path):
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 959, n_cases=8, shape=(20, 20, 20))
    bad = tmp_path / 'raw' / name / 'imagesTr' / 'synthetic_005_0000.nii.gz'  # share 1 of 2 (crc32)
    bad.write_bytes(bad.read_bytes()[:bad.stat().st_size // 2])
    args = ['-d', '959', *PREP, '-np', '1', '--parts', '2']
    procs = [_start('desd_pretrain', [*args, '--part', str(i)], env, tmp_path / f'part{i}') for i in range(2)]
    results = [_finish(proc, timeout=300) for proc in procs]
    for code, _, err in results:
        assert code == 2 and 'Traceback' not in err, f'exit {code}: {err[-1500:]}'
        assert 'synthetic_005: corrupt or unreadable image' in _one_error_line(err)


def test_part_run_alone_finishes(tmp_path):
    """Parts may also run one after another: part 0 alone checks what planning needs, then prepares its share."""
    env = nnunet_env(tmp_path)
    name = write_synthetic_dataset(env['nnUNet_raw'], 955, n_cases=6, shape=(20, 20, 20))
    cases = set(_cases(tmp_path / 'raw' / name))
    proc = _start('desd_pretrain', ['-d', '955', *PREP, '-np', '1', '--part', '0', '--parts', '2'], env,
                  tmp_path / 'part0')
    code, _, err = _finish(proc, timeout=300)
    assert code == 0, err[-3000:]
    assert _pkls(tmp_path / 'preprocessed' / name / DATA) == _share(cases, 0)


def test_unlabelled_pool_resumes_after_sigkill(tmp_path):
    env = nnunet_env(tmp_path)
    write_synthetic_dataset(env['nnUNet_raw'], 956, n_cases=2, shape=(20, 20, 20), labelled=True)
    source = write_synthetic_dataset(env['nnUNet_raw'], 957, name='Unlabelled', n_cases=10, shape=(20, 20, 20),
                                     seed=3)
    run_command(['nnUNetv2_plan_and_preprocess', '-d', '956', '-c', '3d_fullres', '-npfp', '1', '-np', '1'], env)
    pool = tmp_path / 'preprocessed' / 'Dataset956_Synthetic' / 'desd_unlabelled' / DATA
    record = pool.parent / (DATA + '.json')
    args = ['-d', '956', '-u', '957', '-np', '1']
    keys = [f'{source}__{c}' for c in _cases(tmp_path / 'raw' / source)]

    proc = _start('desd_preprocess_unlabelled', args, env, tmp_path / 'first', delay=0.5)
    _sigkill_once_prepared(proc, pool, 2)
    assert proc.returncode == -signal.SIGKILL, _read(tmp_path / 'first', '.err')[-3000:]
    before, done = _files(pool), _pkls(pool)
    assert 2 <= len(done) < len(keys) and not record.exists()
    ledger = _ledger(tmp_path / 'preprocessed' / source)

    second = run_command(['desd_preprocess_unlabelled', *args], env)
    after = _files(pool)
    assert all(after[f] == before[f] for case in done for f in _case_files(case))
    assert _bar_totals(second.stderr, 'Checking images of') in NOTHING_TO_DO, second.stderr[-3000:]
    assert _ledger(tmp_path / 'preprocessed' / source) == ledger
    assert _bar_totals(second.stderr, 'Preprocessing unlabelled cases') == [str(len(keys) - len(done))]
    assert json.loads(record.read_text())['identifiers'] == keys
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    assert sorted(nnUNetDatasetBlosc2.get_identifiers(str(pool))) == keys
    for key in keys:
        data, _, _, properties = nnUNetDatasetBlosc2(str(pool), [key]).load_case(key)
        assert np.isfinite(np.asarray(data[:])).all() and properties['class_locations'] == {}
