"""DeSD's loss in the CADS configuration (student [view 1, view 2, DRR], teacher [view 1, view 2]), by hand.

Complements tests/test_desd_loss.py (D = B = 1 there): here D = 2 depths and B = 2 samples, which pairs enter,
where the gradient goes, and which rows the centre averages.
"""
import math

import pytest
import torch

from nnunetv2_desd.pretraining.losses import DeepSelfDistillationLoss
from nnunetv2_desd.pretraining.methods.cads import CADS_PAIRS

LN2, LN3 = math.log(2), math.log(3)
TAU_S = 0.1
PAIRS = [(0, 1), (0, 2), (1, 0), (1, 2)]  # (teacher view, student input); student 2 is the DRR

# explicit logits, K = 3: student (D=2, S=3, B=2, K), teacher (T=2, B=2, K)
STUDENT = [[[[0.30, -0.20, 0.10], [0.05, 0.15, -0.25]],     # depth 0: view 1
            [[-0.50, 0.40, 0.00], [0.20, -0.10, 0.35]],     #          view 2
            [[0.20, 0.20, -0.60], [-0.30, 0.45, 0.10]]],    #          DRR
           [[[0.10, 0.00, -0.10], [-0.40, 0.25, 0.30]],     # depth 1: view 1
            [[0.60, -0.35, 0.05], [0.00, 0.00, 0.20]],      #          view 2
            [[-0.15, 0.50, -0.20], [0.25, -0.05, -0.45]]]]  #          DRR
TEACHER = [[[0.050, -0.020, 0.010], [-0.010, 0.030, 0.000]],  # teacher view 1
           [[-0.030, 0.040, 0.000], [0.020, 0.010, -0.040]]]  # teacher view 2
CENTRE, TAU_T = [0.010, 0.000, -0.010], 0.05


def softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def cross_entropy(p, q):
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q))


def targets(teacher, centre, tau_t):
    """P_t[a][b] = softmax((t - c) / tau_t)."""
    return [[softmax([tk - ck for tk, ck in zip(row, centre)], tau_t) for row in view] for view in teacher]


def expected_loss(student, teacher, centre, tau_t):
    """mean over depths d, the 4 CADS pairs (a, s) and samples b of H(P_t[a][b], softmax(student[d][s][b] / tau_s))."""
    p = targets(teacher, centre, tau_t)
    terms = [cross_entropy(p[a][b], softmax(student[d][s][b], TAU_S))
             for d in range(len(student)) for a, s in PAIRS for b in range(len(teacher[0]))]
    return sum(terms) / len(terms)


def cads_loss(student, teacher, centre=CENTRE, tau_t=TAU_T, momentum=0.9):
    loss_fn = DeepSelfDistillationLoss(3, center_momentum=momentum)
    loss_fn.center.copy_(torch.tensor([centre], dtype=torch.float64))
    return loss_fn(torch.as_tensor(student, dtype=torch.float64), torch.as_tensor(teacher, dtype=torch.float64),
                   tau_t, PAIRS), loss_fn


def test_pairs_match_the_cads_method():
    assert list(CADS_PAIRS) == PAIRS


