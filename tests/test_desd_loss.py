"""DeSD loss and projection head, checked against values worked out by hand."""
import math

import pytest
import torch

from nnunetv2_desd.pretraining.heads import ProjectionHead, RunningBatchNorm1d, global_average_pool
from nnunetv2_desd.pretraining.losses import DeepSelfDistillationLoss, sinkhorn_knopp
from nnunetv2_desd.pretraining.methods.desd import cross_view_pairs

LN2, LN3 = math.log(2), math.log(3)
TAU_S = 0.1


def softmax(values, temp):
    exps = [math.exp(v / temp) for v in values]
    return [e / sum(exps) for e in exps]


def cross_entropy(p, q):
    return -sum(pk * math.log(qk) for pk, qk in zip(p, q))


def test_cross_view_pairs():
    assert cross_view_pairs(2) == [(0, 1), (1, 0)]
    assert cross_view_pairs(3) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]


def test_closed_form_single_pair():
    # student s/tau_s = [ln2, 0, 0] -> q = [1/2, 1/4, 1/4]; teacher t/tau_t = [ln3, 0, 0] -> p = [3/5, 1/5, 1/5]
    # H(p, q) = 3/5 ln2 + 2/5 * 2 ln2 = 7/5 ln2; both pairs see the same numbers
    loss_fn = DeepSelfDistillationLoss(out_dim=3)
    student = torch.tensor([TAU_S * LN2, 0.0, 0.0]).expand(1, 2, 1, 3)
    teacher = torch.tensor([0.04 * LN3, 0.0, 0.0]).expand(2, 1, 3)
    loss = loss_fn(student, teacher, teacher_temp=0.04, pairs=[(0, 1), (1, 0)])
    assert loss.item() == pytest.approx(7 / 5 * LN2, rel=1e-5)


def test_teacher_temperature_and_centre_subtraction():
    student = torch.tensor([TAU_S * LN2, 0.0, 0.0]).expand(1, 2, 1, 3)
    teacher = torch.tensor([0.08 * LN3, 0.0, 0.0]).expand(2, 1, 3)
    # tau_t = 0.08, centre 0: (t - c) / tau_t = [ln3, 0, 0] -> 7/5 ln2
    assert DeepSelfDistillationLoss(3)(student, teacher, 0.08, cross_view_pairs(2)).item() == \
        pytest.approx(7 / 5 * LN2, rel=1e-5)
    # tau_t = 0.04, centre [0.04 ln3, 0, 0]: (t - c) / tau_t = [ln3, 0, 0] again -> 7/5 ln2
    loss_fn = DeepSelfDistillationLoss(3)
    loss_fn.center.copy_(torch.tensor([[0.04 * LN3, 0.0, 0.0]]))
    assert loss_fn(student, teacher, 0.04, cross_view_pairs(2)).item() == pytest.approx(7 / 5 * LN2, rel=1e-5)
    # tau_t = 0.04, centre 0: (t - c) / tau_t = [2 ln3, 0, 0] -> p = [9/11, 1/11, 1/11]
    expected = 9 / 11 * LN2 + 2 / 11 * 2 * LN2
    assert DeepSelfDistillationLoss(3)(student, teacher, 0.04, cross_view_pairs(2)).item() == \
        pytest.approx(expected, rel=1e-5)


def test_mean_over_depths_pairs_and_batch():
    # depth 0, student view 1 -> q = [1/2, 1/4, 1/4]; every other student input uniform (logits 0)
    # teacher view 0 -> p = [3/5, 1/5, 1/5], teacher view 1 uniform
    student = torch.zeros(2, 2, 2, 3)
    student[0, 1, :, 0] = TAU_S * LN2
    teacher = torch.zeros(2, 2, 3)
    teacher[0, :, 0] = 0.04 * LN3
    # depth 0: pair (0,1) -> 7/5 ln2, pair (1,0) -> H(u, u) = ln3
    # depth 1: pair (0,1) -> H(p, u) = ln3, pair (1,0) -> ln3
    expected = ((7 / 5 * LN2 + LN3) / 2 + LN3) / 2
    loss = DeepSelfDistillationLoss(3)(student, teacher, 0.04, cross_view_pairs(2))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # a sample-dependent batch: second sample's teacher view 0 uniform -> its pair (0,1) at depth 0 gives
    # H(u, [1/2, 1/4, 1/4]) = (ln2 + 2 ln4) / 3 = 5/3 ln2
    teacher[0, 1, 0] = 0.0
    expected_b1 = ((5 / 3 * LN2 + LN3) / 2 + LN3) / 2
    loss = DeepSelfDistillationLoss(3)(student, teacher, 0.04, cross_view_pairs(2))
    assert loss.item() == pytest.approx((expected + expected_b1) / 2, rel=1e-5)


