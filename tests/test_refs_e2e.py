"""ReFs end to end: desd_pretrain -m refs on a tiny pool with a labelled reference, the export through stock
nnUNetv2_train, a refused reference, and the engine's two matching forms on real batches."""
import csv
import dataclasses
import json
import math
import shutil

import pytest
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE, with_ext_trainers

pytestmark = pytest.mark.e2e

RUN = 'refs__nnUNetPlans_from921__3d_fullres'
REFS = ['-m', 'refs', '--reference', '921', *TINY]


def _load(path):
    return torch.load(path, map_location='cpu', weights_only=True)


@pytest.fixture(scope='module')
def refs_run(tmp_path_factory):
    """Unlabelled pool 920 (2 outputs: background, body) + labelled reference 921 (3 labels), planned by nnU-Net;
    one ReFs run with the default fish form (the pool takes the reference's plans). Shared: never modify."""
    root = tmp_path_factory.mktemp('refs')
    env = with_ext_trainers(nnunet_env(root))
    pool = write_synthetic_dataset(env['nnUNet_raw'], 920, n_cases=3, shape=(32, 32, 32))
    reference = write_synthetic_dataset(env['nnUNet_raw'], 921, name='SyntheticLabelled', n_cases=5,
                                        shape=(32, 32, 32), labelled=True, seed=1)
    run_command(['nnUNetv2_plan_and_preprocess', '-d', '921', '-c', '3d_fullres', '-npfp', '1', '-np', '1'], env)
    run_command(['desd_pretrain', '-d', '920', '--epochs', '1', '--iters-per-epoch', '2', *REFS], env)
    return root, env, pool, reference


def test_refs_export_has_the_desd_layout_and_fine_tunes_with_stock_nnunet(refs_run):
    root, env, pool, reference = refs_run
    out = root / 'results' / pool / RUN
    export = _load(out / 'pretrained_export.pth')
    meta, weights = export['desd_export'], export['network_weights']
    assert meta['method'] == 'refs' and meta['plans_source'] == reference  # --plans-from defaults to --reference
    settings = meta['method_settings']
    assert settings['reference'] == reference and settings['reference_plans'] == 'nnUNetPlans'
    assert settings['matching'] == 'fish' and settings['fish_inner_lr'] == 0.01 and settings['matching_weight'] is None

    final = _load(out / 'checkpoint_final.pth')
    assert final['config']['reference'] == reference and final['step'] == 2
    # trained with the reference's 3 outputs; exported with the 2 (background, body) a DeSD export has
    seg = [k for k in weights if '.seg_layers.' in k and k.endswith('weight')]
    assert seg and all(weights[k].shape[0] == 2 for k in seg) and all(final['network'][k].shape[0] == 3 for k in seg)
    assert {k: v.shape for k, v in weights.items() if '.seg_layers.' not in k} == \
        {k: v.shape for k, v in final['network'].items() if '.seg_layers.' not in k}
    for k, v in final['teacher'].items():  # the encoder is the teacher's
        if k.startswith('encoder.'):
            assert torch.equal(weights[k], v), k
    decoder = [k for k in weights if k.startswith('decoder.') and '.seg_layers.' not in k and
               not k.startswith('decoder.encoder.')]
    assert decoder and all(torch.equal(weights[k], final['network'][k]) for k in decoder)  # trained decoder
    log = next(out.glob('training_log_*.txt')).read_text()
    assert all(f'{key} ' in log for key in ('ssl_loss', 'reference_loss', 'gradient_cosine'))

    proc = run_command(['nnUNetv2_train', '921', '3d_fullres', '0', '-tr', 'nnUNetTrainerReFsTiny', '-device', 'cpu',
                        '-pretrained_weights', out / 'pretrained_export.pth'], env)
    fold = root / 'results' / reference / 'nnUNetTrainerReFsTiny__nnUNetPlans__3d_fullres' / 'fold_0'
    # 921 was the reference task: its labels were seen in pre-training, which the trainer says
    warning = f'was pre-trained with {reference} as its ReFs reference task'
    assert warning in proc.stderr and warning in next(fold.glob('training_log_*.txt')).read_text()
    provenance = json.loads((fold / PROVENANCE_FILE).read_text())
    assert provenance['method'] == 'refs' and provenance['loaded_encoder_tensors'] == provenance['encoder_tensors']
    assert (fold / 'checkpoint_final.pth').exists() and (fold / 'validation' / 'summary.json').exists()


