"""The export's metadata record: the keys on disk (written by hand, in the order the engine has always written them),
the round trip, and the refusal of a missing key or another format in one line."""
import pytest

from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import ExportRecord

ON_DISK = {  # a desd_pretrain export's desd_export, key for key
    'format': 'nnunetv2_desd.export', 'version': 1, 'method': 'refs', 'source_dataset': 'Dataset900_Pool',
    'plans_source': 'Dataset901_Ref', 'pool': {'datasets': ['Dataset900_Pool']}, 'plans_name': 'nnUNetPlans',
    'configuration': '3d_fullres',
    'architecture': {'network_class_name': 'PlainConvUNet', 'arch_kwargs': {'strides': [[1, 1, 1], [2, 2, 2]]},
                     '_kw_requires_import': ['conv_op']},
    'num_input_channels': 1, 'channel_names': {'0': 'CT'}, 'spacing': [1.0, 1.0, 1.0], 'transpose_forward': [0, 1, 2],
    'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
    'foreground_intensity_properties_per_channel': {'0': {'mean': 1.0}}, 'patch_size': [16, 16, 16],
    'plans_patch_size': [32, 32, 32], 'distilled_stages': [0, 1], 'epochs': 2, 'steps': 4,
    'method_settings': {'reference': 'Dataset901_Ref'}, 'initialised_from': None, 'content_sha256': 'c' * 64}


def test_a_stored_export_round_trips_key_for_key():
    record = ExportRecord.from_dict(ON_DISK, 'e.pth')
    assert (record.method, record.plans_source, record.steps, record.trainer_name) == ('refs', 'Dataset901_Ref', 4, None)
    written = record.to_dict()
    assert written == ON_DISK and list(written) == list(ON_DISK)  # same keys, same order, same values


def test_an_nnssl_record_holds_its_own_keys():
    nnssl = ExportRecord(format='nnssl', method='nnssl BaseMAETrainer', trainer_name='BaseMAETrainer',
                         source_dataset=None, plans_name='p', architecture={}, num_input_channels=1, channel_names=None,
                         spacing=[1.0] * 3, transpose_forward=[0, 1, 2], normalization_schemes=['ZScoreNormalization'],
                         use_mask_for_norm=[False], foreground_intensity_properties_per_channel={},
                         recommended_downstream_patchsize=[64] * 3, content_sha256='d' * 64)
    assert sorted(nnssl.to_dict()) == sorted(
        ['format', 'method', 'trainer_name', 'source_dataset', 'plans_name', 'architecture', 'num_input_channels',
         'channel_names', 'spacing', 'transpose_forward', 'normalization_schemes', 'use_mask_for_norm',
         'foreground_intensity_properties_per_channel', 'recommended_downstream_patchsize', 'content_sha256'])
    assert ExportRecord.from_dict(nnssl.to_dict(), 'n.pth') == nnssl


def test_a_missing_key_or_another_format_is_refused_in_one_line():
    for key in ('spacing', 'content_sha256', 'channel_names'):
        with pytest.raises(DesdError, match=rf"^e\.pth is not an nnunetv2_desd export \(incomplete: missing "
                                            rf"\['{key}'\]\)\.$"):
            ExportRecord.from_dict({k: v for k, v in ON_DISK.items() if k != key}, 'e.pth')
    with pytest.raises(DesdError, match=r"\(format 'someone\.else', expected 'nnunetv2_desd\.export'\)\.$"):
        ExportRecord.from_dict({**ON_DISK, 'format': 'someone.else'}, 'e.pth')
    with pytest.raises(DesdError, match=r'no "desd_export" metadata'):
        ExportRecord.from_dict({}, 'e.pth')
    optional = {k: v for k, v in ON_DISK.items() if k not in ('pool', 'plans_source', 'epochs', 'steps')}
    assert ExportRecord.from_dict(optional, 'e.pth').pool is None  # an older export without them still reads
    flat = {**ON_DISK, 'architecture': {'arch_kwargs': {'strides': [[1, 1], [2, 2]]}}}
    with pytest.raises(DesdError, match=r'not a 3D nnunetv2_desd export \(strides \[\[1, 1\], \[2, 2\]\]'):
        ExportRecord.from_dict(flat, 'e.pth').check_3d('e.pth')
