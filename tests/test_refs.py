"""ReFs's gradient matching on a two-layer toy network, against values written out by hand.

Toy: a shared linear "encoder" W (2x2) and one linear head per task, a (SSL) and b (reference):

    L_a = 1/2 (a^T W x_a - y_a)^2,   L_b = 1/2 (b^T W x_b - y_b)^2
    dL_a/dW = r_a a x_a^T,  dL_a/da = r_a W x_a,  r_a = a^T W x_a - y_a   (likewise for b)
    cos(g_a, g_b) over W = sign(r_a r_b) cos(a, b) cos(x_a, x_b)
"""
import math

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.func import functional_call

from nnunetv2_desd.benchmarks.refs import RefsComparison, write_refs_comparison
from nnunetv2_desd.benchmarks.timing import Phase, saved_tensors_peak_mib
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.preprocessing_match import preprocessing_differences
from nnunetv2_desd.data.reference import (augmentation_geometry, copied_plans_name,
                                          reference_plans_candidates)
from nnunetv2_desd.pretraining.engine.loop import ARCHITECTURE_KEYS
from nnunetv2_desd.pretraining.gradient_matching import fish_gradients, gradient_cosine
from nnunetv2_desd.pretraining.methods.cads import CADS
from nnunetv2_desd.pretraining.methods.desd import DeSD
from nnunetv2_desd.pretraining.methods.refs import (ReFs, deep_supervision_scales, encoder_stage_of,
                                                    matched_encoder_names, reference_loss)

W0 = [[1.0, 2.0], [0.0, 1.0]]
A0, B0 = [1.0, -1.0], [2.0, 1.0]
XA, YA, XB, YB = [1.0, 0.0], 3.0, [1.0, 1.0], 0.0


class Toy(nn.Module):
    def __init__(self, dtype=torch.float64, nonlinear=False):
        super().__init__()
        self.encoder = nn.Linear(2, 2, bias=False)
        self.head_a = nn.Linear(2, 1, bias=False)
        self.head_b = nn.Linear(2, 1, bias=False)
        self.nonlinear = nonlinear
        with torch.no_grad():
            self.encoder.weight.copy_(torch.tensor(W0))
            self.head_a.weight.copy_(torch.tensor([A0]))
            self.head_b.weight.copy_(torch.tensor([B0]))
        self.to(dtype)

    def features(self, x):
        h = self.encoder(x)
        return torch.tanh(h) if self.nonlinear else h

    def loss_a(self):
        return 0.5 * (self.head_a(self.features(torch.tensor(XA, dtype=torch.float64)))[0] - YA) ** 2

    def loss_b(self):
        return 0.5 * (self.head_b(self.features(torch.tensor(XB, dtype=torch.float64)))[0] - YB) ** 2


def test_gradient_cosine_of_known_gradients():
    toy = Toy()
    # by hand: W x_a = (1, 0), r_a = 1 - 3 = -2; W x_b = (3, 1), r_b = 6 + 1 - 0 = 7
    # g_a = -2 (1, -1)^T (1, 0) = [[-2, 0], [2, 0]];  g_b = 7 (2, 1)^T (1, 1) = [[14, 14], [7, 7]]
    # <g_a, g_b> = -28 + 14 = -14;  |g_a| = sqrt(8);  |g_b| = sqrt(490)
    expected = -14 / (math.sqrt(8) * math.sqrt(490))
    assert expected == pytest.approx(-1 / math.sqrt(20))  # sign(r_a r_b) cos(a, b) cos(x_a, x_b)
    cosine = gradient_cosine(toy.loss_a(), toy.loss_b(), [toy.encoder.weight], create_graph=False)
    assert cosine.item() == pytest.approx(expected, rel=1e-6)
    # AMP multiplies the losses by its scale: the cosine does not change
    scaled = gradient_cosine(1024 * toy.loss_a(), 1024 * toy.loss_b(), [toy.encoder.weight], create_graph=False)
    assert scaled.item() == pytest.approx(expected, rel=1e-6)
    # a parameter only one loss reaches adds zeros to the other gradient: |g_a| grows by |dL_a/da|, <.,.> does not
    with_head = gradient_cosine(toy.loss_a(), toy.loss_b(), [toy.encoder.weight, toy.head_a.weight],
                                create_graph=False)
    # dL_a/da = r_a W x_a = -2 (1, 0) -> |g_a|^2 = 8 + 4
    assert with_head.item() == pytest.approx(-14 / (math.sqrt(12) * math.sqrt(490)), rel=1e-6)


