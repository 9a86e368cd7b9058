"""CADS's DRRs at scale: a bounded loader cache, one folder listing per run, axes and checks from the ledger,
a dead worker that ends the run, and DRR writing split into shares."""
import glob
import os
import shutil
import signal
import threading
import time
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import nnunet_env, run_command
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.planning import PreparedData

VIEW, ATTENUATION = 'lateral', 'linear'
N_CASES = 6


def _die(job):
    """A worker killed as by the OOM killer."""
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.fixture(scope='module')
def drr_dataset(tmp_path_factory):
    """6 preprocessed CT cases with their DRRs written by ``desd_drr`` (the reference), in a fresh process."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2_desd.data.sources import write_synthetic_dataset
    root = tmp_path_factory.mktemp('drr_scale')
    env = nnunet_env(root)
    name = write_synthetic_dataset(env['nnUNet_raw'], 950, n_cases=N_CASES, shape=(16, 16, 12))
    run_command(['desd_drr', '-d', '950', '-np', '1'], env)
    preprocessed = root / 'preprocessed' / name
    folder = preprocessed / 'nnUNetPlans_3d_fullres'
    cases = sorted(f.name[:-len('_0000.nii.gz')] for f in (root / 'raw' / name / 'imagesTr').glob('*.nii.gz'))
    references = {c: np.load(folder / f'{c}_drr_{VIEW}_{ATTENUATION}.npy') for c in cases}
    raw = SimpleNamespace(cases={c: [str(root / 'raw' / name / 'imagesTr' / f'{c}_0000.nii.gz')] for c in cases})
    return SimpleNamespace(preprocessed=preprocessed, name=name, cases=cases, references=references, raw=raw,
                           plans=load_json(preprocessed / 'nnUNetPlans.json'),
                           dataset_json=load_json(preprocessed / 'dataset.json'))


def fresh(drr_dataset, tmp_path, cases=None, keep_drrs=False) -> PreparedData:
    """A private copy of the preprocessed dataset, without DRRs (and ledger) unless ``keep_drrs``."""
    copy = tmp_path / drr_dataset.name
    shutil.copytree(drr_dataset.preprocessed, copy)
    folder = copy / 'nnUNetPlans_3d_fullres'
    if not keep_drrs:
        for f in folder.glob('*_drr_*.npy'):
            f.unlink()
        shutil.rmtree(copy / 'desd_drrs', ignore_errors=True)
    return PreparedData(drr_dataset.name, 'nnUNetPlans', '3d_fullres', drr_dataset.plans, drr_dataset.dataset_json,
                        str(folder), list(cases or drr_dataset.cases), drr_dataset.name)


def drr_files(prepared) -> dict:
    from nnunetv2_desd.data.drrs import drr_path
    return {c: drr_path(prepared.data_folder, c, VIEW, ATTENUATION) for c in prepared.identifiers}


def mtimes(prepared) -> dict:
    return {c: os.stat(p).st_mtime_ns for c, p in drr_files(prepared).items() if os.path.isfile(p)}


# ------------------------------------------------------------------------------------------------------------
# the loader
# ------------------------------------------------------------------------------------------------------------
def test_loader_keeps_a_bounded_number_of_drrs(tmp_path, monkeypatch):
    import torch
    from nnunetv2_desd.pretraining.views.loader import ViewsAndDrrLoader
    bound = ViewsAndDrrLoader.cache_size
    assert 0 < bound <= 1024
    rng = np.random.default_rng(0)
    files, images = {}, {}
    for i in range(bound + 40):  # more cases than the cache holds
        images[f'c{i}'] = rng.uniform(-1, 1, (10, 12)).astype(np.float32)
        files[f'c{i}'] = str(tmp_path / f'c{i}.npy')
        np.save(files[f'c{i}'], images[f'c{i}'][None, :, :, None])  # projected along axis 2
    dataset = SimpleNamespace(identifiers=sorted(files))
    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    loader = ViewsAndDrrLoader(dataset, 2, (10, 8, 6), (8, 6, 4), labels, drr_files=files)

    for case in files:
        drr = loader._drr(case, 2)
        assert len(loader._drrs) <= bound
        assert drr.shape == (2, 8, 6, 1)
        expected = torch.nn.functional.interpolate(torch.from_numpy(images[case])[None, None], size=(8, 6),
                                                   mode='bilinear', antialias=True, align_corners=False)[0, 0]
        for channel in range(2):
            torch.testing.assert_close(drr[channel, :, :, 0], expected)
    assert len(loader._drrs) == bound

    # the most recently used DRRs come from memory; an evicted one is read from disk again
    def no_load(*args, **kwargs):
        raise AssertionError('np.load called')
    monkeypatch.setattr(np, 'load', no_load)
    last = list(files)[-1]
    loader._drr(last, 2)
    with pytest.raises(DesdError, match='cannot read the DRR'):
        loader._drr('c0', 2)


# ------------------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------------------
def test_writing_lists_the_folder_once(drr_dataset, tmp_path, monkeypatch):
    from nnunetv2.training.dataloading import nnunet_dataset
    from nnunetv2_desd.data.drrs import write_drrs
    prepared = {n: fresh(drr_dataset, tmp_path / str(n), drr_dataset.cases[:n]) for n in (3, N_CASES)}
    calls = []
    infer, listdir, scandir = nnunet_dataset.infer_dataset_class, os.listdir, os.scandir

    def listed(path):
        calls.append(path if isinstance(path, int) else os.path.abspath(path))
    monkeypatch.setattr(nnunet_dataset, 'infer_dataset_class', lambda folder: calls.append('infer') or infer(folder))
    monkeypatch.setattr(os, 'listdir', lambda path='.': listed(path) or listdir(path))
    monkeypatch.setattr(os, 'scandir', lambda path='.': listed(path) or scandir(path))

    counts = {}
    for n in (3, N_CASES):
        calls.clear()
        paths = write_drrs(prepared[n], VIEW, ATTENUATION, 1, raw=drr_dataset.raw)
        counts[n] = (calls.count('infer'), calls.count(os.path.abspath(prepared[n].data_folder)))
        assert sorted(paths) == drr_dataset.cases[:n]
        for case, path in paths.items():
            np.testing.assert_array_equal(np.load(path), drr_dataset.references[case])
    assert counts[3] == counts[N_CASES] and counts[N_CASES][0] <= 1


def test_checks_and_axes_come_from_the_ledger(drr_dataset, tmp_path, monkeypatch):
    from nnunetv2_desd.data.drrs import drr_axes, write_drrs
    from nnunetv2_desd.pretraining.methods.cads import CADS
    prepared = fresh(drr_dataset, tmp_path)
    prepared.drr_files = write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw)
    expected = {c: [a for a in range(3) if d.shape[1 + a] == 1][-1] for c, d in drr_dataset.references.items()}
    assert set(expected.values()) == {2}  # lateral on the synthetic geometry
    before = mtimes(prepared)
    assert len(before) == N_CASES

    def no_load(*args, **kwargs):
        raise AssertionError('np.load called')
    with monkeypatch.context() as m:
        m.setattr(np, 'load', no_load)
        assert drr_axes(prepared, VIEW, ATTENUATION) == expected
        cfg = SimpleNamespace(mask_ratio=0.75, mask_patch=(4, 8, 8), drr_view=VIEW, drr_attenuation=ATTENUATION)
        checked = []
        m.setattr(CADS, 'check', lambda self, patch, strides, axes: checked.append(list(axes)))
        assert isinstance(CADS.build(cfg, prepared, (32, 32, 32)), CADS)
        pool = SimpleNamespace(members=[prepared], configuration_manager=prepared.configuration_manager)
        assert isinstance(CADS.build(cfg, pool, (32, 32, 32)), CADS)  # a pool of datasets: each one's ledger
        assert checked == [[2], [2]]  # the DRRs' axes reach the input check
        assert write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw) == prepared.drr_files
    assert mtimes(prepared) == before  # nothing rewritten, nothing opened

    # a case preprocessed again after its DRR: only that DRR is redone
    stale = prepared.identifiers[1]
    os.utime(os.path.join(prepared.data_folder, stale + '.pkl'), ns=(before[stale] + 10 ** 9,) * 2)
    write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw)
    after = mtimes(prepared)
    assert after[stale] > before[stale] and all(after[c] == before[c] for c in before if c != stale)


def test_drrs_of_an_older_version_are_validated_once(drr_dataset, tmp_path, monkeypatch):
    from nnunetv2_desd.data.drrs import drr_axes, write_drrs
    from nnunetv2_desd.data.ledger import Ledger
    prepared = fresh(drr_dataset, tmp_path, keep_drrs=True)
    ledger_folder = tmp_path / drr_dataset.name / 'desd_drrs'
    shutil.rmtree(ledger_folder)  # DRRs without records, as an older version left them
    before = mtimes(prepared)
    assert drr_axes(prepared, VIEW, ATTENUATION) == {c: 2 for c in prepared.identifiers}  # opens the files
    write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw)
    assert mtimes(prepared) == before
    [sub] = os.listdir(ledger_folder)
    assert sub == f'nnUNetPlans_3d_fullres_{VIEW}_{ATTENUATION}'
    assert sorted(Ledger(str(ledger_folder / sub)).read()) == prepared.identifiers
    monkeypatch.setattr(np, 'load', lambda *a, **k: pytest.fail('np.load called'))
    assert drr_axes(prepared, VIEW, ATTENUATION) == {c: 2 for c in prepared.identifiers}


def test_shares_are_disjoint_and_cover_every_case(drr_dataset, tmp_path):
    from nnunetv2_desd.data.drrs import write_drrs
    prepared = fresh(drr_dataset, tmp_path)
    expected = [{c for c in drr_dataset.cases if zlib.crc32(c.encode()) % 2 == part} for part in (0, 1)]
    assert expected[0] and expected[1]  # both shares hold cases with these names
    written = []
    for part in (0, 1):
        before = set(mtimes(prepared))
        paths = write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw, part=part, parts=2)
        assert sorted(paths) == drr_dataset.cases  # every case's path, not only the share's
        written.append(set(mtimes(prepared)) - before)
    assert written == expected
    before = mtimes(prepared)
    write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw)
    assert mtimes(prepared) == before
    for case, path in drr_files(prepared).items():
        np.testing.assert_array_equal(np.load(path), drr_dataset.references[case])
    with pytest.raises(DesdError, match='--part 2 --parts 2'):
        write_drrs(prepared, VIEW, ATTENUATION, 1, raw=drr_dataset.raw, part=2, parts=2)


def test_a_dead_worker_ends_the_run(drr_dataset, tmp_path, monkeypatch):
    """The worker is SIGKILLed (as by the OOM killer): the run stops with the stage named, it does not hang."""
    from nnunetv2_desd.data import drrs
    prepared = fresh(drr_dataset, tmp_path)
    monkeypatch.setattr(drrs, '_write_case', _die)  # pickled by name: the workers import it from this module
    monkeypatch.setattr(drrs, 'MIN_CASES_PER_PROCESS', 1)
    outcome = []

    def write():
        try:
            drrs.write_drrs(prepared, VIEW, ATTENUATION, 2, raw=drr_dataset.raw)
            outcome.append('returned')
        except BaseException as e:
            outcome.append(e)
    thread = threading.Thread(target=write, daemon=True)
    start = time.time()
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), 'write_drrs hangs after its worker died'
    [error] = outcome
    assert isinstance(error, DesdError) and f'DRRs ({VIEW}, {ATTENUATION})' in str(error) and 'died' in str(error)
    assert '\n' not in str(error) and time.time() - start < 120
    assert not glob.glob(os.path.join(prepared.data_folder, '*_drr_*'))
