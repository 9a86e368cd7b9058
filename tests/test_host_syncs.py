"""Host synchronisations per training step, counted on CPU, and AMP's skip of a non-finite loss.

On a GPU every read of a device value (``.item()``, ``float()``, ``bool()``, ``.tolist()``, ...) waits for the work
queued before it; the engine reads its metrics once per logging interval, so a step should read almost nothing.
"""
import dataclasses
import math

import pytest
import torch

from conftest import TINY, nnunet_env
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.sources import write_synthetic_dataset

READS = ('item', '__float__', '__bool__', '__int__', 'tolist', 'cpu')
MAX_DESD, MAX_REFS = 2, 5


@pytest.fixture(scope='module')
def build(tmp_path_factory):
    """build(*options) -> Pretrainer on one labelled dataset (931), which is also ReFs' reference; the default
    small-batch recipe (Sinkhorn queue, running batch norm)."""
    root = tmp_path_factory.mktemp('host_syncs')
    env = nnunet_env(root)
    write_synthetic_dataset(env['nnUNet_raw'], 931, name='SyntheticLabelled', n_cases=2, shape=(24, 24, 24),
                            labelled=True, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
            mp.setenv(key, env[key])
        from nnunetv2_desd.cli.pretrain import parse_config
        from nnunetv2_desd.pretraining.distributed import init_distributed
        from nnunetv2_desd.pretraining.engine.loop import Pretrainer
        from nnunetv2_desd.pretraining.run import prepare_data
        ctx = init_distributed('cpu')
        common = ['-d', '931', '--epochs', '2', '--iters-per-epoch', '4', '--lr', '0.5', *TINY]
        prepare_data(parse_config(common)[0], ctx)  # plans and preprocesses 931 (ReFs refuses an unplanned one)

        def make(*options, **changes):
            cfg, _ = parse_config(common + list(options))
            prepared = prepare_data(cfg, ctx)
            cfg = dataclasses.replace(cfg, plans=prepared.plans_identifier, **changes)
            return Pretrainer(cfg, prepared, ctx, str(root / 'out'))
        yield make


def _batch(trainer, seed: int) -> dict:
    """A view batch (2 volumes) and, for ReFs, a reference batch with its deep supervision targets."""
    g = torch.Generator().manual_seed(seed)
    patch = trainer.patch_size
    batch = {'data': torch.randn(2, 2, *patch, generator=g)}
    scales = getattr(trainer.method, 'deep_supervision_scales', None)
    if scales is not None:
        batch['reference'] = {'data': torch.randn(2, 1, *patch, generator=g), 'target': [
            torch.randint(0, 3, (2, 1, *[round(p * s) for p, s in zip(patch, scale)]), generator=g).float()
            for scale in scales]}
    return batch


def _reads_per_step(trainer, monkeypatch, steps: int = 2) -> list:
    trainer.train_step(_batch(trainer, 0))  # warm-up: lazily made state (scaler, caches) is made here
    count = [0]
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            count[0] += 1
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    reads = []
    for step in range(steps):
        count[0] = 0
        trainer.train_step(_batch(trainer, step + 1))
        reads.append(count[0])
    monkeypatch.undo()
    return reads


def test_desd_step_reads_at_most_two_values(build, monkeypatch):
    trainer = build()
    assert trainer.cfg.sinkhorn_queue > 0 and trainer.loss.queue.shape[0] > 0  # the queue path is covered
    reads = _reads_per_step(trainer, monkeypatch)
    assert max(reads) <= MAX_DESD, reads
    assert 0 < trainer.loss.filled_rows == int(trainer.loss.queue_filled)


@pytest.mark.parametrize('matching', ['fish', 'cosine'])
def test_refs_step_reads_at_most_five_values(build, monkeypatch, matching):
    trainer = build('-m', 'refs', '--reference', '931', '--matching', matching,
                    *(['--matching-stages', '1'] if matching == 'cosine' else []))
    reads = _reads_per_step(trainer, monkeypatch, steps=1)
    assert max(reads) <= MAX_REFS, (matching, reads)
    assert all(torch.is_tensor(v) for v in trainer.metrics.values())  # read by the engine, once per interval


def _teacher_overflows_once(trainer, monkeypatch):
    """The teacher's next output has a row of inf (a float16 overflow), then it is itself again."""
    forward = trainer.teacher.forward

    def overflow(*args, **kwargs):
        monkeypatch.setattr(trainer.teacher, 'forward', forward)
        outputs = [o.clone() for o in forward(*args, **kwargs)]
        outputs[0][0] = math.inf
        return outputs
    monkeypatch.setattr(trainer.teacher, 'forward', overflow)


def test_a_non_finite_loss_skips_the_step_under_amp_and_raises_without(build, monkeypatch):
    trainer = build('--amp', 'on')
    assert trainer.scaler is not None
    trainer.train_step(_batch(trainer, 0))
    weights = [p.detach().clone() for p in trainer.student.parameters()]
    scale = trainer.scaler.get_scale()
    _teacher_overflows_once(trainer, monkeypatch)
    loss = trainer.train_step(_batch(trainer, 1))  # no exception
    assert not torch.isfinite(loss)
    assert all(torch.equal(p, w) for p, w in zip(trainer.student.parameters(), weights))  # skipped
    assert trainer.scaler.get_scale() < scale
    assert torch.isfinite(trainer.loss.center).all() and torch.isfinite(trainer.loss.queue).all()
    assert torch.isfinite(trainer.train_step(_batch(trainer, 2)))  # and the run goes on

    plain = build()  # without AMP: the same one-line error on every process
    assert plain.scaler is None
    _teacher_overflows_once(plain, monkeypatch)
    with pytest.raises(DesdError, match=r'^loss is nan on process 0 at step 0; lower --lr or check the data\.$'):
        plain.train_step(_batch(plain, 1))