def test_matching_term_gradient_by_hand():
    """d/dtheta of lambda (1 - cos): zero for W (cos depends on W only through sign(r_a r_b)), closed form for
    the heads: d cos(a, b) / da = b / (|a||b|) - (a.b) a / (|a|^3 |b|)."""
    toy = Toy()
    weight = 0.7
    loss = weight * (1 - gradient_cosine(toy.loss_a(), toy.loss_b(), [toy.encoder.weight]))  # the matching term
    grads = torch.autograd.grad(loss, [toy.encoder.weight, toy.head_a.weight, toy.head_b.weight])
    a, b, xa, xb = (np.array(v) for v in (A0, B0, XA, XB))
    sign, cos_x = -1.0, xa @ xb / (np.linalg.norm(xa) * np.linalg.norm(xb))   # r_a r_b = -14 < 0
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    d_cos_da = sign * cos_x * (b / (na * nb) - (a @ b) * a / (na ** 3 * nb))
    d_cos_db = sign * cos_x * (a / (na * nb) - (a @ b) * b / (na * nb ** 3))
    assert loss.item() == pytest.approx(weight * (1 + 1 / math.sqrt(20)), rel=1e-9)
    np.testing.assert_allclose(grads[0].numpy(), np.zeros((2, 2)), atol=1e-12)
    np.testing.assert_allclose(grads[1].numpy()[0], -weight * d_cos_da, rtol=1e-9)
    np.testing.assert_allclose(grads[2].numpy()[0], -weight * d_cos_db, rtol=1e-9)
    np.testing.assert_allclose(-d_cos_da, [1.5 / math.sqrt(20)] * 2, rtol=1e-9)  # the numbers written out


