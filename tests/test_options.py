"""The options of desd_pretrain, derived from PretrainConfig's field declarations: one option per field, and every
declared bound and choice enforced (expected values written by hand)."""
from dataclasses import fields

import pytest

from nnunetv2_desd.cli.pretrain import build_parser, parse_config
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.pretraining.config import PretrainConfig

FLAGS = {  # every field's option, written out
    'dataset': '-d', 'method': '-m', 'recipe': '--recipe', 'configuration': '-c', 'plans': '-p', 'planner': '-pl',
    'plans_from': '--plans-from', 'continue_training': '--c', 'overwrite': '--overwrite',
    'allow_schedule_change': '--allow-schedule-change', 'init': '--init', 'device': '-device', 'amp': '--amp',
    'epochs': '--epochs', 'iters_per_epoch': '--iters-per-epoch', 'batch_size': '--batch-size',
    'patch_size': '--patch-size', 'out_dim': '--out-dim', 'stages': '--stages', 'head_hidden_dim': '--head-hidden-dim',
    'head_bottleneck_dim': '--head-bottleneck-dim', 'head_norm': '--head-norm', 'student_temp': '--student-temp',
    'teacher_temp': '--teacher-temp', 'warmup_teacher_temp': '--warmup-teacher-temp',
    'warmup_teacher_temp_epochs': '--warmup-teacher-temp-epochs', 'center_momentum': '--center-momentum',
    'sinkhorn_queue': '--sinkhorn-queue', 'teacher_momentum': '--teacher-momentum',
    'teacher_momentum_end': '--teacher-momentum-end', 'freeze_last_layer_epochs': '--freeze-last-layer-epochs',
    'optimizer': '--optimizer', 'lr': '--lr', 'min_lr': '--min-lr', 'warmup_epochs': '--warmup-epochs',
    'weight_decay': '--weight-decay', 'weight_decay_end': '--weight-decay-end', 'clip_grad': '--clip-grad',
    'mask_ratio': '--mask-ratio', 'mask_patch': '--mask-patch', 'drr_view': '--drr-view',
    'drr_attenuation': '--drr-attenuation', 'reference': '--reference', 'reference_weight': '--reference-weight',
    'matching': '--matching', 'matching_weight': '--matching-weight', 'matching_stages': '--matching-stages',
    'fish_inner_lr': '--fish-inner-lr', 'reference_batch_size': '--reference-batch-size',
    'num_workers': '--num-workers', 'num_preprocessing_processes': '-np', 'seed': '--seed',
    'deterministic': '--deterministic', 'dataset_weights': '--dataset-weights',
    'exclude_bad_cases': '--exclude-bad-cases'}


def _refused(capsys, argv) -> str:
    with pytest.raises(SystemExit) as e:
        parse_config(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


def test_every_field_has_its_option():
    parser = build_parser()
    options = {a.dest: a.option_strings for a in parser._actions}
    assert {f.name for f in fields(PretrainConfig)} == set(FLAGS)
    for name, flag in FLAGS.items():
        assert options[name] == [flag], name
        assert parser._option_string_actions[flag].help, name
    cfg, preprocess_only = parse_config(['-d', '500', '--deterministic', '--student-temp', '0.2', '--c'])
    assert (cfg.deterministic, cfg.student_temp, cfg.continue_training, preprocess_only) == (True, 0.2, True, False)
    assert parse_config(['-d', '500'])[0].deterministic is False


@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], '--epochs 0: expected a positive number of epochs.'),
    (['--teacher-temp', '0'], '--teacher-temp 0.0: expected a temperature above 0.'),
    (['--student-temp', '-1'], '--student-temp -1.0: expected a temperature above 0.'),
    (['--center-momentum', '1.5'], '--center-momentum 1.5: expected a momentum in [0, 1].'),
    (['--mask-ratio', '1'], '--mask-ratio 1.0: expected a share in [0, 1).'),
    (['--seed', '4294967296'], '--seed 4294967296: expected a seed in [0, 2^32).'),
    (['--patch-size', '3', '8', '8'], '--patch-size 3: expected three patch lengths of at least 4 voxels.'),
    (['-np', '0'], '-np 0: expected a positive number of processes.'),
    (['--fish-inner-lr', 'nan'], '--fish-inner-lr nan: expected a learning rate, 0 or more.'),
    (['--reference-batch-size', '0'], '--reference-batch-size 0: expected a positive batch size.'),
])
def test_declared_bounds_are_enforced(argv, message):
    with pytest.raises(DesdError) as e:
        parse_config(['-d', '500', *argv])
    assert str(e.value) == message


def test_declared_choices_and_lengths_are_enforced(capsys):
    assert "argument --matching: invalid choice: 'dot'" in _refused(capsys, ['-d', '500', '--matching', 'dot'])
    assert "argument --head-norm: invalid choice: 'layer'" in _refused(capsys, ['-d', '500', '--head-norm', 'layer'])
    assert 'argument --mask-patch: expected 3 arguments' in _refused(capsys, ['-d', '500', '--mask-patch', '4', '8'])
    assert 'the following arguments are required: -d' in _refused(capsys, ['--epochs', '3'])
    with pytest.raises(DesdError, match=r"^--matching 'dot': choose one of fish, cosine\.$"):
        PretrainConfig.create('500', 'refs', matching='dot', reference='501')
    with pytest.raises(DesdError, match=r"^--drr-view 'top': choose one of lateral, frontal\.$"):
        PretrainConfig.create('500', 'cads', drr_view='top')
    with pytest.raises(DesdError, match=r'^--mask-patch needs 3 values, got 2\.$'):
        PretrainConfig.create('500', 'cads', mask_patch=[4, 8])


def test_help_shows_the_defaults_per_method_and_recipe():
    helps = {a.dest: a.help for a in build_parser()._actions}
    assert helps['lr'].endswith('(default: desd 0.3, cads 0.00075, refs 0.3)')
    assert helps['out_dim'].endswith('(default: 256; --recipe official: 60000)')
    assert helps['warmup_epochs'].endswith('(default: 10; scaled to runs shorter than the official epochs)')
    assert '(default' not in helps['reference'] and '(default' not in helps['deterministic']
    assert helps['deterministic'].startswith('reproducible pre-training: ordered loader workers')