def test_cads_pairs_three_student_inputs():
    s = [[[0.3, -0.2, 0.1]], [[-0.5, 0.4, 0.0]], [[0.2, 0.2, -0.6]]]  # (S=3, B=1, K=3), D=1
    t = [[[0.05, -0.02, 0.01]], [[-0.03, 0.04, 0.0]]]                 # (T=2, B=1, K=3)
    centre, tau_t = [0.01, 0.0, -0.01], 0.05
    pairs = [(0, 1), (0, 2), (1, 0), (1, 2)]
    p = [softmax([tk - ck for tk, ck in zip(t[a][0], centre)], tau_t) for a in range(2)]
    q = [softmax(s[b][0], TAU_S) for b in range(3)]
    expected = sum(cross_entropy(p[a], q[b]) for a, b in pairs) / 4
    loss_fn = DeepSelfDistillationLoss(3)
    loss_fn.center.copy_(torch.tensor([centre]))
    loss = loss_fn(torch.tensor([s]), torch.tensor(t), tau_t, pairs)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the (2, *) pairs that DeSD's all-pairs rule would add are not there: a different value
    assert loss_fn(torch.tensor([s]), torch.tensor(t), tau_t, [(0, 2)]).item() != pytest.approx(expected, rel=1e-3)


def test_centre_update_is_ema_of_teacher_batch_mean():
    loss_fn = DeepSelfDistillationLoss(3, center_momentum=0.9)
    loss_fn.center.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    teacher = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], [[0.0, 4.0, 2.0], [4.0, 0.0, 2.0]]])  # (2, 2, 3)
    loss_fn(torch.zeros(1, 2, 2, 3), teacher, 0.04, cross_view_pairs(2))
    # row mean = [2, 2, 2]; 0.9 * [1, 0, -1] + 0.1 * [2, 2, 2] = [1.1, 0.2, -0.7]
    assert loss_fn.center.tolist()[0] == pytest.approx([1.1, 0.2, -0.7], rel=1e-6)


def test_gradient_reaches_student_only_and_float32():
    student = torch.randn(2, 2, 3, 5, dtype=torch.float16, requires_grad=True)
    teacher = torch.randn(2, 3, 5, dtype=torch.float16, requires_grad=True)
    loss = DeepSelfDistillationLoss(5)(student, teacher, 0.04, cross_view_pairs(2))
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_bad_pairs_or_shapes_raise():
    loss_fn = DeepSelfDistillationLoss(3)
    with pytest.raises(ValueError):
        loss_fn(torch.zeros(1, 2, 1, 3), torch.zeros(2, 1, 3), 0.04, [(0, 2)])
    with pytest.raises(ValueError):
        loss_fn(torch.zeros(1, 2, 1, 3), torch.zeros(2, 1, 4), 0.04, [(0, 1)])


def test_projection_head_shapes_and_prototype_normalisation():
    torch.manual_seed(0)
    head = ProjectionHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=6).eval()
    x = torch.randn(4, 8)
    out = head(x)
    assert out.shape == (4, 5) and out.abs().max() <= 1 + 1e-6  # cosine similarities
    with torch.no_grad():
        head.prototypes.mul_(3.7)
    assert torch.allclose(head(x), out, atol=1e-6)
    assert head.prototypes.shape == (5, 6)
    head.prototypes.grad = torch.ones_like(head.prototypes)
    head.cancel_prototype_gradients(epoch=1, frozen_epochs=1)  # the last layer's parameter, frozen no more
    assert head.prototypes.grad is not None
    head.cancel_prototype_gradients(epoch=0, frozen_epochs=1)
    assert head.prototypes.grad is None
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules()) == 2
    assert all(m.bias.abs().sum() == 0 for m in head.modules() if isinstance(m, torch.nn.Linear))


def test_projection_head_without_bn_takes_one_sample():
    head = ProjectionHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=6, norm='none')
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in head.modules())
    assert head(torch.randn(1, 8)).shape == (1, 5)
    single = ProjectionHead(8, out_dim=5, bottleneck_dim=6, n_layers=1)
    assert [type(m) for m in single.mlp] == [torch.nn.Linear]


def test_global_average_pool():
    fmap = torch.arange(2 * 3 * 2 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2, 2)
    assert global_average_pool(fmap)[0].tolist() == [3.5, 11.5, 19.5]
    assert global_average_pool(torch.ones(2, 4, 3, 3)).shape == (2, 4)


def test_entropy_and_kl_diagnostics_by_hand():
    # teacher p = [3/5, 1/5, 1/5] (both views), student q = [1/2, 1/4, 1/4] (both inputs)
    # H(p) = -(3/5 ln 3/5 + 2/5 ln 1/5), H(q) = 1/2 ln 2 + 1/2 ln 4 = 3/2 ln 2, KL(p||q) = H(p, q) - H(p)
    loss_fn = DeepSelfDistillationLoss(out_dim=3)
    student = torch.tensor([TAU_S * LN2, 0.0, 0.0]).expand(1, 2, 1, 3)
    teacher = torch.tensor([0.04 * LN3, 0.0, 0.0]).expand(2, 1, 3)
    loss = loss_fn(student, teacher, teacher_temp=0.04, pairs=cross_view_pairs(2))
    h_p = -(3 / 5 * math.log(3 / 5) + 2 / 5 * math.log(1 / 5))
    d = loss_fn.diagnostics
    assert d['teacher_entropy'].item() == pytest.approx(h_p, rel=1e-5)
    assert d['student_entropy'].item() == pytest.approx(1.5 * LN2, rel=1e-5)
    assert d['kl_teacher_student'].item() == pytest.approx(7 / 5 * LN2 - h_p, rel=1e-4)
    assert loss.item() == pytest.approx(h_p + d['kl_teacher_student'].item(), rel=1e-6)