def test_matching_term_gradient_through_a_nonlinear_encoder_matches_finite_differences():
    """With tanh the cosine depends on W itself: the double backward equals central differences of the value."""
    toy = Toy(nonlinear=True)
    w = toy.encoder.weight
    grad, = torch.autograd.grad(1 - gradient_cosine(toy.loss_a(), toy.loss_b(), [w]), [w])
    assert grad.abs().max() > 1e-3
    numeric = torch.zeros_like(w)
    eps = 1e-6
    for i in range(2):
        for j in range(2):
            values = []
            for sign in (1, -1):
                with torch.no_grad():
                    w[i, j] += sign * eps
                values.append(gradient_cosine(toy.loss_a(), toy.loss_b(), [w], create_graph=False).item())
                with torch.no_grad():
                    w[i, j] -= sign * eps
            numeric[i, j] = -(values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(grad, numeric, rtol=1e-5, atol=1e-8)


class _Bound(nn.Module):
    """toy.<loss>() as a module call, so that functional_call can evaluate it at other parameter values."""

    def __init__(self, toy, loss):
        super().__init__()
        self.toy, self.loss = toy, loss

    def forward(self):
        return getattr(self.toy, self.loss)()


def _toy_losses(toy, weight_b):
    """The parameters by name, and L_a, weight_b * L_b as functions of parameter values (as Fish needs them)."""
    def at(loss, weight):
        bound = _Bound(toy, loss)
        return lambda theta: weight * functional_call(bound, {'toy.' + n: v for n, v in theta.items()}, ())
    return dict(toy.named_parameters()), [at('loss_a', 1.0), at('loss_b', weight_b)]


def test_fish_outer_step_equals_the_written_out_inner_steps():
    alpha, weight_b, eta = 0.1, 0.5, 0.05
    toy = Toy()
    params, losses = _toy_losses(toy, weight_b)
    grads, cosine, finite = fish_gradients(params, losses, alpha, match=['encoder.weight'])
    assert finite
    for name, p in params.items():
        p.grad = grads[name]
    torch.optim.SGD(list(params.values()), lr=eta).step()  # plain SGD: Fish's meta step eps = eta / alpha

    # by hand, in numpy: theta_1 = theta_0 - alpha g_a(theta_0); theta_2 = theta_1 - alpha lambda g_b(theta_1)
    W, a, b = np.array(W0), np.array(A0), np.array(B0)
    xa, xb = np.array(XA), np.array(XB)
    r_a = a @ W @ xa - YA
    g1 = {'W': r_a * np.outer(a, xa), 'a': r_a * W @ xa, 'b': np.zeros(2)}
    W1, a1, b1 = W - alpha * g1['W'], a - alpha * g1['a'], b - alpha * g1['b']
    r_b = b1 @ W1 @ xb - YB
    g2 = {'W': weight_b * r_b * np.outer(b1, xb), 'a': np.zeros(2), 'b': weight_b * r_b * W1 @ xb}
    W2, a2, b2 = W1 - alpha * g2['W'], a1 - alpha * g2['a'], b1 - alpha * g2['b']
    eps = eta / alpha
    np.testing.assert_allclose(toy.encoder.weight.detach().numpy(), W + eps * (W2 - W), rtol=1e-12)
    np.testing.assert_allclose(toy.head_a.weight.detach().numpy()[0], a + eps * (a2 - a), rtol=1e-12)
    np.testing.assert_allclose(toy.head_b.weight.detach().numpy()[0], b + eps * (b2 - b), rtol=1e-12)
    # the heads got their own task's gradient only: b's at the inner point theta_1
    np.testing.assert_allclose(grads['head_b.weight'].numpy()[0], g2['b'], rtol=1e-12)
    expected_cos = (g1['W'] * g2['W']).sum() / (np.linalg.norm(g1['W']) * np.linalg.norm(g2['W']))
    assert cosine.item() == pytest.approx(expected_cos, rel=1e-9)


def test_fish_averaged_over_orders_follows_the_inner_product_gradient():
    """E_order[G] = grad(L_a + L_b) - (alpha / 2) grad(g_a . g_b) + O(alpha^2) (the Fish paper's claim)."""
    alpha = 1e-3
    toy = Toy(nonlinear=True)
    params, (la, lb) = _toy_losses(toy, 1.0)
    forward, _, _ = fish_gradients(params, [la, lb], alpha)
    backward, _, _ = fish_gradients(params, [lb, la], alpha)
    mean = {n: (forward[n] + backward[n]) / 2 for n in params}
    plist = list(params.values())
    ga = torch.autograd.grad(la(params), plist, create_graph=True, materialize_grads=True)
    gb = torch.autograd.grad(lb(params), plist, create_graph=True, materialize_grads=True)
    objective = la(params) + lb(params) - alpha / 2 * sum((x * y).sum() for x, y in zip(ga, gb))
    target = dict(zip(params, torch.autograd.grad(objective, plist, materialize_grads=True)))
    first_order = dict(zip(params, torch.autograd.grad(la(params) + lb(params), plist)))
    for n in params:
        assert (mean[n] - target[n]).abs().max() < 1e-5
    # and the matching term is really there: without it the error is of order alpha, not alpha^2
    assert max((mean[n] - first_order[n]).abs().max() for n in params) > 10 * max(
        (mean[n] - target[n]).abs().max() for n in params)


def test_fish_evaluates_every_loss_after_a_non_finite_gradient_but_takes_no_inner_step():
    # every process must issue the same collectives (the SSL loss all-reduces its centre), so the second loss is
    # still evaluated: at the original parameters, since the overflowing inner step is not taken
    toy = Toy()
    params, (la, lb) = _toy_losses(toy, 1.0)
    seen = []

    def overflow(theta):
        return la(theta) * float('inf')

    def second(theta):
        seen.append({n: t.detach().clone() for n, t in theta.items()})
        return lb(theta)

    grads, cosine, finite = fish_gradients(params, [overflow, second], 0.1, 1.0, match=['encoder.weight'])
    assert not finite and torch.isnan(cosine) and len(seen) == 1  # no cosine reported
    assert all(torch.equal(seen[0][n], p.detach()) for n, p in params.items())
    assert not torch.isfinite(grads['encoder.weight']).all()


def test_fish_under_a_loss_scale_takes_the_unscaled_inner_steps():
    # AMP hands Fish the losses times S (loss_scale S != 1): the inner steps must use g / S, so G comes out as
    # S times the unscaled G (what the scaler then divides by S again)
    toy = Toy()
    params, (la, lb) = _toy_losses(toy, 0.5)
    plain, _, _ = fish_gradients(params, [la, lb], 0.3, 1.0)
    scale = 1024.0
    scaled, _, finite = fish_gradients(params, [lambda t: scale * la(t), lambda t: scale * lb(t)], 0.3, scale)
    assert finite
    for name in plain:
        torch.testing.assert_close(scaled[name], scale * plain[name], rtol=1e-10, atol=0)
    # treating the scaled gradients as unscaled would take an inner step 1024 times too long: a different G
    wrong, _, _ = fish_gradients(params, [lambda t: scale * la(t), lambda t: scale * lb(t)], 0.3, 1.0)
    assert not torch.allclose(wrong['encoder.weight'], scale * plain['encoder.weight'])


def test_matched_encoder_stages():
    net = PlainConvUNet(1, 3, [4, 8, 8], nn.Conv3d, 3, [1, 2, 2], 1, 2, 1, True, nn.InstanceNorm3d,
                        {'affine': True}, None, None, nn.LeakyReLU, {}, deep_supervision=True)
    every = matched_encoder_names(net.encoder, 3, None)
    assert every == [n for n, _ in net.encoder.named_parameters()]
    deepest = matched_encoder_names(net.encoder, 3, 1)
    assert deepest and all(n.startswith('stages.2.') for n in deepest)
    assert set(matched_encoder_names(net.encoder, 3, 2)) == {n for n in every if not n.startswith('stages.0.')}
    assert encoder_stage_of('stem.convs.0.conv.weight') == 0
    with pytest.raises(DesdError, match='no stage'):
        encoder_stage_of('head.weight')
    with pytest.raises(DesdError, match='1..3'):
        matched_encoder_names(net.encoder, 3, 4)


def test_refs_declares_its_resume_key_and_the_engine_adds_it():
    assert ReFs.resume_keys == ('reference',) and DeSD.resume_keys == () and CADS.resume_keys == ()
    assert 'reference' not in ARCHITECTURE_KEYS


def test_deep_supervision_scales_and_reference_loss():
    assert deep_supervision_scales([[1, 1, 1], [2, 2, 2], [2, 2, 1]]) == [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]]

    class Labels:  # the LabelManager fields the loss reads
        has_regions, ignore_label = False, None
    loss = reference_loss(Labels(), batch_dice=False, num_outputs=3)
    assert loss.weight_factors == pytest.approx((1 / 1.5, 0.5 / 1.5, 0.0))
    # confident, correct 2-class outputs: CE ~ 0 and nnU-Net's Dice loss -dice ~ -1, at every used scale
    target = torch.zeros(1, 1, 4, 4, 4)
    target[..., :2] = 1
    logits = torch.cat([(1 - target) * 40 - 20, target * 40 - 20], dim=1)
    outputs = [logits, logits[..., ::2, ::2, ::2], logits[..., ::4, ::4, ::4]]
    targets = [target, target[..., ::2, ::2, ::2], target[..., ::4, ::4, ::4]]
    assert loss(outputs, targets).item() == pytest.approx(-1.0, abs=1e-4)
    wrong = [-o for o in outputs]  # confidently wrong: CE ~ 40 per voxel, dice ~ 0
    assert loss(wrong, targets).item() == pytest.approx(40.0, rel=1e-3)


