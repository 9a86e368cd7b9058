"""nnssl's checkpoint metadata, both ways: the ``nnssl_adaptation_plan`` every export carries, and our export metadata
read from an nnssl checkpoint (``network_weights`` + ``nnssl_adaptation_plan``). Fields as docs/nnssl.md lists them.

nnU-Net main's ``nnUNetv2_preprocess_like_nnssl`` indexes ``architecture_plans`` (``arch_class_name``,
``arch_kwargs``, ``arch_kwargs_requiring_import``), the single configuration of ``pretrain_plan`` (its ``spacing``,
``normalization_schemes``, ``patch_size``, ...), ``pretrain_num_input_channels``, ``recommended_downstream_patchsize``
and the key maps (``key_to_encoder``, ``key_to_stem``, ``keys_to_in_proj``, ``key_to_lpe``); its PretrainedTrainer
then loads the ``network_weights`` under ``key_to_encoder`` and ``key_to_stem``.
"""
import copy
from typing import Dict, List, Mapping, Optional

import torch

from nnunetv2_desd.common.checkpoint import tensor_digest
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import NNSSL_FORMAT, ExportRecord

PLAN_KEY = 'nnssl_adaptation_plan'
RESENC_L = {  # nnssl's ResEnc-L preset (dynamic-network-architectures ResidualEncoderUNet)
    'n_stages': 6, 'features_per_stage': [32, 64, 128, 256, 320, 320], 'conv_op': 'torch.nn.modules.conv.Conv3d',
    'kernel_sizes': [[3, 3, 3]] * 6, 'strides': [[1, 1, 1]] + [[2, 2, 2]] * 5, 'n_blocks_per_stage': [1, 3, 4, 6, 6, 6],
    'n_conv_per_stage_decoder': [1] * 5, 'conv_bias': True,
    'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d', 'norm_op_kwargs': {'eps': 1e-5, 'affine': True},
    'dropout_op': None, 'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU', 'nonlin_kwargs': {'inplace': True},
}
PRESETS = {'ResEncL': ('ResidualEncoderUNet', RESENC_L)}
CLASSES = {'ResidualEncoderUNet': 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet',
           'PlainConvUNet': 'dynamic_network_architectures.architectures.unet.PlainConvUNet'}
REQUIRES_IMPORT = ['conv_op', 'norm_op', 'dropout_op', 'nonlin']
CITATIONS = {
    'desd': {'type': 'method', 'name': 'DeSD', 'apa_citations': [
        'Ye, Y., Zhang, J., Chen, Z., & Xia, Y. (2022). DeSD: Self-supervised learning with deep self-distillation '
        'for 3D medical image segmentation. In Medical Image Computing and Computer Assisted Intervention - MICCAI '
        '2022.']},
    'cads': {'type': 'method', 'name': 'CADS', 'apa_citations': [
        'Ye, Y., Zhang, J., Chen, Z., & Xia, Y. (2024). CADS: A self-supervised learner via cross-modal alignment '
        'and deep self-distillation for CT volume segmentation. IEEE Transactions on Medical Imaging.']},
    'refs': {'type': 'method', 'name': 'ReFs', 'apa_citations': [
        'Xie, Y., Zhang, J., Liu, L., Wang, H., Ye, Y., Verjans, J., & Xia, Y. (2024). ReFs: A hybrid pre-training '
        'paradigm for 3D medical image segmentation. Medical Image Analysis.']},
    'nnunet': {'type': 'framework', 'name': 'nnU-Net', 'apa_citations': [
        'Isensee, F., Jaeger, P. F., Kohl, S. A., Petersen, J., & Maier-Hein, K. H. (2021). nnU-Net: a '
        'self-configuring method for deep learning-based biomedical image segmentation. Nature Methods, 18(2), '
        '203-211.']},
}


