"""Schedules and the teacher EMA update, checked against hand values."""

import pytest
import torch
from torch import nn

from nnunetv2_desd.pretraining.engine.ema import ema_update
from nnunetv2_desd.pretraining.engine.schedules import cosine, linear_warmup_constant, warmup_cosine


def test_cosine():
    assert cosine(0, 10, 0.996, 1.0) == pytest.approx(0.996)
    assert cosine(5, 10, 0.996, 1.0) == pytest.approx(0.998)
    # quarter way: (1 + cos(pi/4)) / 2 = 0.8535534
    assert cosine(5, 20, 0.996, 1.0) == pytest.approx(1.0 - 0.004 * 0.8535534, abs=1e-9)
    assert cosine(10, 10, 0.996, 1.0) == 1.0
    assert cosine(15, 10, 0.996, 1.0) == 1.0


def test_warmup_cosine():
    # 10 warm-up steps to 1.0, then 100 cosine steps to 0.0
    assert warmup_cosine(0, 110, 10, 1.0, 0.0) == 0.0
    assert warmup_cosine(5, 110, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(5, 110, 10, 1.0, 0.0, start=0.2) == pytest.approx(0.6)
    assert warmup_cosine(10, 110, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert warmup_cosine(60, 110, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert warmup_cosine(110, 110, 10, 1.0, 2e-6) == 2e-6
    assert warmup_cosine(0, 100, 0, 1.0, 0.0) == 1.0  # no warm-up


def test_linear_warmup_constant():
    assert linear_warmup_constant(0, 20, 0.04, 0.07) == pytest.approx(0.04)
    assert linear_warmup_constant(10, 20, 0.04, 0.07) == pytest.approx(0.055)
    assert linear_warmup_constant(20, 20, 0.04, 0.07) == 0.07
    assert linear_warmup_constant(299, 20, 0.04, 0.07) == 0.07


class AB(nn.Module):
    def __init__(self, a, b, order="ab"):
        super().__init__()
        for name in order:
            setattr(self, name, nn.Parameter(torch.tensor(a if name == "a" else b)))


def test_ema_update_hand_value_and_buffers_untouched():
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        teacher.weight.fill_(1.0)
        student.weight.fill_(3.0)
        student.running_mean.fill_(5.0)
    ema_update(teacher, student, 0.9)
    assert teacher.weight.tolist() == pytest.approx([1.2, 1.2])  # 0.9 * 1 + 0.1 * 3
    assert teacher.running_mean.tolist() == [0.0, 0.0]


def test_ema_pairs_by_name_not_registration_order():
    teacher = AB([1.0, 1.0], [10.0, 10.0], order="ab")
    student = AB([3.0, 3.0], [30.0, 30.0], order="ba")
    assert [n for n, _ in teacher.named_parameters()] != [n for n, _ in student.named_parameters()]
    ema_update(teacher, student, 0.5)
    assert teacher.a.tolist() == [2.0, 2.0] and teacher.b.tolist() == [20.0, 20.0]


def test_ema_mismatch_raises():
    with pytest.raises(ValueError, match="0.weight"):
        ema_update(nn.Sequential(nn.Linear(2, 2)), nn.Sequential(), 0.9)
    with pytest.raises(ValueError, match=r"\(3, 2\)"):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 3), 0.9)
    teacher = nn.Linear(2, 2)
    before = teacher.weight.clone()
    with pytest.raises(ValueError):
        ema_update(teacher, nn.Linear(2, 3), 0.9)
    assert torch.equal(teacher.weight, before)  # nothing updated on failure


def test_recipes_and_scaled_epoch_counts():
    from nnunetv2_desd.pretraining.config import PretrainConfig
    small = PretrainConfig.create('D', epochs=10)
    official = PretrainConfig.create('D', recipe='official', epochs=10)
    assert (small.head_norm, small.teacher_temp, small.teacher_momentum) == ('running', 0.02, 0.9)
    assert (official.head_norm, official.teacher_temp, official.teacher_momentum) == ('batch', 0.07, 0.996)
    # 1 frozen-prototype epoch of 300 scales to 0.03 of 10: kept at 1 (it rounded to 0 before);
    # 10 lr warm-up epochs of 300 -> round(0.33) = 0 -> 1; 20 teacher-temperature epochs -> round(0.67) = 1
    assert (official.freeze_last_layer_epochs, official.warmup_epochs, official.warmup_teacher_temp_epochs) == (1, 1, 1)
    cads = PretrainConfig.create('D', method='cads', recipe='official', epochs=75)   # of CADS's 150
    assert (cads.freeze_last_layer_epochs, cads.warmup_epochs, cads.warmup_teacher_temp_epochs) == (2, 5, 25)
    # given values win over recipe and scaling
    given = PretrainConfig.create('D', epochs=10, teacher_temp=0.05, freeze_last_layer_epochs=0)
    assert given.teacher_temp == 0.05 and given.freeze_last_layer_epochs == 0