def _plans(spacing, ct_mean=10.0, scheme='CTNormalization'):
    return {'dataset_name': 'Dataset001_X', 'plans_name': 'nnUNetPlans', 'transpose_forward': [0, 1, 2],
            'transpose_backward': [0, 1, 2], 'original_median_spacing_after_transp': spacing,
            'original_median_shape_after_transp': [64, 64, 64], 'image_reader_writer': 'SimpleITKIO',
            'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'mean': ct_mean, 'std': 100.0, 'median': 5.0,
                                                                  'min': -1000.0, 'max': 1000.0,
                                                                  'percentile_00_5': -900.0,
                                                                  'percentile_99_5': 900.0}},
            'configurations': {'3d_fullres': {'data_identifier': 'nnUNetPlans_3d_fullres', 'spacing': spacing,
                                              'normalization_schemes': [scheme], 'use_mask_for_norm': [False],
                                              'patch_size': [32, 32, 32], 'batch_size': 2,
                                              'architecture': {'network_class_name': 'PlainConvUNet',
                                                               'arch_kwargs': {}, '_kw_requires_import': []}}}}


def test_preprocessing_differences_name_what_differs():
    base = _plans([3.0, 3.0, 3.0])
    assert preprocessing_differences(base, _plans([3.0, 3.0, 3.0]), '3d_fullres') == []
    # patch and architecture play no part
    other_patch = _plans([3.0, 3.0, 3.0])
    other_patch['configurations']['3d_fullres']['patch_size'] = [64, 64, 64]
    assert preprocessing_differences(base, other_patch, '3d_fullres') == []
    differences = preprocessing_differences(base, _plans([2.0, 3.0, 3.0], ct_mean=11.0), '3d_fullres')
    assert len(differences) == 2
    assert differences[0] == 'spacing [2.0, 3.0, 3.0] instead of [3.0, 3.0, 3.0]'
    assert differences[1].startswith('CT intensity statistics of channel 0') and '11.0' in differences[1]
    # z-score normalisation does not use the dataset statistics
    assert preprocessing_differences(_plans([3.0] * 3, 1.0, 'ZScoreNormalization'),
                                     _plans([3.0] * 3, 2.0, 'ZScoreNormalization'), '3d_fullres') == []
    assert preprocessing_differences(base, _plans([3.0] * 3, scheme='ZScoreNormalization'), '3d_fullres') == \
        ["normalization_schemes ['ZScoreNormalization'] instead of ['CTNormalization']"]
    assert preprocessing_differences(base, base, '3d_lowres')[0].startswith("no configuration '3d_lowres'")
    other_resampling = _plans([3.0] * 3)
    other_resampling['configurations']['3d_fullres']['resampling_fn_data'] = 'resample_torch_fornnunet'
    assert preprocessing_differences(base, other_resampling, '3d_fullres')[0].startswith('resampling_fn_data')