def test_reference_with_other_plans_is_refused_before_anything_is_written(refs_run):
    root, env, pool, reference = refs_run
    # dataset 923: the reference's plans with another spacing, as --plans-from source
    other = root / 'preprocessed' / 'Dataset923_OtherPlans'
    other.mkdir()
    shutil.copy(root / 'preprocessed' / reference / 'dataset.json', other / 'dataset.json')
    plans = json.loads((root / 'preprocessed' / reference / 'nnUNetPlans.json').read_text())
    plans['configurations']['3d_fullres']['spacing'] = [2.0, 2.0, 2.0]
    (other / 'nnUNetPlans.json').write_text(json.dumps(plans))
    proc = run_command(['desd_pretrain', '-d', '920', '--plans-from', '923', '--epochs', '1', *REFS], env,
                       check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith('desd_pretrain: error: reference Dataset921_SyntheticLabelled is not preprocessed with '
                            "the pre-training plans 'nnUNetPlans_from923'")
    assert 'spacing' in error and '[2.0, 2.0, 2.0]' in error
    assert 'nnUNetv2_move_plans_between_datasets -s 923 -t 921 -sp nnUNetPlans -tp nnUNetPlans_from923' in error
    assert not (root / 'preprocessed' / pool / 'nnUNetPlans_from923.json').exists()


def test_refs_benchmark_command_times_desd_and_both_matching_forms(refs_run, tmp_path):
    env = refs_run[1]
    out = tmp_path / 'bench'
    proc = run_command(['desd_pretrain_benchmark', '-d', '920', *REFS, '--warmup-iters', '1', '--measure-iters', '1',
                        '--out', str(out)], env, timeout=600)
    assert '| ReFs (fish, default) step / DeSD step |' in proc.stdout
    with open(out / 'refs_vs_desd.csv') as f:
        values = {r['quantity']: float(r['value']) for r in csv.DictReader(f)}
    for name in ('fish', 'cosine', 'cosine_deepest'):
        assert values[f'{name}_to_desd_step_ratio'] == pytest.approx(
            values[f'{name}_seconds_per_step'] / values['desd_seconds_per_step'])
    # the cosine form keeps both tasks' graphs and their gradients' graphs for the double backward
    assert values['cosine_saved_for_backward_peak'] > values['desd_saved_for_backward_peak'] > 0
    assert (out / 'refs_vs_desd.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _trainer(env, monkeypatch, tmp_path, *args):
    for key, value in env.items():
        if key.startswith('nnUNet'):
            monkeypatch.setenv(key, value)
    from nnunetv2_desd.cli.pretrain import parse_config
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer
    cfg, _ = parse_config(['-d', '920', '--epochs', '2', '--iters-per-epoch', '2', '--freeze-last-layer-epochs', '0',
                           '--lr', '30', '--warmup-epochs', '0', *REFS, *args])
    ctx = init_distributed('cpu')
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier

    def build(**changes):
        return Pretrainer(dataclasses.replace(cfg, **changes), prepared, ctx, str(tmp_path / 'out'))
    return build, prepared


def test_engine_fish_and_cosine_steps(refs_run, monkeypatch, tmp_path):
    """alpha = 0 (fish) and lambda_match = 0 (cosine) both step along grad(L_ssl + lambda_ref L_ref); alpha > 0 and
    lambda_match > 0 each change that step; parameters stay the module's own."""
    root, env, pool, reference = refs_run
    build, prepared = _trainer(env, monkeypatch, tmp_path)
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    first = build(matching='fish', fish_inner_lr=0.0)
    batch = next(first.method_loader(build_view_loader(prepared, first.patch_size, 2, 0), 0))
    assert batch['reference']['data'].shape == (2, 1, 16, 16, 16)
    assert [tuple(t.shape[2:]) for t in batch['reference']['target']] == [(16, 16, 16), (8, 8, 8), (4, 4, 4)]

    def encoder_after_step(trainer):
        trainer.train_step(batch)
        assert all(isinstance(p, torch.nn.Parameter) for p in trainer.network.parameters())
        assert all(trainer.method.trainable_parameters[n] is p for n, p in trainer.student.named_parameters())
        assert set(trainer.metrics) == {'ssl_loss', 'reference_loss', 'gradient_cosine', 'teacher_entropy',
                                        'student_entropy', 'kl_teacher_student'}
        return torch.cat([p.detach().flatten() for p in trainer.student.encoder.parameters()])

    start = torch.cat([p.detach().flatten() for p in first.student.encoder.parameters()])
    joint_fish = encoder_after_step(first)
    joint_cosine = encoder_after_step(build(matching='cosine', matching_weight=0.0))
    assert (joint_fish - start).abs().max() > 1e-4
    torch.testing.assert_close(joint_fish, joint_cosine, rtol=1e-4, atol=1e-6)
    fish = encoder_after_step(build(matching='fish', fish_inner_lr=0.05))
    cosine = encoder_after_step(build(matching='cosine', matching_weight=1.0, matching_stages=1))
    assert (fish - joint_fish).abs().max() > 1e-6 and (cosine - joint_cosine).abs().max() > 1e-6


def test_prototypes_freeze_for_their_epoch_and_the_groups_get_the_scheduled_lr_and_decay(refs_run, monkeypatch,
                                                                                          tmp_path):
    root, env, pool, reference = refs_run
    build, prepared = _trainer(env, monkeypatch, tmp_path, '--freeze-last-layer-epochs', '1', '--warmup-epochs', '1',
                               '--weight-decay', '0.04', '--weight-decay-end', '0.4')
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    trainer = build(reference=None, method='desd')  # 2 epochs x 2 iterations, batch 2
    loader = build_view_loader(prepared, trainer.patch_size, 2, 0)
    decay, no_decay = trainer.optimizer.param_groups
    assert no_decay['no_decay'] and all(p.ndim <= 1 for p in no_decay['params']) and \
        all(p.ndim > 1 for p in decay['params'])
    biases_and_norms = {id(p) for n, p in trainer.student.named_parameters() if n.endswith('.bias') or p.ndim == 1}
    assert biases_and_norms and biases_and_norms <= {id(p) for p in no_decay['params']}

    peak, floor = 30 * 2 / 256, 1e-6  # --lr 30 per 256 samples at a global batch of 2; min_lr's default
    expected_lr = [0.0, peak / 2, peak, floor + (peak - floor) * (1 + math.cos(math.pi / 2)) / 2]
    expected_decay = [0.4 + (0.04 - 0.4) * (1 + math.cos(math.pi * s / 4)) / 2 for s in range(4)]
    prototypes = lambda: torch.cat([h.prototypes.detach().flatten().clone() for h in trainer.student.heads])  # noqa
    for step in range(4):
        before = prototypes()
        trainer.train_step(next(loader))
        assert decay['lr'] == pytest.approx(expected_lr[step]) and no_decay['lr'] == pytest.approx(expected_lr[step])
        assert decay['weight_decay'] == pytest.approx(expected_decay[step]) and no_decay['weight_decay'] == 0.0
        moved = (prototypes() - before).abs().max().item()
        assert (moved == 0.0) if step < 2 else (moved > 0.0), (step, moved)  # epoch 0 frozen, epoch 1 moving


def test_the_amp_path_on_cpu_with_bfloat16_autocast(refs_run, monkeypatch, tmp_path):
    """--amp on without CUDA: bfloat16 autocast and a GradScaler, for DeSD's plain backward and ReFs' fish step
    (whose losses then arrive multiplied by the scale, loss_scale != 1)."""
    root, env, pool, reference = refs_run
    # a moderate lr: the shared --lr 30 (0.23 at batch 2) wrecks the network in one step, after which bf16's inner
    # fish gradients overflow and the scaler rightly skips every later step
    build, prepared = _trainer(env, monkeypatch, tmp_path, '--amp', 'on', '--lr', '0.5')
    from nnunetv2_desd.pretraining.views.loader import build_view_loader
    for changes in ({'reference': None, 'method': 'desd'}, {'matching': 'fish', 'fish_inner_lr': 0.05}):
        trainer = build(**changes)
        assert trainer.amp and isinstance(trainer.scaler, torch.amp.GradScaler)
        # a moderate scale (loss_scale 16, not 1) so that the two steps are not both skipped for overflow
        trainer.scaler = torch.amp.GradScaler('cpu', init_scale=16.0)
        loader = build_view_loader(prepared, trainer.patch_size, 2, 0)
        loader = trainer.method_loader(loader, 0)
        seen = []
        handle = trainer.network.encoder.register_forward_hook(lambda m, i, o: seen.append(o[-1].dtype))
        start = torch.cat([p.detach().flatten() for p in trainer.student.encoder.parameters()])
        # a bfloat16 step may overflow now and then: the scaler skips it (halving the scale); steps until one is taken
        losses, taken = [], 0
        while taken == 0 and len(losses) < 5:
            scale = trainer.scaler.get_scale()
            losses.append(trainer.train_step(next(loader)).item())
            taken += trainer.scaler.get_scale() == scale  # growth comes only after 2000 unskipped steps
        handle.remove()
        moved = torch.cat([p.detach().flatten() for p in trainer.student.encoder.parameters()]) - start
        assert torch.bfloat16 in seen  # the encoder ran under bfloat16 autocast
        assert all(math.isfinite(v) for v in losses) and taken == 1, (changes, losses)
        assert moved.abs().max() > 0, changes
        assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # master weights stay float32


def test_refs_options_are_checked_and_the_checkpoint_resumes(refs_run, monkeypatch, tmp_path):
    root, env, pool, reference = refs_run
    build, _ = _trainer(env, monkeypatch, tmp_path)
    trainer = build(allow_schedule_change=True)  # the run had 1 epoch, this configuration has 2
    trainer.load_checkpoint(str(root / 'results' / pool / RUN / 'checkpoint_latest.pth'))
    assert trainer.step == 2 and trainer.method.reference == reference
    with pytest.raises(DesdError, match='--matching-stages 9'):
        build(matching='cosine', matching_stages=9)
    with pytest.raises(DesdError, match='--matching'):
        build(matching='exact')
    from nnunetv2_desd.cli.pretrain import parse_config
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.distributed import init_distributed
    for argv, message in ((['-m', 'refs'], 'needs --reference'), (['--reference', '921'], 'option of -m refs')):
        with pytest.raises(DesdError, match=message):  # refused by the options' check or before preparing
            cfg, _ = parse_config(['-d', '920', *argv])
            prepare_data(cfg, init_distributed('cpu'))
