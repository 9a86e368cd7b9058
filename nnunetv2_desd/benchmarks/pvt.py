"""The PVT-UNet benchmark: PVT-UNet against nnU-Net's PlainConvUNet on the same patch (a benchmark, not a test).

Run by ``desd_pvt_benchmark`` (``nnunetv2_desd.cli.pvt_benchmark``). Per network, at the same patch (PVT-UNet pads
to a multiple of its total stride, and pays for it): parameters (all, encoder), forward time (inference, no deep
supervision), training-step time (forward with deep supervision + backward), training memory (CUDA: peak allocated
in the step, AMP as nnU-Net trains; CPU: the activations autograd keeps, fp32), the meta-device estimate in
nnU-Net's feature-map units and the batch size nnU-Net's rule gives for a 24 GB GPU (memory only, before its 5 %
dataset cap). Medians over ``repeats`` after one warm-up.
"""
import json
import os
import statistics
from dataclasses import asdict, dataclass
from functools import partial
from typing import Callable, List, Optional, Sequence

import torch
from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props
from nnunetv2.paths import nnUNet_preprocessed
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from nnunetv2_desd.architectures import memory
from nnunetv2_desd.architectures.pvt_unet import CLASS_NAME, default_arch_kwargs
from nnunetv2_desd.benchmarks.timing import activation_mib, device_name, peak_mib, reset_peak, time_steps
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.data.raw import resolve_dataset_name


@dataclass
class Figures:
    name: str
    parameters_m: float
    encoder_parameters_m: float
    forward_s: float
    train_step_s: float
    memory_mib: float
    equivalent_feature_map_m: float
    batch_24gb: int