def test_uniform_student_scores_ln_k_and_diagnostics_tell_collapse():
    # a uniform student against a one-hot-like teacher: loss ln K, student entropy ln K, teacher entropy ~ 0
    k = 5
    loss_fn = DeepSelfDistillationLoss(out_dim=k)
    teacher = torch.zeros(2, 3, k)
    teacher[..., 2] = 10.0   # /0.04: every other prototype ~ e^-250
    loss = loss_fn(torch.zeros(2, 2, 3, k), teacher, 0.04, cross_view_pairs(2))
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)
    assert loss_fn.diagnostics['student_entropy'].item() == pytest.approx(math.log(k), rel=1e-6)
    assert loss_fn.diagnostics['teacher_entropy'].item() == pytest.approx(0.0, abs=1e-6)
    assert loss_fn.diagnostics['kl_teacher_student'].item() == pytest.approx(math.log(k), rel=1e-5)


def test_sinkhorn_knopp_by_hand_and_its_marginals():
    # one iteration on exp(scores) = [[e, 1], [1, 1]] (N = K = 2): columns -> mass 1/2 each,
    # column 0: [e, 1] / (e + 1) / 2, column 1: [1/4, 1/4]; then rows to 1
    e = math.e
    a, b = e / (e + 1) / 2, 1 / (e + 1) / 2
    expected = torch.tensor([[a / (a + 0.25), 0.25 / (a + 0.25)], [b / (b + 0.25), 0.25 / (b + 0.25)]])
    q = sinkhorn_knopp(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), n_iters=1)
    assert torch.allclose(q, expected, atol=1e-6)
    # converged: every row sums to 1, every column to N / K, whatever the scores (even ones exp underflows on)
    q = sinkhorn_knopp(torch.tensor([[200.0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, -300]]), 500)
    assert torch.allclose(q.sum(1), torch.ones(6), atol=1e-5) and torch.allclose(q.sum(0), torch.full((3,), 2.0),
                                                                                  atol=1e-3)


def test_sinkhorn_targets_use_a_fifo_queue_of_teacher_rows():
    loss_fn = DeepSelfDistillationLoss(out_dim=3, queue_size=6)
    first, second = torch.randn(2, 2, 3), torch.randn(2, 2, 3)
    loss_fn(torch.zeros(1, 2, 2, 3), first, 0.5, cross_view_pairs(2))
    assert int(loss_fn.queue_filled) == 4 and torch.equal(loss_fn.queue[2:], first.reshape(4, 3))
    targets = loss_fn.teacher_targets(second, 0.5)
    # the 4 queued rows of the first batch, then the batch: its rows of the equipartition over all 8
    expected = sinkhorn_knopp(torch.cat([first.reshape(4, 3), second.reshape(4, 3)]) / 0.5)[4:]
    assert torch.allclose(targets.reshape(4, 3), expected, atol=1e-6)
    assert int(loss_fn.queue_filled) == 6   # full: the oldest 2 rows dropped
    assert torch.equal(loss_fn.queue, torch.cat([first.reshape(4, 3)[2:], second.reshape(4, 3)]))
    # a uniform student still scores ln K against any target
    assert loss_fn(torch.zeros(1, 2, 2, 3), second, 0.5, cross_view_pairs(2)).item() == pytest.approx(LN3, rel=1e-6)


def test_running_batch_norm_uses_bias_corrected_running_statistics():
    norm = RunningBatchNorm1d(1, momentum=0.5, eps=0.0)
    x1, x2 = torch.tensor([[1.0], [3.0]]), torch.tensor([[5.0], [9.0]])
    # step 1: mean 2, var 1; bias-corrected EMA = the batch's own -> (x - 2) / 1
    assert norm(x1).flatten().tolist() == pytest.approx([-1.0, 1.0])
    # step 2: running mean (0.25 * 2 + 0.5 * 7) / 0.75 = 16/3, var (0.25 * 1 + 0.5 * 4) / 0.75 = 3
    y = norm(x2).flatten()
    assert y.tolist() == pytest.approx([(5 - 16 / 3) / math.sqrt(3), (9 - 16 / 3) / math.sqrt(3)], rel=1e-5)
    # eval: the same statistics, none updated
    norm.eval()
    assert norm(x2).flatten().tolist() == pytest.approx(y.tolist()) and int(norm.steps) == 2
    # four near-identical rows: batch norm blows the differences up to +-1, the running statistics keep them small
    rows = torch.tensor([[1.0], [1.1], [1.0], [1.1]])
    assert torch.nn.BatchNorm1d(1)(rows).abs().min() > 0.99
    running = RunningBatchNorm1d(1, momentum=0.5)
    running(torch.tensor([[0.0], [2.0]]))
    assert running(rows).std() < 0.1   # (0.05 / sqrt(0.335), by the formula above)
