import os
import random

import numpy as np
import pytest
import torch

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.checkpoint import (
    atomic_save, capture_rng_state, cpu_state_dict, file_sha256, load_checkpoint, restore_rng_state, tensor_digest)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while pickling")


class _Arbitrary:
    def __init__(self):
        self.x = 1


def _payload():
    # big tensor first so torch.save has started writing when the unpicklable object is reached
    return {'weights': torch.arange(100_000, dtype=torch.float32), 'bad': _Unpicklable()}


def test_atomic_save_failure_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / 'ckpt.pth'
    atomic_save({'epoch': 3, 'w': torch.ones(2)}, str(target))
    before = target.read_bytes()
    with pytest.raises(RuntimeError, match='boom'):
        atomic_save(_payload(), str(target))
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pth']
    assert load_checkpoint(str(target))['epoch'] == 3


def test_atomic_save_failure_creates_nothing(tmp_path):
    target = tmp_path / 'new.pth'
    with pytest.raises(RuntimeError, match='boom'):
        atomic_save(_payload(), str(target))
    assert not target.exists()
    assert os.listdir(tmp_path) == []


def test_atomic_save_overwrites_and_digest_matches(tmp_path):
    target = str(tmp_path / 'c.pth')
    atomic_save({'epoch': 1}, target)
    sd = {'a': torch.randn(3, 4), 'b': torch.tensor([1, 2], dtype=torch.int64)}
    atomic_save({'epoch': 2, 'net': sd}, target)
    loaded = load_checkpoint(target)
    assert loaded['epoch'] == 2
    assert tensor_digest(loaded['net']) == tensor_digest(sd)
    assert os.listdir(tmp_path) == ['c.pth']


def test_load_missing_file(tmp_path):
    with pytest.raises(DesdError, match='no checkpoint at'):
        load_checkpoint(str(tmp_path / 'absent.pth'))


def test_load_truncated_file(tmp_path):
    target = tmp_path / 'trunc.pth'
    atomic_save({'w': torch.randn(1000), 'epoch': 5}, str(target))
    data = target.read_bytes()
    target.write_bytes(data[:len(data) // 2])
    with pytest.raises(DesdError) as info:
        load_checkpoint(str(target))
    msg = str(info.value)
    assert 'trunc.pth' in msg and 'not a valid checkpoint' in msg
    assert '\n' not in msg


def test_load_refuses_arbitrary_python_object(tmp_path):
    target = tmp_path / 'evil.pth'
    torch.save({'obj': _Arbitrary()}, str(target))
    with pytest.raises(DesdError, match='evil.pth is not a valid checkpoint') as info:
        load_checkpoint(str(target))
    assert '_Arbitrary' in str(info.value) and '\n' not in str(info.value)


def test_load_refuses_non_dict(tmp_path):
    target = tmp_path / 'tensor.pth'
    torch.save(torch.zeros(2), str(target))
    with pytest.raises(DesdError, match='expected a dict'):
        load_checkpoint(str(target))


def _draw():
    return ([random.random() for _ in range(3)], [random.gauss(0, 1) for _ in range(3)],
            np.random.rand(3).tolist(), np.random.randn(3).tolist(), torch.rand(3).tolist())


def test_rng_round_trip_through_checkpoint(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in python random
    np.random.randn(1)  # ... and in numpy
    state = capture_rng_state()
    first = _draw()
    target = str(tmp_path / 'rng.pth')
    atomic_save({'rng': state}, target)
    loaded = load_checkpoint(target)['rng']
    _draw()  # move all generators on
    restore_rng_state(loaded)
    assert _draw() == first
    restore_rng_state(state)
    assert _draw() == first


def test_tensor_digest():
    a = {'x': torch.arange(6, dtype=torch.float32).reshape(2, 3), 'y': torch.tensor([True, False])}
    reordered = {'y': a['y'].clone(), 'x': a['x'].clone()}
    assert tensor_digest(a) == tensor_digest(reordered)
    assert len(tensor_digest(a)) == 64
    changed = {'x': a['x'].clone(), 'y': a['y']}
    changed['x'][1, 2] = 5.5
    assert tensor_digest(changed) != tensor_digest(a)
    # same bytes, different shape / dtype / key must all differ
    assert tensor_digest({'x': a['x'].reshape(3, 2), 'y': a['y']}) != tensor_digest(a)
    assert tensor_digest({'x': a['x'].to(torch.int32), 'y': a['y']}) != tensor_digest(a)
    assert tensor_digest({'z': a['x'], 'y': a['y']}) != tensor_digest(a)
    # non-contiguous view hashes like its contiguous copy; bfloat16 is supported
    assert tensor_digest({'t': a['x'].t()}) == tensor_digest({'t': a['x'].t().contiguous()})
    assert tensor_digest({'b': torch.ones(2, dtype=torch.bfloat16)}) != tensor_digest({'b': torch.zeros(2, dtype=torch.bfloat16)})


def test_file_sha256(tmp_path):
    p = tmp_path / 'f.bin'
    p.write_bytes(b'abc')
    assert file_sha256(str(p)) == 'ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad'


def test_cpu_state_dict_is_detached_copy():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    sd = cpu_state_dict(net)
    assert set(sd) == set(net.state_dict())
    for k, v in sd.items():
        assert v.device.type == 'cpu' and v.is_contiguous() and not v.requires_grad
    sd['0.weight'].zero_()
    assert net[0].weight.abs().sum() > 0  # a copy, not shared storage
    assert sd['1.num_batches_tracked'].dtype == torch.int64


def test_atomic_save_failure_after_write_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / 'late.pth'
    atomic_save({'epoch': 1}, str(target))
    before = target.read_bytes()

    def failing_replace(src, dst):
        assert os.path.getsize(src) > 0  # the temp file was fully written
        raise OSError("disk gone")

    monkeypatch.setattr(os, 'replace', failing_replace)
    with pytest.raises(OSError, match='disk gone'):
        atomic_save({'epoch': 2, 'w': torch.ones(10)}, str(target))
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ['late.pth']


def test_each_process_gets_its_own_saved_rng_state():
    from nnunetv2_desd.common.checkpoint import rng_state_of_process
    states = [{'process': 0}, {'process': 1}]
    assert rng_state_of_process(states, 1) == {'process': 1} and rng_state_of_process(states, 0) == {'process': 0}
    assert rng_state_of_process(states, 2) is None  # more processes than when it was saved: keep the own seed
    assert rng_state_of_process({'process': 0}, 0) == {'process': 0}  # older checkpoints: process 0's only
    assert rng_state_of_process({'process': 0}, 1) is None