def plain_unet_for_patch(patch: Sequence[int], spacing: Sequence[float], input_channels: int,
                         num_classes: int) -> dict:
    """The PlainConvUNet ``architecture`` nnU-Net's default planner gives this patch and spacing."""
    _, strides, kernels, fitted, _ = get_pool_and_conv_props(list(spacing), list(patch), 4, 999999)
    if [int(f) for f in fitted] != list(patch):
        raise DesdError(f'--patch-size {list(patch)} is not a patch nnU-Net plans at spacing {list(spacing)} (it '
                        f'would use {[int(f) for f in fitted]}).')
    strides, kernels = [[int(s) for s in st] for st in strides], [[int(k) for k in ks] for ks in kernels]
    n = len(strides)
    return {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {'n_stages': n, 'features_per_stage': [min(320, 32 * 2 ** i) for i in range(n)],
                            'conv_op': 'torch.nn.modules.conv.Conv3d', 'kernel_sizes': kernels, 'strides': strides,
                            'n_conv_per_stage': [2] * n, 'n_conv_per_stage_decoder': [2] * (n - 1),
                            'conv_bias': True, 'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                            'norm_op_kwargs': {'eps': 1e-5, 'affine': True}, 'dropout_op': None,
                            'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                            'nonlin_kwargs': {'inplace': True}},
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}


def _builder(architecture: dict, input_channels: int, num_classes: int) -> Callable[[], nn.Module]:
    return partial(get_network_from_plans, architecture['network_class_name'], architecture['arch_kwargs'],
                   architecture['_kw_requires_import'], input_channels, num_classes, deep_supervision=True)


def measure(name: str, build: Callable[[], nn.Module], input_channels: int, patch: Sequence[int], batch: int,
            device: torch.device, repeats: int) -> Figures:
    equivalent = memory.equivalent_feature_map_elements(build, input_channels, patch)
    torch.manual_seed(0)
    network = build().to(device)
    parameters = sum(p.numel() for p in network.parameters())
    encoder = sum(p.numel() for p in network.encoder.parameters())
    x = torch.randn(batch, input_channels, *patch, device=device)
    amp = device.type == 'cuda'

    def forward():
        network.eval()
        network.decoder.deep_supervision = False
        with torch.no_grad(), torch.autocast(device.type, enabled=amp):
            network(x)

    def train_step():
        network.train()
        network.decoder.deep_supervision = True
        network.zero_grad(set_to_none=True)
        with torch.autocast(device.type, enabled=amp):
            loss = sum(o.float().mean() for o in network(x))
        loss.backward()

    forward_s = statistics.median(time_steps(forward, 1, repeats, device))
    train_s = statistics.median(time_steps(train_step, 1, repeats, device))
    if device.type == 'cuda':
        network.zero_grad(set_to_none=True)
        reset_peak(device)
        train_step()
        memory_mib = peak_mib(device)
    else:
        network.train()
        memory_mib = activation_mib(lambda: sum(o.mean() for o in network(x)), network.parameters())
    return Figures(name, parameters / 1e6, encoder / 1e6, forward_s, train_s, memory_mib, equivalent / 1e6,
                   memory.nnunet_batch_size(equivalent, 24, patch, float('inf')))


def run(dataset: Optional[str], patch: Optional[List[int]], spacing: Optional[List[float]], plans_name: str,
        batch: int, device: str, repeats: int) -> dict:
    if dataset is not None:
        name = resolve_dataset_name(dataset)
        root = os.path.join(nnUNet_preprocessed, name)
        plans = {}
        for key, file in (('stock', 'nnUNetPlans'), ('pvt', plans_name)):
            path = os.path.join(root, file + '.json')
            if not os.path.isfile(path):
                raise DesdError(f'{path} not found: run nnUNetv2_plan_and_preprocess and desd_plan_pvt first.')
            with open(path) as f:
                plans[key] = json.load(f)['configurations']['3d_fullres']
        with open(os.path.join(root, 'dataset.json')) as f:
            dataset_json = json.load(f)
        channels, classes = len(dataset_json['channel_names']), len(dataset_json['labels'])
        patch = patch or plans['stock']['patch_size']
        unet_arch, pvt_arch = plans['stock']['architecture'], plans['pvt']['architecture']
        source = f'{name}: nnUNetPlans vs {plans_name}'
    else:
        if patch is None or spacing is None:
            raise DesdError('give -d DATASET, or --patch-size and --spacing.')
        channels, classes = 1, 2
        unet_arch = plain_unet_for_patch(patch, spacing, channels, classes)
        pvt_arch = {'network_class_name': CLASS_NAME, 'arch_kwargs': default_arch_kwargs(), '_kw_requires_import': []}
        source = f'nnU-Net\'s PlainConvUNet for spacing {spacing} vs PVTv2-b1 PVT-UNet'
    torch_device = torch.device(device)
    results = [measure(label, _builder(arch, channels, classes), channels, patch, batch, torch_device, repeats)
               for label, arch in (('PlainConvUNet', unet_arch), ('PVT-UNet', pvt_arch))]
    return {'setup': {'source': source, 'patch_size': list(patch), 'batch_size': batch,
                      'device': device_name(torch_device), 'repeats': repeats,
                      'memory': 'CUDA peak allocated, AMP' if torch_device.type == 'cuda'
                      else 'activations kept for backward, fp32'},
            'results': [asdict(r) for r in results]}


def markdown(report: dict) -> str:
    s = report['setup']
    lines = [f'{s["source"]}; patch {s["patch_size"]}, batch {s["batch_size"]}, {s["device"]}; memory: {s["memory"]}',
             '', '| network | params (M) | encoder (M) | forward (s) | train step (s) | memory (MiB) | '
                 'feature-map equiv. (M/sample) | batch for 24 GB (memory only) |', '|---|---|---|---|---|---|---|---|']
    for r in report['results']:
        lines.append(f'| {r["name"]} | {r["parameters_m"]:.2f} | {r["encoder_parameters_m"]:.2f} | '
                     f'{r["forward_s"]:.3f} | {r["train_step_s"]:.3f} | {r["memory_mib"]:.0f} | '
                     f'{r["equivalent_feature_map_m"]:.0f} | {r["batch_24gb"]} |')
    return '\n'.join(lines)