def test_closed_form_two_depths_two_samples():
    # q_A = [1/2, 1/4, 1/4] (logits tau_s [ln2, 0, 0]), q_B, q_C likewise on k = 1, 2; u uniform (logits 0):
    # H(p, q_A) = (2 - p_0) ln2, H(p, q_B) = (2 - p_1) ln2, H(p, q_C) = (2 - p_2) ln2, H(p, u) = ln3
    qa, qb, qc, u = ([TAU_S * LN2, 0, 0], [0, TAU_S * LN2, 0], [0, 0, TAU_S * LN2], [0, 0, 0])
    c, tau_t = [0.03, -0.02, 0.01], 0.05
    # targets (t - c) / tau_t: P00 = [3/5, 1/5, 1/5], P01 = u, P10 = [1/6, 2/3, 1/6], P11 = [1/5, 1/5, 3/5]
    teacher = [[[c[0] + tau_t * LN3, c[1], c[2]], c],
               [[c[0], c[1] + tau_t * math.log(4), c[2]], [c[0], c[1], c[2] + tau_t * LN3]]]
    student = [[[qb, qc], [qa, u], [qc, qa]],   # depth 0: view 1 (b0, b1), view 2, DRR
               [[u, qa], [qc, qb], [qb, u]]]    # depth 1
    terms = [  # pairs (0,1), (0,2), (1,0), (1,2) per depth and sample
        7 / 5 * LN2, 9 / 5 * LN2, 4 / 3 * LN2, 11 / 6 * LN2,  # d0 b0: H(P00,qA) H(P00,qC) H(P10,qB) H(P10,qC)
        LN3, 5 / 3 * LN2, 7 / 5 * LN2, 9 / 5 * LN2,           # d0 b1: H(u,u) H(u,qA) H(P11,qC) H(P11,qA)
        9 / 5 * LN2, 9 / 5 * LN2, LN3, 4 / 3 * LN2,           # d1 b0: H(P00,qC) H(P00,qB) H(P10,u) H(P10,qB)
        5 / 3 * LN2, LN3, 9 / 5 * LN2, LN3,                   # d1 b1: H(u,qB) H(u,u) H(P11,qA) H(P11,u)
    ]
    loss, _ = cads_loss(student, teacher, c, tau_t)
    assert loss.item() == pytest.approx(sum(terms) / 16, rel=1e-6)
    # same-index pairs (0,0), (1,1) would add H(P0b, view 1) and H(P1b, view 2): a different mean
    same_index = [9 / 5 * LN2, 11 / 6 * LN2,  # d0 b0: H(P00,qB) H(P10,qA)
                  5 / 3 * LN2, LN3,           # d0 b1: H(u,qC) H(P11,u)
                  LN3, 11 / 6 * LN2,          # d1 b0: H(P00,u) H(P10,qC)
                  5 / 3 * LN2, 9 / 5 * LN2]   # d1 b1: H(u,qA) H(P11,qB)
    assert loss.item() != pytest.approx((sum(terms) + sum(same_index)) / 24, rel=1e-3)


