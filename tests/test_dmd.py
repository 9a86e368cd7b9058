"""DMD building blocks: the loss against hand-computed values, gradients into both networks, the batch split and
composition of a training step, checkpoint round trip of both networks, and the unlabelled pool's checks."""
import copy
import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.trainers.dmd_loss import (DeepSupervisedMutualDistillation, MutualDistillationLoss,
                                             soft_dice)
from nnunetv2_desd.data.preprocessing_match import preprocessing_plans
from nnunetv2_desd.data.pool import POOL_FORMAT, check_pool, pool_paths
from nnunetv2_desd.evaluation.benchmark import check_unlabelled_pools, is_dmd_trainer
from nnunetv2_desd.evaluation.report import BenchmarkCell
from nnunetv2_desd.trainers.dmd import DMDPair, nnUNetTrainerDMD, nnUNetTrainerDMDEnsemble, split_batch

LN2, LN3 = math.log(2), math.log(3)


def logits(rows, temperature=1.0):
    """(B, C, N) logits from per-sample lists of per-voxel class logits given as z / T."""
    return torch.tensor(rows, dtype=torch.float64).permute(0, 2, 1) * temperature


# ------------------------------------------------------------------------------------------------------------- loss
def test_two_class_softmax_by_hand_and_temperature():
    # z / T per voxel (background, foreground): net 1 (0, ln3), (0, 0); net 2 (ln3, 0), (0, 0)
    z1 = logits([[[0, LN3], [0, 0]]], temperature=2.0)
    z2 = logits([[[LN3, 0], [0, 0]]], temperature=2.0)
    # T = 2: p = (3/4, 1/2), q = (1/4, 1/2): Dice = 2 (3/16 + 1/4) / (5/4 + 3/4) = 0.4375
    loss = MutualDistillationLoss(temperature=2.0, smooth=0.0)
    assert loss(z1, z2).item() == pytest.approx(1 - 0.4375)
    # T = 1 on the same logits (z / T = (0, 2 ln3)): p = (9/10, 1/2), q = (1/10, 1/2): Dice = 2 * 0.34 / 2 = 0.34
    assert MutualDistillationLoss(temperature=1.0, smooth=0.0)(z1, z2).item() == pytest.approx(1 - 0.34)
    # nnU-Net's smooth term: (2 I + s) / (S + s)
    assert MutualDistillationLoss(temperature=2.0)(z1, z2).item() == pytest.approx(1 - (0.875 + 1e-5) / (2 + 1e-5))
    assert loss(z2, z1).item() == pytest.approx(loss(z1, z2).item())  # symmetric


def test_three_classes_leave_out_background():
    # softmax of (0, ln2, 0) = (1/4, 1/2, 1/4), of (ln2, 0, 0) = (1/2, 1/4, 1/4), of (0, 0, ln2) = (1/4, 1/4, 1/2)
    z1 = logits([[[0, LN2, 0], [LN2, 0, 0]]])
    z2 = logits([[[0, 0, LN2], [0, LN2, 0]]])
    # class 1: p = (1/2, 1/4), q = (1/4, 1/2): 2 * 1/4 / (3/2) = 1/3
    # class 2: p = (1/4, 1/4), q = (1/2, 1/4): 2 * 3/16 / (5/4) = 0.3
    loss = MutualDistillationLoss(temperature=1.0, smooth=0.0)(z1, z2)
    assert loss.item() == pytest.approx(1 - (1 / 3 + 0.3) / 2)
    # (background would add class 0: p = (1/4, 1/2), q = (1/4, 1/4): 0.3, and change the mean)


def test_binary_sigmoid_form_per_sample_and_batch_dice():
    # sigmoid(ln3) = 3/4, sigmoid(0) = 1/2, sigmoid(-ln3) = 1/4; one channel, all kept (the original binary DMD)
    z1 = logits([[[LN3], [0]], [[LN3], [LN3]]])
    z2 = logits([[[-LN3], [0]], [[LN3], [LN3]]])
    # sample A: p = (3/4, 1/2), q = (1/4, 1/2): I = 7/16, S = 2 -> 0.4375; sample B: p = q = (3/4, 3/4): 2.25 / 3
    per_sample = MutualDistillationLoss(1.0, 'sigmoid', batch_dice=False, smooth=0.0)(z1, z2)
    assert per_sample.item() == pytest.approx(1 - (0.4375 + 0.75) / 2)
    # batch Dice pools both samples: I = 7/16 + 9/8, S = 2 + 3 -> 2 * 1.5625 / 5 = 0.625
    pooled = MutualDistillationLoss(1.0, 'sigmoid', batch_dice=True, smooth=0.0)(z1, z2)
    assert pooled.item() == pytest.approx(1 - 0.625)


