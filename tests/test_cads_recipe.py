"""CADS's optimisation recipe: method defaults, epoch counts scaled to short runs, per-parameter clipping."""
import math

import pytest
import torch

from nnunetv2_desd.cli.pretrain import parse_config
from nnunetv2_desd.pretraining.config import PretrainConfig
from nnunetv2_desd.pretraining.engine.optim import clip_per_parameter_


def test_cads_official_defaults():
    cfg = PretrainConfig.create('500', 'cads', recipe='official')
    assert (cfg.optimizer, cfg.lr, cfg.min_lr, cfg.epochs) == ('adamw', 7.5e-4, 2e-6, 150)
    assert (cfg.weight_decay, cfg.weight_decay_end, cfg.clip_grad) == (0.04, 0.4, 0.3)
    assert (cfg.freeze_last_layer_epochs, cfg.warmup_teacher_temp_epochs, cfg.warmup_epochs) == (3, 50, 10)
    assert (cfg.warmup_teacher_temp, cfg.teacher_temp, cfg.mask_ratio, cfg.mask_patch) == (0.04, 0.07, 0.75, [4, 8, 8])
    desd = PretrainConfig.create('500', 'desd')
    assert (desd.optimizer, desd.lr, desd.epochs, desd.weight_decay_end, desd.warmup_teacher_temp_epochs) == \
        ('sgd', 0.3, 300, None, 20)


def test_epoch_counts_scale_to_short_runs_unless_given():
    cfg = PretrainConfig.create('500', 'cads', epochs=15)
    # 10/150, 50/150 and 3/150 of 15 epochs, rounded; 0.3 frozen epochs round to 0 but stay 1
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, cfg.freeze_last_layer_epochs) == (1, 5, 1)
    cfg = PretrainConfig.create('500', 'cads', epochs=60, warmup_teacher_temp_epochs=7)
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, cfg.freeze_last_layer_epochs) == (4, 7, 1)
    assert PretrainConfig.create('500', 'cads', epochs=600).warmup_teacher_temp_epochs == 50  # longer: unchanged
    cfg, _ = parse_config(['-d', '500', '--epochs', '30'])  # DeSD: 10 and 20 of 300 epochs
    assert (cfg.warmup_epochs, cfg.warmup_teacher_temp_epochs, cfg.lr) == (1, 2, 0.3)
    cfg, _ = parse_config(['-d', '500', '-m', 'cads', '--lr', '0.1', '--optimizer', 'sgd'])
    assert (cfg.lr, cfg.optimizer, cfg.clip_grad) == (0.1, 'sgd', 0.3)
    with pytest.raises(TypeError, match='unknown'):
        PretrainConfig.create('500', 'cads', mask_ratios=0.5)


def test_per_parameter_clipping_by_hand():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(2))
    c = torch.nn.Parameter(torch.zeros(1))  # no gradient: left alone
    a.grad = torch.tensor([3.0, 4.0])      # norm 5 -> scaled by 1 / (5 + 1e-6)
    b.grad = torch.tensor([0.1, 0.0])      # norm 0.1 < 1 -> factor min(1, 1 / 0.100001) = 1
    clip_per_parameter_([a, b, c], 1.0)
    assert torch.allclose(a.grad, torch.tensor([3.0, 4.0]) / (5 + 1e-6))
    assert math.isclose(a.grad.norm().item(), 1.0, rel_tol=1e-5)
    assert torch.equal(b.grad, torch.tensor([0.1, 0.0])) and c.grad is None
