"""The DRR path of CADS uses the 3D encoder's own parameters: a depth-1 volume sees each kernel's centre slice."""
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn

from nnunetv2_desd.pretraining.methods.cads import CADS, deepest_size
from nnunetv2_desd.pretraining.network import MultiStageDistillationNetwork, planned_encoder


def _network():
    torch.manual_seed(0)
    return PlainConvUNet(1, 3, (8, 16, 32), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), False,
                         nn.InstanceNorm3d, {'eps': 1e-5, 'affine': True}, None, None, nn.LeakyReLU,
                         {'inplace': True})


def test_drr_output_depends_only_on_the_centre_slices_of_the_3d_kernels():
    encoder = planned_encoder(_network())
    drr = torch.randn(2, 1, 16, 12, 1)  # lateral DRR: size 1 on the projection axis 2
    before = encoder(drr)[-1].clone()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.Conv3d):
                module.weight[..., 0] += 1.0   # slices that only ever meet zero padding
                module.weight[..., 2] -= 3.0
    assert torch.allclose(encoder(drr)[-1], before)
    with torch.no_grad():
        encoder.stages[0][0].convs[0].conv.weight[..., 1] += 0.5
    assert not torch.allclose(encoder(drr)[-1], before)


def test_drr_gradients_reach_the_shared_3d_parameters_centre_slice_only():
    network = _network()
    # heads without batch norm: with it, the DRR rows' loss would also reach the 3D rows through the batch statistics
    student = MultiStageDistillationNetwork(planned_encoder(network), [1, 2], out_dim=16, hidden_dim=8,
                                            bottleneck_dim=4, norm='none')
    views = torch.randn(4, 1, 8, 8, 8)
    drr = torch.randn(2, 1, 8, 8, 1)
    logits = student(views, drr)
    assert logits.shape == (2, 6, 16)  # (D, 2B + B, K)
    logits[:, 4:].sum().backward()     # the DRR rows only
    stem = network.encoder.stages[0][0].convs[0].conv.weight  # a parameter of the nnU-Net network itself
    assert stem.grad is not None and stem.grad[..., 1].abs().sum() > 0
    assert stem.grad[..., 0].abs().sum() == 0 and stem.grad[..., 2].abs().sum() == 0
    # no second copy of the encoder exists: every student parameter is the network's or a head's
    encoder_params = {id(p) for p in student.encoder.parameters()}
    assert encoder_params <= {id(p) for p in network.parameters()}
    assert {id(p) for p in student.parameters()} == encoder_params | {id(p) for p in student.heads.parameters()}


def test_deepest_size_and_single_voxel_refusal():
    assert deepest_size([32, 16, 16], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]) == [2, 1, 1]
    assert deepest_size([5, 3, 1], [[2, 2, 2], [2, 2, 2]]) == [2, 1, 1]
    import pytest
    from nnunetv2_desd.common.errors import DesdError
    strides = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    CADS(0.75, (4, 8, 8)).check([32, 32, 32], strides, [2])
    with pytest.raises(DesdError, match='single voxel'):
        CADS(0.75, (4, 8, 8)).check([16, 16, 16], strides, [2])