def test_soft_dice_gradient_by_hand_reaches_both_maps():
    # L = 1 - 2I / S; dL/dp_i = -(2 q_i S - 2 I) / S^2 with I = 7/16, S = 2
    p = torch.tensor([[0.75, 0.5]], requires_grad=True)
    q = torch.tensor([[0.25, 0.5]], requires_grad=True)
    (1 - soft_dice(p, q, axes=[1], smooth=0.0)).sum().backward()
    assert p.grad.tolist()[0] == pytest.approx([-(1 - 0.875) / 4, -(2 - 0.875) / 4])
    assert q.grad.tolist()[0] == pytest.approx([-(3 - 0.875) / 4, -(2 - 0.875) / 4])


def test_gradients_reach_both_networks_through_the_pair():
    torch.manual_seed(0)
    pair = DMDPair(torch.nn.Conv3d(1, 3, 3, padding=1), torch.nn.Conv3d(1, 3, 3, padding=1)).train()
    out1, out2 = pair(torch.randn(2, 1, 6, 6, 6))
    MutualDistillationLoss(temperature=2.0)(out1, out2).backward()
    for net in (pair.net1, pair.net2):
        assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_deep_supervision_weights_and_full_resolution_only():
    torch.manual_seed(0)
    loss = MutualDistillationLoss(temperature=2.0)
    a = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    b = [torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(1, 3, 2, 2)]
    full = DeepSupervisedMutualDistillation(loss)(a, b)
    assert full.item() == pytest.approx(loss(a[0], b[0]).item())
    weighted = DeepSupervisedMutualDistillation(loss, [4 / 7, 2 / 7, 0.0])(a, b)
    assert weighted.item() == pytest.approx(4 / 7 * loss(a[0], b[0]).item() + 2 / 7 * loss(a[1], b[1]).item())


def test_pair_outputs_by_mode():
    net1, net2 = torch.nn.Conv3d(1, 2, 1), torch.nn.Conv3d(1, 2, 1)
    x = torch.randn(1, 1, 2, 2, 2)
    with torch.no_grad():
        one, two = net1(x), net2(x)
        assert all(torch.equal(o, e) for o, e in zip(DMDPair(net1, net2).train()(x), (one, two)))
        assert torch.equal(DMDPair(net1, net2).eval()(x), one)
        assert torch.allclose(DMDPair(net1, net2, ensemble=True).eval()(x), (one + two) / 2)


@pytest.mark.parametrize('planned, labelled, unlabelled, expected', [
    (2, None, None, (1, 1)), (4, None, None, (2, 2)), (5, None, None, (3, 2)), (1, None, None, (1, 1)),
    (2, 2, 2, (2, 2)), (6, None, 2, (4, 2)), (2, 2, None, (2, 1)),
])
def test_split_batch(planned, labelled, unlabelled, expected):
    assert split_batch(planned, labelled, unlabelled) == expected


def test_split_batch_refuses_zero():
    with pytest.raises(DesdError, match='positive integer'):
        split_batch(2, 0, None)