def test_general_numbers_softmax_with_centre_and_temperatures():
    p00 = [math.exp((0.050 - 0.010) / TAU_T), math.exp(-0.020 / TAU_T), math.exp((0.010 + 0.010) / TAU_T)]
    p00 = [v / sum(p00) for v in p00]  # teacher view 1, sample 0, written out
    assert targets(TEACHER, CENTRE, TAU_T)[0][0] == pytest.approx(p00, rel=1e-12)
    q = [math.exp(v / TAU_S) for v in STUDENT[0][1][0]]  # depth 0, view 2, sample 0
    first_term = -sum(pk * math.log(qk / sum(q)) for pk, qk in zip(p00, q))
    assert cross_entropy(p00, softmax(STUDENT[0][1][0], TAU_S)) == pytest.approx(first_term, rel=1e-12)
    loss, _ = cads_loss(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(expected_loss(STUDENT, TEACHER, CENTRE, TAU_T), rel=1e-6)
    # the teacher temperature and the centre both matter
    assert cads_loss(STUDENT, TEACHER, tau_t=0.07)[0].item() == \
        pytest.approx(expected_loss(STUDENT, TEACHER, CENTRE, 0.07), rel=1e-6)
    assert cads_loss(STUDENT, TEACHER, centre=[0, 0, 0])[0].item() == \
        pytest.approx(expected_loss(STUDENT, TEACHER, [0, 0, 0], TAU_T), rel=1e-6)
    assert expected_loss(STUDENT, TEACHER, [0, 0, 0], TAU_T) != pytest.approx(loss.item(), rel=1e-4)


@pytest.mark.parametrize("student_input, teachers", [(0, [1]), (1, [0]), (2, [0, 1])])
def test_perturbing_one_student_input_changes_exactly_its_pairs(student_input, teachers):
    # view 1 is distilled from teacher view 2 only (no (0,0)), view 2 from teacher view 1 only (no (1,1)),
    # the DRR from both teacher views; perturbing depth 1, sample 0 changes those terms and nothing else
    new_logits = [0.9, -0.7, 0.2]
    perturbed = [[[list(row) for row in inp] for inp in depth] for depth in STUDENT]
    perturbed[1][student_input][0] = new_logits
    p = targets(TEACHER, CENTRE, TAU_T)
    old_q, new_q = softmax(STUDENT[1][student_input][0], TAU_S), softmax(new_logits, TAU_S)
    change = sum(cross_entropy(p[a][0], new_q) - cross_entropy(p[a][0], old_q) for a in teachers) / 16
    delta = cads_loss(perturbed, TEACHER)[0].item() - cads_loss(STUDENT, TEACHER)[0].item()
    assert delta == pytest.approx(change, rel=1e-5, abs=1e-6)
    # the pairs that must stay out would have changed the loss by a clearly different amount
    other = [a for a in (0, 1) if a not in teachers]
    if other:
        wrong = change + (cross_entropy(p[other[0]][0], new_q) - cross_entropy(p[other[0]][0], old_q)) / 16
        assert abs(delta - wrong) > 1e-3


def test_gradient_reaches_every_student_input_drr_included():
    # dL/ds[d, s, b] = sum over the teacher views a paired with s of (q - P_a[b]) / (tau_s * 16)
    student = torch.tensor(STUDENT, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(TEACHER, dtype=torch.float64, requires_grad=True)
    loss_fn = DeepSelfDistillationLoss(3)
    loss_fn.center.copy_(torch.tensor([CENTRE]))
    loss_fn(student, teacher, TAU_T, PAIRS).backward()
    assert teacher.grad is None
    p = targets(TEACHER, CENTRE, TAU_T)
    paired = {0: [1], 1: [0], 2: [0, 1]}
    for d in range(2):
        for s in range(3):
            for b in range(2):
                q = softmax(STUDENT[d][s][b], TAU_S)
                grad = [sum(qk - p[a][b][k] for a in paired[s]) / (TAU_S * 16) for k, qk in enumerate(q)]
                assert student.grad[d, s, b].tolist() == pytest.approx(grad, rel=1e-5, abs=1e-6)
    assert student.grad[:, 2].abs().min() > 1e-3  # the DRR branch is trained at every depth


def test_drr_cannot_be_a_teacher():
    # only 2 teacher rows exist: a (DRR, view) pair is out of range, not silently wrapped
    loss_fn = DeepSelfDistillationLoss(3)
    with pytest.raises(ValueError, match="out of range"):
        loss_fn(torch.tensor(STUDENT), torch.tensor(TEACHER), TAU_T, PAIRS + [(2, 0)])


def test_centre_update_uses_teacher_rows_only_then_applies_next_step():
    # mean of the T * B = 4 teacher rows, not of the 3 * 2 student rows (the DRR has no teacher row)
    row_mean = [sum(TEACHER[a][b][k] for a in range(2) for b in range(2)) / 4 for k in range(3)]
    new_centre = [0.9 * c + 0.1 * m for c, m in zip(CENTRE, row_mean)]
    loss, loss_fn = cads_loss(STUDENT, TEACHER)
    assert loss.item() == pytest.approx(expected_loss(STUDENT, TEACHER, CENTRE, TAU_T), rel=1e-6)  # old centre
    assert loss_fn.center.tolist()[0] == pytest.approx(new_centre, rel=1e-6)
    # other student logits (e.g. a different DRR) leave the centre where it was
    shifted = [[[[v + 5.0 for v in row] for row in inp] for inp in depth] for depth in STUDENT]
    _, shifted_fn = cads_loss(shifted, TEACHER)
    assert shifted_fn.center.tolist()[0] == pytest.approx(new_centre, rel=1e-6)
    # the next step's targets use the updated centre
    second = loss_fn(torch.tensor(STUDENT, dtype=torch.float64), torch.tensor(TEACHER, dtype=torch.float64),
                     TAU_T, PAIRS)
    assert second.item() == pytest.approx(expected_loss(STUDENT, TEACHER, new_centre, TAU_T), rel=1e-6)