def _plain(value):
    """JSON-safe copy: tuples -> lists, numpy scalars -> Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, 'item') and not isinstance(value, (str, bytes)):
        return value.item()
    return value


def citations(method: str) -> List[dict]:
    return [copy.deepcopy(CITATIONS[method]), copy.deepcopy(CITATIONS['nnunet'])]


def adaptation_plan(plans_manager, configuration_manager, network: torch.nn.Module, num_input_channels: int,
                    pretrain_patch: List[int], dataset_name: str) -> Optional[dict]:
    """The ``nnssl_adaptation_plan`` of an export: the planned network, its pre-training configuration and the key
    maps the network itself declares (dynamic-network-architectures' ``key_to_encoder`` and friends). None for a
    network that declares none (PVT-UNet: nnU-Net main could not build it anyway)."""
    cm, pm = configuration_manager, plans_manager
    if not all(hasattr(network, k) for k in ('key_to_encoder', 'key_to_stem', 'keys_to_in_proj')):
        return None
    configuration = cm.configuration
    return _plain({
        'architecture_plans': {'arch_class_name': cm.network_arch_class_name.split('.')[-1],
                               'arch_kwargs': cm.network_arch_init_kwargs,
                               'arch_kwargs_requiring_import': list(cm.network_arch_init_kwargs_req_import)},
        'pretrain_plan': {
            'dataset_name': dataset_name, 'plans_name': pm.plans_name,
            'original_median_spacing_after_transp': pm.plans.get('original_median_spacing_after_transp'),
            'image_reader_writer': pm.plans.get('image_reader_writer'),
            'transpose_forward': pm.transpose_forward, 'transpose_backward': pm.transpose_backward,
            'experiment_planner_used': pm.plans.get('experiment_planner_used'),
            'configurations': {_configuration_name(pm, cm): {
                'data_identifier': cm.data_identifier, 'preprocessor_name': configuration['preprocessor_name'],
                'spacing_style': 'median', 'normalization_schemes': cm.normalization_schemes,
                'use_mask_for_norm': cm.use_mask_for_norm,
                'resampling_fn_data': configuration['resampling_fn_data'],
                'resampling_fn_data_kwargs': configuration['resampling_fn_data_kwargs'],
                'resampling_fn_mask': configuration['resampling_fn_seg'],
                'resampling_fn_mask_kwargs': configuration['resampling_fn_seg_kwargs'],
                'spacing': cm.spacing, 'patch_size': list(pretrain_patch)}}},
        'pretrain_num_input_channels': int(num_input_channels),
        'recommended_downstream_patchsize': list(cm.patch_size),
        'key_to_encoder': network.key_to_encoder, 'key_to_stem': network.key_to_stem,
        'keys_to_in_proj': list(network.keys_to_in_proj), 'key_to_lpe': getattr(network, 'key_to_lpe', None),
    })


def _configuration_name(plans_manager, configuration_manager) -> str:
    for name in plans_manager.available_configurations:
        if plans_manager.get_configuration(name).configuration == configuration_manager.configuration:
            return name
    return '3d_fullres'


def tensors_under(weights: Mapping[str, torch.Tensor], key: Optional[str]) -> Dict[str, torch.Tensor]:
    """The tensors of ``weights`` below module name ``key`` (as PretrainedTrainer selects them)."""
    if not key:
        return {}
    return {k: v for k, v in weights.items() if k.startswith(key + '.')}


def architecture_from_plan(plan: dict, file: str) -> dict:
    """Our plans' ``architecture`` entry for the adaptation plan's network; DesdError for what we cannot build."""
    arch = plan.get('architecture_plans')
    if not isinstance(arch, dict) or not isinstance(arch.get('arch_class_name'), str):
        raise DesdError(f'{file}: {PLAN_KEY} has no architecture_plans.arch_class_name.')
    name = arch['arch_class_name']
    if name.lower().startswith('primus') or plan.get('key_to_lpe'):
        raise DesdError(f'{file} holds a Primus (transformer) network ({name}); nnunetv2_desd fine-tunes '
                        f'nnU-Net\'s CNN encoders only (ResidualEncoderUNet, PlainConvUNet, the ResEncL preset). '
                        f'Use nnU-Net main\'s nnUNetv2_train_pretrained for Primus checkpoints.')
    if name in PRESETS:
        name, kwargs = PRESETS[name][0], copy.deepcopy(PRESETS[name][1])
    else:
        kwargs = copy.deepcopy(arch.get('arch_kwargs'))
    if name.split('.')[-1] not in CLASSES or not isinstance(kwargs, dict):
        raise DesdError(f'{file}: architecture {arch["arch_class_name"]!r} is not one nnunetv2_desd can build; '
                        f'supported: {", ".join([*PRESETS, *CLASSES])}.')
    return {'network_class_name': CLASSES[name.split('.')[-1]], 'arch_kwargs': kwargs,
            '_kw_requires_import': list(arch.get('arch_kwargs_requiring_import') or REQUIRES_IMPORT)}


def record_from_plan(plan, weights: Mapping[str, torch.Tensor], trainer_name: Optional[str],
                     file: str) -> ExportRecord:
    """Our export record for an nnssl checkpoint (``format`` 'nnssl'); DesdError for an unusable plan."""
    if not isinstance(plan, dict):
        raise DesdError(f'{file}: {PLAN_KEY} is a {type(plan).__name__}, not a dict.')
    architecture = architecture_from_plan(plan, file)
    pretrain = plan.get('pretrain_plan')
    configurations = pretrain.get('configurations') if isinstance(pretrain, dict) else None
    if not isinstance(configurations, dict) or len(configurations) != 1:
        raise DesdError(f'{file}: {PLAN_KEY}.pretrain_plan needs exactly one configuration.')
    configuration = next(iter(configurations.values()))
    missing = [k for k in ('spacing', 'normalization_schemes') if k not in configuration]
    if missing or 'transpose_forward' not in pretrain:
        raise DesdError(f'{file}: {PLAN_KEY}.pretrain_plan lacks {missing or ["transpose_forward"]}.')
    for name in ('key_to_encoder', 'key_to_stem'):
        if not tensors_under(weights, plan.get(name)):
            raise DesdError(f'{file}: {PLAN_KEY}.{name} = {plan.get(name)!r} names no tensor of network_weights '
                            f'(its keys start {sorted(weights)[0]!r}).')
    patch = plan.get('recommended_downstream_patchsize')
    if not (isinstance(patch, (list, tuple)) and len(patch) == 3 and all(isinstance(p, int) and p > 0 for p in patch)):
        raise DesdError(f'{file}: {PLAN_KEY}.recommended_downstream_patchsize {patch!r} is not 3 positive ints.')
    channels = int(plan.get('pretrain_num_input_channels', 1))
    schemes = list(configuration['normalization_schemes'])
    return ExportRecord(
        format=NNSSL_FORMAT, method=f'nnssl {trainer_name or "unknown trainer"}', trainer_name=trainer_name,
        source_dataset=pretrain.get('dataset_name'), plans_name=pretrain.get('plans_name'),
        architecture=architecture, num_input_channels=channels, channel_names=None,
        spacing=[float(s) for s in configuration['spacing']],
        transpose_forward=[int(i) for i in pretrain['transpose_forward']],
        normalization_schemes=schemes, use_mask_for_norm=list(configuration.get('use_mask_for_norm') or
                                                              [False] * len(schemes)),
        foreground_intensity_properties_per_channel={},
        recommended_downstream_patchsize=[int(p) for p in patch],
        content_sha256=tensor_digest(weights),
    )