# ------------------------------------------------------------------------------------------------- trainer in-process
def tiny_plans(batch_size: int = 2) -> dict:
    """A 3-stage 3D PlainConvUNet with 4/8/16 features and a 16^3 patch; deep supervision gives 2 outputs."""
    arch = {
        'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
        'arch_kwargs': {'n_stages': 3, 'features_per_stage': [4, 8, 16], 'conv_op': 'torch.nn.modules.conv.Conv3d',
                        'kernel_sizes': [[3, 3, 3]] * 3, 'strides': [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                        'n_conv_per_stage': [1, 1, 1], 'n_conv_per_stage_decoder': [1, 1], 'conv_bias': True,
                        'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                        'norm_op_kwargs': {'eps': 1e-5, 'affine': True}, 'dropout_op': None,
                        'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True}},
        '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}
    resampling = {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None}
    config = {'data_identifier': 'nnUNetPlans_3d_fullres', 'preprocessor_name': 'DefaultPreprocessor',
              'batch_size': batch_size, 'patch_size': [16, 16, 16], 'median_image_size_in_voxels': [20, 20, 20],
              'spacing': [1.5, 1.5, 1.5], 'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
              'resampling_fn_data': 'resample_data_or_seg_to_shape', 'resampling_fn_data_kwargs': resampling,
              'resampling_fn_seg': 'resample_data_or_seg_to_shape',
              'resampling_fn_seg_kwargs': {**resampling, 'is_seg': True, 'order': 1},
              'resampling_fn_probabilities': 'resample_data_or_seg_to_shape',
              'resampling_fn_probabilities_kwargs': {**resampling, 'order': 1},
              'architecture': arch, 'batch_dice': False}
    return {'dataset_name': 'Dataset990_Unit', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': [1.5] * 3, 'original_median_shape_after_transp': [20] * 3,
            'image_reader_writer': 'SimpleITKIO', 'transpose_forward': [0, 1, 2], 'transpose_backward': [0, 1, 2],
            'configurations': {'3d_fullres': config}, 'experiment_planner_used': 'ExperimentPlanner',
            'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'max': 800.0, 'mean': -400.0, 'median': -700.0,
                                                                  'min': -900.0, 'percentile_00_5': -850.0,
                                                                  'percentile_99_5': 750.0, 'std': 600.0}}}


DATASET_JSON = {'channel_names': {'0': 'CT'}, 'labels': {'background': 0, 'bone': 1, 'lung': 2}, 'numTraining': 6,
                'file_ending': '.nii.gz'}


@pytest.fixture
def make_trainer(tmp_path, monkeypatch):
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        (tmp_path / key).mkdir()
        monkeypatch.setenv(key, str(tmp_path / key))
    data = tmp_path / 'nnUNet_preprocessed' / 'Dataset990_Unit' / 'nnUNetPlans_3d_fullres'
    data.mkdir(parents=True)
    (data / 'case.b2nd').write_bytes(b'')  # initialize() infers nnU-Net's dataset class from the file endings
    monkeypatch.setattr(sys, 'argv', ['nnUNetv2_train', '990', '3d_fullres', '0', '-tr', 'nnUNetTrainerDMD'])

    def make(batch_size: int = 2, cls=nnUNetTrainerDMD, initialize: bool = True):
        plans = {**tiny_plans(batch_size), 'continue_training': False}
        trainer = cls(plans, '3d_fullres', 0, copy.deepcopy(DATASET_JSON), device=torch.device('cpu'))
        if initialize:
            trainer.initialize()
        return trainer
    return make


def fake_batch(n: int, with_target: bool = True) -> dict:
    batch = {'data': torch.randn(n, 1, 16, 16, 16)}
    if with_target:
        batch['target'] = [torch.randint(0, 3, (n, 1, 16, 16, 16)).float(),
                           torch.randint(0, 3, (n, 1, 8, 8, 8)).float()]
    return batch


def test_batch_split_follows_the_plans(make_trainer):
    trainer = make_trainer(batch_size=2)
    assert (trainer.batch_size, trainer.unlabelled_batch_size) == (1, 1)
    assert trainer.probabilistic_oversampling  # one labelled patch: nnU-Net's rounding would never oversample
    trainer = make_trainer(batch_size=4)
    assert (trainer.batch_size, trainer.unlabelled_batch_size) == (2, 2)
    assert not trainer.probabilistic_oversampling  # 2 labelled: the last one is oversampled, as in nnU-Net


def test_train_step_composition_and_both_networks_learn(make_trainer):
    torch.manual_seed(0)
    trainer = make_trainer(batch_size=4)
    seen = {'sup': [], 'dmd': []}
    supervised, dmd = trainer.loss, trainer.dmd_loss

    def record_supervised(out, target):
        seen['sup'].append((out[0].shape[0], target[0].shape[0]))
        return supervised(out, target)

    def record_dmd(a, b):
        seen['dmd'].append((a[0].shape[0], b[0].shape[0]))
        return dmd(a, b)
    trainer.loss, trainer.dmd_loss = record_supervised, record_dmd
    unlabelled = [fake_batch(2, with_target=False)]
    trainer.dataloader_unlabelled = iter(unlabelled)
    before = copy.deepcopy(trainer.pair.state_dict())
    out = trainer.train_step(fake_batch(2))
    # nnU-Net's Dice + CE once per network on the 2 labelled patches; DMD on all 4 patches of both networks
    assert seen['sup'] == [(2, 2), (2, 2)] and seen['dmd'] == [(4, 4)]
    assert next(trainer.dataloader_unlabelled, None) is None  # one unlabelled batch drawn per step
    assert float(out['loss']) == pytest.approx(float(out['sup_loss_1']) + float(out['sup_loss_2']) +
                                               4.0 * float(out['dmd_loss']), rel=1e-5)
    after = trainer.pair.state_dict()
    for net in ('net1', 'net2'):
        key = f'{net}.encoder.stages.0.0.convs.0.conv.weight'
        assert not torch.equal(before[key], after[key])
    assert not torch.equal(after['net1.encoder.stages.0.0.convs.0.conv.weight'],
                           after['net2.encoder.stages.0.0.convs.0.conv.weight'])  # two initialisations


def test_checkpoint_holds_and_restores_both_networks(make_trainer, tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer()
    trainer.dataloader_unlabelled = iter([fake_batch(1, with_target=False)])
    trainer.train_step(fake_batch(1))
    checkpoint = str(tmp_path / 'checkpoint_latest.pth')
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, map_location='cpu', weights_only=False)
    assert {k.split('.')[0] for k in saved['network_weights']} == {'net1', 'net2'}

    resumed = make_trainer()
    key = 'net2.encoder.stages.0.0.convs.0.conv.weight'
    assert not torch.equal(resumed.pair.state_dict()[key], trainer.pair.state_dict()[key])
    resumed.load_checkpoint(checkpoint)
    for k, v in trainer.pair.state_dict().items():
        assert torch.equal(resumed.pair.state_dict()[k], v), k
    first_conv = dict(resumed.pair.net2.named_parameters())['encoder.stages.0.0.convs.0.conv.weight']
    momentum = resumed.optimizer.state[first_conv]['momentum_buffer']  # network 2's SGD momentum is restored too
    original = dict(trainer.pair.net2.named_parameters())['encoder.stages.0.0.convs.0.conv.weight']
    assert momentum.abs().sum() > 0 and torch.equal(momentum, trainer.optimizer.state[original]['momentum_buffer'])


def test_prediction_network_is_network_one_or_the_ensemble(make_trainer):
    manager = PlansManager(tiny_plans())
    single = nnUNetTrainerDMD.build_network_architecture(manager, manager.get_configuration('3d_fullres'), 1, 3,
                                                         enable_deep_supervision=False)
    ensemble = nnUNetTrainerDMDEnsemble.build_network_architecture(manager, manager.get_configuration('3d_fullres'),
                                                                   1, 3, enable_deep_supervision=False)
    ensemble.load_state_dict(single.state_dict())  # same keys: both checkpoints hold both networks
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        single.eval(), ensemble.eval()
        assert torch.equal(single(x), single.net1(x))
        assert torch.allclose(ensemble(x), (single.net1(x) + single.net2(x)) / 2, atol=1e-6)


def test_pretrained_weights_refused(make_trainer):
    trainer = make_trainer(initialize=False)
    with pytest.raises(DesdError, match='-pretrained_weights is not supported'):
        maybe_load_checkpoint(trainer, False, False, 'x.pth')  # where nnU-Net initialises for -pretrained_weights


def test_no_pool_names_the_command(make_trainer):
    trainer = make_trainer()
    with pytest.raises(DesdError, match='desd_preprocess_unlabelled -d Dataset990_Unit -u UNLABELLED_DATASET'):
        trainer.find_unlabelled_pool()


# --------------------------------------------------------------------------------------------------- pool checks
def pool_record(plans: dict, **changes) -> dict:
    record = {'format': POOL_FORMAT, 'version': 1, 'plans_name': 'nnUNetPlans', 'configuration': '3d_fullres',
              'preprocessing': preprocessing_plans(plans, '3d_fullres'),
              'num_channels': 1, 'channel_names': {'0': 'CT'}, 'source_channel_names': {'Dataset991_U': {'0': 'CT'}},
              'sources': [{'dataset': 'Dataset991_U', 'num_cases': 1}], 'identifiers': ['Dataset991_U__a']}
    record.update(changes)
    return record


def test_pool_checks(tmp_path):
    plans = tiny_plans()
    folder, _ = pool_paths(str(tmp_path), 'nnUNetPlans_3d_fullres')
    (tmp_path / 'desd_unlabelled' / 'nnUNetPlans_3d_fullres').mkdir(parents=True)
    with pytest.raises(DesdError, match='lacks 1 of the cases'):
        check_pool(pool_record(plans), plans, '3d_fullres', 1, str(tmp_path))
    (tmp_path / 'desd_unlabelled' / 'nnUNetPlans_3d_fullres' / 'Dataset991_U__a.pkl').write_bytes(b'')
    assert check_pool(pool_record(plans), plans, '3d_fullres', 1, str(tmp_path)) == ['Dataset991_U__a']

    with pytest.raises(DesdError, match=r'has 2 channel\(s\).*but Dataset990_Unit has 1'):
        check_pool(pool_record(plans, num_channels=2), plans, '3d_fullres', 1, str(tmp_path))
    # a pool preprocessed with other plans: other spacing -> refused, naming the differing entry and the command
    other = copy.deepcopy(plans)
    other['configurations']['3d_fullres']['spacing'] = [1.0, 1.0, 1.0]
    other['plans_name'] = 'nnUNetPlans_other'
    with pytest.raises(DesdError, match=r"plans 'nnUNetPlans_other'.*: spacing \[1\.0, 1\.0, 1\.0\] instead of .*"
                                        r"desd_preprocess_unlabelled -d "
                                        r"Dataset990_Unit -u Dataset991_U -p nnUNetPlans -c 3d_fullres"):
        check_pool(pool_record(other, plans_name='nnUNetPlans_other'), plans, '3d_fullres', 1, str(tmp_path))
    # plans that differ only in patch size and name share the pool (nnU-Net shares the data_identifier folder too)
    demo = copy.deepcopy(plans)
    demo['configurations']['3d_fullres']['patch_size'] = [8, 8, 8]
    demo['plans_name'] = 'nnUNetPlans_demo'
    assert check_pool(pool_record(plans), demo, '3d_fullres', 1, str(tmp_path)) == ['Dataset991_U__a']


def test_benchmark_checks_dmd_cells_before_running(tmp_path):
    assert is_dmd_trainer('nnUNetTrainerDMDTiny') and is_dmd_trainer('nnUNetTrainerDMDEnsemble')
    assert not is_dmd_trainer('nnUNetTrainerDeSDTiny') and not is_dmd_trainer('nnUNetTrainerDMDX')
    (tmp_path / 'nnUNetPlans.json').write_text(json.dumps(tiny_plans()))
    setup = SimpleNamespace(trainers={'tested': 'nnUNetTrainerDMDTiny', 'baseline': 'nnUNetTrainerTiny'},
                            plans={'tested': 'nnUNetPlans', 'baseline': 'nnUNetPlans'}, weights=None,
                            preprocessed=str(tmp_path), configuration='3d_fullres', dataset='Dataset990_Unit')
    full = BenchmarkCell('tested', 'nnUNetTrainerDMDTiny', 'nnUNetPlans', 0, 1.0, 0, str(tmp_path / 'fold_0'))
    with pytest.raises(DesdError, match=r'fold 0, fraction 1\. Preprocess unlabelled images first '
                                        r'\(desd_preprocess_unlabelled -d Dataset990_Unit'):
        check_unlabelled_pools([full], setup)
    check_unlabelled_pools([BenchmarkCell('baseline', 'nnUNetTrainerTiny', 'nnUNetPlans', 0, 1.0, 0, None)], setup)
    setup.weights = 'export.pth'
    with pytest.raises(DesdError, match='drop -w'):
        check_unlabelled_pools([full], setup)
