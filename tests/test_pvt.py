"""PVT-UNet: shapes, deep supervision, nnU-Net's builder, the shared 2D path, heads, weight transfer, optimizer,
memory estimate and patch reduction. Tiny widths throughout (the real PVTv2-b1 sizes are only built on meta)."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.architectures import memory
from nnunetv2_desd.architectures.pvt_unet import (CLASS_NAME, PVTUNet, TransformerBlock, default_arch_kwargs,
                                                  replicate_pad_to_multiple)
from nnunetv2_desd.pretraining.network import MultiStageDistillationNetwork, build_planned_network, planned_encoder
from nnunetv2_desd.trainers.finetune import nnUNetTrainerCADS, preferred_optimizer
from nnunetv2_desd.planning.plan_pvt import reduce_patch
from nnunetv2_desd.common.pretrained_weights import plan_loading

TINY = dict(embed_dims=(16, 32, 48, 64), conv_features=(8, 16), depths=(1, 1, 1, 1), num_heads=(1, 2, 3, 4))
STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


def _tiny(num_classes=3, deep_supervision=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    arch = default_arch_kwargs(**TINY)
    arch['n_conv_per_stage_decoder'] = [1] * 5
    arch.update(kwargs)
    return PVTUNet(1, num_classes, **arch, deep_supervision=deep_supervision)


def _ceil_sizes(size, strides):
    """Expected spatial size after each stage: every stride-s stage maps n to ceil(n / s)."""
    out = []
    for stride in strides:
        size = [-(-n // s) for n, s in zip(size, stride)]
        out.append(size)
    return out


def test_default_arch_kwargs_are_pvt_v2_b1_with_a_2_4_4_stem():
    kw = default_arch_kwargs()
    assert kw['features_per_stage'] == [32, 64, 64, 128, 320, 512] and kw['strides'] == STRIDES
    assert (kw['depths'], kw['num_heads'], kw['mlp_ratios'], kw['sr_ratios']) == \
        ([2, 2, 2, 2], [1, 2, 5, 8], [8.0, 8.0, 4.0, 4.0], [8, 4, 2, 1])
    stem = np.prod(STRIDES[:3], axis=0).tolist()  # conv stages + first patch embedding
    assert stem == [2, 4, 4] and json.loads(json.dumps(kw)) == kw
    with pytest.raises(DesdError, match='divisible by its 3 heads'):
        default_arch_kwargs(embed_dims=(16, 32, 64, 64), num_heads=(1, 2, 3, 4))
    with pytest.raises(DesdError, match='one entry per transformer stage'):
        default_arch_kwargs(depths=(2, 2, 2))


@pytest.mark.parametrize('patch', [(48, 32, 32), (16, 96, 32), (17, 33, 31), (20, 36, 44)])
def test_every_stage_and_every_output_for_odd_patches(patch):
    network = _tiny().eval()
    network.encoder.return_skips = True
    x = torch.randn(1, 1, *patch)
    with torch.no_grad():
        features = network.encoder(x)
        outputs = network(x)
    assert [list(f.shape[2:]) for f in features] == _ceil_sizes(patch, STRIDES)
    assert [f.shape[1] for f in features] == [8, 16, 16, 32, 48, 64]
    # deep supervision: nnU-Net's scales 1 / cumprod(strides)[:-1], highest resolution first, cropped to ceil sizes
    scales = 1 / np.cumprod(np.vstack(STRIDES), axis=0)[:-1]
    assert len(outputs) == len(scales) == 5
    for out, scale in zip(outputs, scales):
        assert out.shape[:2] == (1, 3)
        assert list(out.shape[2:]) == [math.ceil(n * s) for n, s in zip(patch, scale)]


def test_deep_supervision_switch_and_nnunet_builder():
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    arch = json.loads(json.dumps(default_arch_kwargs(**TINY)))  # as read back from a plans file
    network = get_network_from_plans(CLASS_NAME, arch, [], 2, 4, deep_supervision=True)
    assert isinstance(network, PVTUNet) and network.decoder.deep_supervision
    network.eval()
    x = torch.randn(1, 2, 16, 32, 32)
    with torch.no_grad():
        with_ds = network(x)
        network.decoder.deep_supervision = False  # what nnUNetTrainer.set_deep_supervision_enabled does
        single = network(x)
    assert isinstance(with_ds, list) and torch.equal(single, with_ds[0]) and single.shape == (1, 4, 16, 32, 32)
    # the stem is the encoder's first >=3D parameter (where an export with other input channels is adapted)
    stem = next(p for p in network.encoder.parameters() if p.ndim >= 3)
    assert stem is network.encoder.stages[0].convs[0].conv.weight and stem.shape[1] == 2
    assert any('.seg_layers.' in k for k in network.state_dict())
    assert network.preferred_optimizer == 'adamw'


def test_the_pretraining_network_is_the_one_nnunets_trainer_builds():
    """build_planned_network (nnU-Net's get_network_from_plans, without importing the trainer module) and
    nnUNetTrainer.build_network_architecture give the same tensors for the same plans and seed."""
    plain = dict(n_stages=3, features_per_stage=[4, 8, 16], conv_op='torch.nn.modules.conv.Conv3d',
                 kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]],
                 n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1], conv_bias=True,
                 norm_op='torch.nn.modules.instancenorm.InstanceNorm3d', norm_op_kwargs={'eps': 1e-5, 'affine': True},
                 dropout_op=None, dropout_op_kwargs=None, nonlin='torch.nn.LeakyReLU',
                 nonlin_kwargs={'inplace': True})
    for name, kwargs, imports in (
            ('dynamic_network_architectures.architectures.unet.PlainConvUNet', plain,
             ['conv_op', 'norm_op', 'dropout_op', 'nonlin']),
            (CLASS_NAME, json.loads(json.dumps(default_arch_kwargs(**TINY))), [])):
        cm = SimpleNamespace(network_arch_class_name=name, network_arch_init_kwargs=kwargs,
                             network_arch_init_kwargs_req_import=imports)
        torch.manual_seed(3)
        ours = build_planned_network(None, cm, 2, 3).state_dict()
        torch.manual_seed(3)
        nnunet = nnUNetTrainer.build_network_architecture(None, cm, 2, 3, enable_deep_supervision=True).state_dict()
        assert list(ours) == list(nnunet) and any('.seg_layers.' in k for k in ours)
        assert all(torch.equal(ours[k], nnunet[k]) for k in ours), name


def test_2d_path_has_only_2d_embeddings_and_sends_drr_gradients_to_the_shared_blocks():
    network = _tiny()
    encoder = planned_encoder(network)  # pre-training: the 2D path becomes trainable
    drr_params = dict(encoder.drr_path.named_parameters())
    assert all(p.requires_grad for p in drr_params.values())
    # by hand: per 2D conv a 3x3 kernel + bias + instance-norm affine; per 2D embedding a 3x3 kernel + bias + LN
    expected = (1 * 8 * 9 + 8 + 16) + (8 * 8 * 9 + 8 + 16) + (8 * 16 * 9 + 16 + 32) + (16 * 16 * 9 + 16 + 32) \
        + sum(a * b * 9 + b + 2 * b for a, b in ((16, 16), (16, 32), (32, 48), (48, 64)))
    assert sum(p.numel() for p in drr_params.values()) == expected
    assert not any('blocks' in name for name in drr_params)

    encoder(torch.randn(2, 1, 32, 32, 1))[-1].pow(2).mean().backward()  # a lateral DRR: axis 2 of size 1
    for s in range(2, 6):
        stage = encoder.stages[s]
        shared = list(stage.blocks.parameters()) + list(stage.norm.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared), f'stage {s} blocks'
        assert all(p.grad is None for p in stage.embed.parameters())  # 3D embedding unused by the DRR
    assert all(p.grad is None for p in encoder.stages[0].parameters())
    assert all(p.grad is not None for p in drr_params.values())


def test_a_block_treats_a_2d_map_as_a_volume_constant_along_the_projection_axis():
    torch.manual_seed(0)
    block = TransformerBlock(8, 2, 4.0, 4, 0.0, True).eval()
    for axis in range(3):
        grid_2d = [6, 5, 7]
        grid_2d[axis] = 1
        grid_3d = list(grid_2d)
        grid_3d[axis] = 8  # a multiple of the SR ratio
        image = torch.randn(1, 8, *grid_2d)
        volume = image.expand(1, 8, *grid_3d)
        with torch.no_grad():
            out_2d = block(image.flatten(2).transpose(1, 2), grid_2d).transpose(1, 2).reshape(1, 8, *grid_2d)
            out_3d = block(volume.flatten(2).transpose(1, 2), grid_3d).transpose(1, 2).reshape(1, 8, *grid_3d)
        assert torch.allclose(out_3d, out_2d.expand_as(out_3d), atol=1e-5), f'axis {axis}'
    # the SR padding: edges replicated, split before/after
    padded = replicate_pad_to_multiple(torch.arange(3.0).view(1, 1, 3, 1, 1), 4)
    assert padded.shape == (1, 1, 4, 4, 4) and padded[0, 0, :, 0, 0].tolist() == [0.0, 1.0, 2.0, 2.0]
    assert torch.equal(padded[0, 0, :, 1:, 1:], padded[0, 0, :, :1, :1].expand(4, 3, 3))


def test_four_d_images_and_errors():
    network = _tiny()
    features = network.encoder(torch.randn(1, 1, 40, 24))
    assert [tuple(f.shape[2:]) for f in features] == [(40, 24), (20, 12), (10, 6), (5, 3), (3, 2), (2, 1)]
    with pytest.raises(DesdError, match='2 spatial axes of size 1'):
        network.encoder(torch.randn(1, 1, 1, 1, 16))
    with pytest.raises(DesdError, match='without a 2D path'):
        _tiny(drr_path=False).encoder(torch.randn(1, 1, 16, 16, 1))


def test_segmentation_network_freezes_the_2d_path_and_pretraining_heads_attach():
    network = _tiny()
    assert not any(p.requires_grad for p in network.encoder.drr_path.parameters())
    encoder = planned_encoder(network, drr_path=False)  # DeSD: 3D only, so DDP sees no unused parameters
    assert not any(p.requires_grad for p in encoder.drr_path.parameters())
    student = MultiStageDistillationNetwork(planned_encoder(network), [2, 3, 4, 5], out_dim=16, hidden_dim=8,
                                            bottleneck_dim=4, norm='none')
    packed, drr = torch.randn(4, 1, 16, 16, 16), torch.randn(2, 1, 16, 32, 1)  # CADS's packed views, DRRs
    logits = student(packed, drr)
    assert logits.shape == (4, 6, 16)  # (stages, 2B + B, K)
    logits.sum().backward()
    assert all(p.grad is not None for p in network.encoder.drr_path.parameters())


def test_weight_transfer_from_a_pretrained_network():
    pretrained = _tiny(num_classes=2, seed=1)
    student = MultiStageDistillationNetwork(planned_encoder(pretrained), [4, 5], out_dim=8, hidden_dim=8,
                                            bottleneck_dim=4, norm='none')
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    student(torch.randn(2, 1, 16, 32, 32), torch.randn(2, 1, 16, 32, 1)).pow(2).sum().backward()
    optimizer.step()
    export = {k: v.detach().clone() for k, v in pretrained.state_dict().items()}  # the export's network_weights

    target = _tiny(num_classes=5, seed=2)  # another dataset: other classes, same plans architecture
    plan = plan_loading(target, export)
    assert plan.fits and plan.num_loaded == plan.num_encoder_tensors > 0 and plan.stem_key is None
    target.encoder.load_state_dict(plan.encoder_tensors)
    for (name, a), b in zip(target.encoder.state_dict().items(), pretrained.encoder.state_dict().values()):
        assert torch.equal(a, b), name
    assert not torch.equal(target.decoder.seg_layers[0].weight[:2], pretrained.decoder.seg_layers[0].weight)
    # nnU-Net's stock loader: every key but the seg layers exists in the export with the same shape
    assert all(k in export and export[k].shape == v.shape for k, v in target.state_dict().items()
               if '.seg_layers.' not in k)


def _trainer_with(network):
    """A fine-tuning trainer with only what configure_optimizers reads (no plans, folders or data)."""
    trainer = object.__new__(nnUNetTrainerCADS)
    trainer.network, trainer.initial_lr, trainer.weight_decay = network, 1e-2, 3e-5
    trainer.adamw_lr, trainer.adamw_weight_decay = 1e-4, 0.05
    trainer.warmup_epochs, trainer.num_epochs, trainer.encoder_lr_multiplier, trainer.freeze_encoder_epochs = \
        4, 100, 0.5, 0
    return trainer


def test_the_optimizer_follows_the_architecture_not_the_trainer():
    pvt = _tiny()
    trainer = _trainer_with(pvt)
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW) and trainer.optimizer_name == 'adamw'
    groups = {g['name']: g for g in optimizer.param_groups}
    assert optimizer.param_groups[0]['name'] == 'decoder'
    assert groups['decoder']['weight_decay'] == 0.05 and groups['encoder (no decay)']['weight_decay'] == 0.0
    assert all(p.ndim <= 1 for g in groups.values() if 'no decay' in g['name'] for p in g['params'])
    # warm-up epoch 0 of 4: peak / 4, the encoder at half of it
    assert math.isclose(groups['decoder']['lr'], 1e-4 / 4) and math.isclose(groups['encoder']['lr'], 0.5e-4 / 4)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    assert in_optimizer == {id(p) for p in pvt.parameters() if p.requires_grad}
    assert not in_optimizer & {id(p) for p in pvt.encoder.drr_path.parameters()}

    cnn = PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), False, nn.InstanceNorm3d,
                        {'eps': 1e-5, 'affine': True}, None, None, nn.LeakyReLU, {'inplace': True})
    trainer = _trainer_with(cnn)  # the same trainer class
    optimizer, _ = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.SGD) and trainer.peak_lr == 1e-2
    assert [g['name'] for g in optimizer.param_groups] == ['decoder', 'encoder']
    cnn.preferred_optimizer = 'lion'
    with pytest.raises(DesdError, match='lion'):
        preferred_optimizer(cnn)


def test_saved_activation_bytes_by_hand():
    # Linear(4 -> 3) keeps its input (2 x 4 float32 = 32 bytes; the weight is a parameter), ReLU its output (24)
    assert memory.saved_activation_bytes(lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (2, 4)) == 32 + 24
    # nnU-Net's rule: reference 560e6 for batch 2 in 8 GB; 24 GB and 280e6 per sample -> round(1680 / 280 * 2) = 12
    assert memory.nnunet_batch_size(280e6, 24, (64, 64, 64), 1e12) == 12
    # 5 % of 100 cases of 128^3 voxels with 64^3 patches: round(0.05 * 100 * 8) = 40; and never below 2
    assert memory.nnunet_batch_size(28e6, 24, (64, 64, 64), 100 * 128 ** 3) == 40
    assert memory.nnunet_batch_size(5e9, 8, (64, 64, 64), 1e12) == 2
    assert memory.fits(1.68e9, 24) and not memory.fits(1.69e9, 24)


def test_patch_reduction_follows_nnunet_order():
    # median (40, 200, 100): the axis largest relative to the median loses one stride per step until the patch fits
    steps = []

    def fits(patch):
        steps.append(list(patch))
        return np.prod(patch) <= 48 * 128 * 64

    # ratios to the median: (1.6, .64, 1.28) -> axis 0; (1.2, .64, 1.28) -> axis 2; (1.2, .64, .96) -> axis 0
    assert reduce_patch([64, 128, 128], [16, 32, 32], [40, 200, 100], fits) == [32, 128, 96]
    assert steps == [[64, 128, 128], [48, 128, 128], [48, 128, 96], [32, 128, 96]]
    assert reduce_patch([16, 32, 32], [16, 32, 32], [40, 40, 40], lambda p: False) == [16, 32, 32]


def test_benchmark_measures_a_network_and_plans_nnunets_unet_for_the_patch():
    from nnunetv2_desd.benchmarks.pvt import markdown, measure, plain_unet_for_patch
    unet = plain_unet_for_patch((32, 64, 64), (2.5, 0.8, 0.8), 1, 2)['arch_kwargs']
    assert unet['strides'][0] == [1, 1, 1] and unet['features_per_stage'][:3] == [32, 64, 128]
    assert all(p % s == 0 for p, s in zip((32, 64, 64), np.prod(unet['strides'], axis=0)))
    with pytest.raises(DesdError, match='would use'):
        plain_unet_for_patch((30, 64, 64), (2.5, 0.8, 0.8), 1, 2)
    figures = measure('PVT-UNet', lambda: _tiny(2), 1, (16, 32, 32), 1, torch.device('cpu'), 1)
    assert math.isclose(figures.parameters_m, sum(p.numel() for p in _tiny(2).parameters()) / 1e6)
    assert figures.forward_s > 0 and figures.train_step_s > 0 and figures.memory_mib > 0
    assert figures.batch_24gb >= 2 and figures.equivalent_feature_map_m > 0
    table = markdown({'setup': {'source': 's', 'patch_size': [16, 32, 32], 'batch_size': 1, 'device': 'cpu',
                                'memory': 'm'}, 'results': [figures.__dict__]})
    assert '| PVT-UNet |' in table