def test_reference_plans_candidates_and_augmentation_geometry():
    assert copied_plans_name('nnUNetPlans_from502') == 'nnUNetPlans'
    assert reference_plans_candidates('nnUNetPlans_from502') == ['nnUNetPlans_from502', 'nnUNetPlans']
    assert reference_plans_candidates('nnUNetPlans') == ['nnUNetPlans']
    rotation, dummy_2d, initial, mirror = augmentation_geometry([32, 32, 32])
    assert not dummy_2d and rotation == pytest.approx((-math.pi / 6, math.pi / 6)) and mirror == (0, 1, 2)
    assert all(i > 32 for i in initial)  # room for rotation and scaling
    rotation, dummy_2d, initial, _ = augmentation_geometry([8, 64, 64])  # anisotropic: in-plane rotation only
    assert dummy_2d and initial[0] == 8 and rotation == pytest.approx((-math.pi, math.pi))


def test_saved_tensors_peak_counts_what_autograd_holds_at_one_time():
    x = torch.zeros(2 ** 18, requires_grad=True)  # 1 MiB of float32
    w = torch.nn.Parameter(torch.ones(2 ** 18))

    def step():
        for _ in range(2):  # two graphs, one after the other: exp saves its result, mul its other operand
            x.exp().exp().sum().backward()
        (x * w).sum().backward()  # saves x and w; w is excluded as a parameter

    # each exp-exp graph holds 2 MiB until its backward; the mul graph holds x (1 MiB)
    assert saved_tensors_peak_mib(step, [w]) == pytest.approx(2.0)
    assert saved_tensors_peak_mib(lambda: (x * w).sum().backward(), []) == pytest.approx(2.0)  # x and w


def test_refs_benchmark_report(tmp_path):
    phases = {'desd': Phase('desd', 'DeSD', [1.0, 1.2], 100.0),
              'fish': Phase('fish', 'ReFs fish (default)', [2.2], 150.0),
              'cosine': Phase('cosine', 'ReFs cosine, all encoder stages', [4.4], 400.0)}
    result = RefsComparison({'dataset': 'Dataset500_X', 'patch': '32 x 32 x 32', 'device': 'CPU'}, 'process peak RSS',
                            phases, {'desd': 10.0, 'fish': 20.0, 'cosine': 60.0},
                            {'desd': 10.0, 'fish': 30.0, 'cosine': 60.0})
    assert result.step_ratio() == pytest.approx(2.0) and result.step_ratio('cosine') == pytest.approx(4.0)
    text = write_refs_comparison(result, str(tmp_path))
    assert '| ReFs (fish, default) step / DeSD step | 2.000 | <= 2.5 | yes |' in text
    assert '| ReFs cosine, all encoder stages | 4.4 ± 0 | 4.00 | 60.0 | 60.0 | 400 |' in text
    rows = (tmp_path / 'refs_vs_desd.csv').read_text().splitlines()
    assert 'fish_to_desd_step_ratio,2.0,,<= 2.5' in rows and 'cosine_to_desd_step_ratio,4.0,,' in rows
    assert (tmp_path / 'refs_vs_desd.png').stat().st_size > 0
