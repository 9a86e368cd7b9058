"""desd_plan_like_pretrained: downstream plans that fit a pre-trained export 1:1.

Unit tests run the pure plans alignment on hand-made planner output and the error paths of ``main`` in-process
(nnunetv2.paths reads the nnU-Net folders at call time, so monkeypatch.setenv is enough). The end-to-end tests
share one real export made by ``desd_pretrain`` and run the real console script once.
"""
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import ExportRecord
from nnunetv2_desd.data.sources import write_synthetic_dataset
from nnunetv2_desd.cli.plan_like_pretrained import main
from nnunetv2_desd.planning.plan_like_pretrained import (PROVENANCE_KEY, inverse_permutation, plan_like_pretrained,
                                                         plans_like_export, round_patch_to_stride, total_stride)

PROG = 'desd_plan_like_pretrained: error:'


# ------------------------------------------------------------------------------------------------------- helpers
def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _architecture(strides) -> dict:
    n = len(strides)
    return {'network_class_name': 'dynamic_network_architectures.architectures.unet.PlainConvUNet',
            'arch_kwargs': {'n_stages': n, 'features_per_stage': [4 * 2 ** i for i in range(n)],
                            'conv_op': 'torch.nn.modules.conv.Conv3d', 'kernel_sizes': [[3, 3, 3]] * n,
                            'strides': strides, 'n_conv_per_stage': [1] * n, 'n_conv_per_stage_decoder': [1] * (n - 1),
                            'conv_bias': True, 'norm_op': 'torch.nn.modules.instancenorm.InstanceNorm3d',
                            'norm_op_kwargs': {'eps': 1e-05, 'affine': True}, 'dropout_op': None,
                            'dropout_op_kwargs': None, 'nonlin': 'torch.nn.LeakyReLU',
                            'nonlin_kwargs': {'inplace': True}},
            '_kw_requires_import': ['conv_op', 'norm_op', 'dropout_op', 'nonlin']}


def _meta(**overrides) -> dict:
    meta = {'format': 'nnunetv2_desd.export', 'version': 1, 'method': 'desd', 'source_dataset': 'Dataset900_Src',
            'plans_source': 'Dataset900_Src', 'plans_name': 'nnUNetPlans', 'configuration': '3d_fullres',
            'architecture': _architecture([[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]),  # total stride [8, 8, 4]
            'num_input_channels': 1, 'channel_names': {'0': 'CT'},
            'spacing': [3.0, 1.0, 1.5], 'transpose_forward': [2, 0, 1],
            'normalization_schemes': ['CTNormalization'], 'use_mask_for_norm': [False],
            'foreground_intensity_properties_per_channel': {'0': {'mean': 41.5, 'std': 73.3, 'percentile_00_5': -18.0,
                                                                  'percentile_99_5': 701.0}},
            'patch_size': [16, 16, 16], 'plans_patch_size': [32, 32, 32], 'content_sha256': 'c' * 64}
    meta.update(overrides)
    return meta


def _record(meta: dict) -> ExportRecord:
    return ExportRecord.from_dict(meta, '/x/export.pth')


def _planned() -> dict:
    """What nnU-Net's planner returns, in its own axis order transpose [2, 1, 0] (the export's is [2, 0, 1])."""
    fullres = {'data_identifier': 'nnUNetPlans_3d_fullres', 'preprocessor_name': 'DefaultPreprocessor',
               'batch_size': 3, 'patch_size': [40, 100, 60], 'median_image_size_in_voxels': [50.0, 110.0, 70.0],
               'spacing': [3.0, 1.5, 1.0], 'normalization_schemes': ['ZScoreNormalization'],
               'use_mask_for_norm': [True], 'architecture': _architecture([[1, 1, 1], [2, 2, 2]]), 'batch_dice': False}
    return {'dataset_name': 'Dataset901_Down', 'plans_name': 'nnUNetPlans',
            'original_median_spacing_after_transp': [3.0, 1.5, 1.0],
            'original_median_shape_after_transp': [50, 110, 70], 'image_reader_writer': 'SimpleITKIO',
            'transpose_forward': [2, 1, 0], 'transpose_backward': [2, 1, 0],
            'configurations': {'2d': {**fullres, 'patch_size': [100, 60], 'spacing': [1.5, 1.0]},
                               '3d_lowres': {**fullres, 'spacing': [6.0, 3.0, 2.0]}, '3d_fullres': fullres},
            'experiment_planner_used': 'ExperimentPlanner', 'label_manager': 'LabelManager',
            'foreground_intensity_properties_per_channel': {'0': {'mean': 7.0}}}


def _write_fake_export(path: Path, meta: dict = None) -> Path:
    torch.save({'network_weights': {'encoder.w': torch.zeros(2)}, 'desd_export': meta or _meta()}, path)
    return path


def _exit_2(argv, capsys) -> str:
    """Runs main in-process; asserts exit code 2 and a one-line message on stderr; returns the message."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(PROG), err
    return lines[0][len(PROG):].strip()


def _files(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())


@pytest.fixture
def nnunet_folders(tmp_path, monkeypatch):
    env = nnunet_env(tmp_path)
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    return tmp_path


# ---------------------------------------------------------------------------------------------------- unit tests
def test_total_stride_and_patch_rounding():
    assert total_stride({'strides': [[1, 1, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]]}) == [8, 8, 4]
    assert total_stride({'strides': [1, 2, 2]}) == [4, 4, 4]  # scalar strides mean all axes
    # 50/8 = 6.25 -> 48; 12/8 = 1.5 rounds up -> 16; 3/4 = 0.75 -> 4; 1/8 rounds to 0 -> at least one stride
    assert round_patch_to_stride([50, 12, 3], [8, 8, 4]) == [48, 16, 4]
    assert round_patch_to_stride([1, 64, 5], [8, 8, 4]) == [8, 64, 4]
    assert inverse_permutation([2, 0, 1]) == [1, 2, 0]


def test_plans_take_export_architecture_spacing_transpose_and_normalisation():
    meta = _meta()
    plans = plans_like_export(_planned(), _record(meta), '/x/export.pth', 'f' * 64, 'nnUNetPlans_pretrained',
                              '3d_fullres', {'channel_names': {'0': 'CT'}})
    assert list(plans['configurations']) == ['3d_fullres']
    cfg = plans['configurations']['3d_fullres']
    assert cfg['architecture'] == meta['architecture'] and cfg['spacing'] == [3.0, 1.0, 1.5]
    assert plans['transpose_forward'] == [2, 0, 1] and plans['transpose_backward'] == [1, 2, 0]
    # planner patch [40, 100, 60] in its order [2, 1, 0] = [60, 100, 40] in the original axis order;
    # in the export's order [2, 0, 1]: [40, 60, 100]; rounded to stride [8, 8, 4]: [40, 64, 100]
    assert cfg['patch_size'] == [40, 64, 100]
    assert cfg['median_image_size_in_voxels'] == [50.0, 70.0, 110.0]
    assert plans['original_median_shape_after_transp'] == [50, 70, 110]
    assert cfg['batch_size'] == 3 and cfg['batch_dice'] is False
    assert cfg['data_identifier'] == 'nnUNetPlans_pretrained_3d_fullres' and plans['plans_name'] == 'nnUNetPlans_pretrained'
    assert cfg['normalization_schemes'] == ['CTNormalization'] and cfg['use_mask_for_norm'] == [False]
    assert plans['foreground_intensity_properties_per_channel']['0']['percentile_99_5'] == 701.0
    assert plans[PROVENANCE_KEY] == {'file': '/x/export.pth', 'file_sha256': 'f' * 64, 'content_sha256': 'c' * 64,
                                     'method': 'desd', 'source_dataset': 'Dataset900_Src', 'plans_name': 'nnUNetPlans'}


def test_other_channels_keep_the_datasets_own_normalisation():
    planned = _planned()
    for channels in ({'0': 'MRI'}, {'0': 'CT', '1': 'CT'}):
        plans = plans_like_export(planned, _record(_meta()), '/x/e.pth', 'f' * 64, 'P', '3d_fullres',
                                  {'channel_names': channels})
        cfg = plans['configurations']['3d_fullres']
        assert cfg['normalization_schemes'] == ['ZScoreNormalization'] and cfg['use_mask_for_norm'] == [True]
        assert plans['foreground_intensity_properties_per_channel'] == {'0': {'mean': 7.0}}
        assert cfg['architecture'] == _meta()['architecture']  # the encoder is the export's all the same


def test_configurations_not_at_the_export_spacing_are_refused():
    planned = _planned()
    planned['configurations']['3d_cascade_fullres'] = {'inherits_from': '3d_fullres', 'previous_stage': '3d_lowres'}
    for configuration, expected in (('2d', "'2d' is 2D"), ('3d_lowres', 'spacing [6.0, 2.0, 3.0], not at'),
                                    ('3d_cascade_fullres', 'cascade stage'), ('3d_big', 'no configuration')):
        with pytest.raises(DesdError, match=expected.replace('[', r'\[').replace(']', r'\]')):
            plans_like_export(planned, _record(_meta()), '/x/e.pth', 'f' * 64, 'P', configuration,
                              {'channel_names': {'0': 'CT'}})


def test_bad_export_files_exit_2_and_write_nothing(nnunet_folders, capsys):
    root = nnunet_folders
    write_synthetic_dataset(str(root / 'raw'), 901, 'Down', n_cases=2, shape=(16, 16, 16), labelled=True)
    good = _write_fake_export(root / 'good.pth')
    torch.save({'a': 1}, root / 'not_export.pth')
    (root / 'truncated.pth').write_bytes(good.read_bytes()[:200])
    _write_fake_export(root / 'other_format.pth', _meta(format='someone.else'))
    _write_fake_export(root / 'incomplete.pth', {k: v for k, v in _meta().items() if k != 'spacing'})

    assert 'is not an nnunetv2_desd export (no "network_weights")' in _exit_2(['-d', 901, '-w', root / 'not_export.pth'],
                                                                        capsys)
    assert 'is not a valid checkpoint' in _exit_2(['-d', 901, '-w', root / 'truncated.pth'], capsys)
    assert "format 'someone.else'" in _exit_2(['-d', 901, '-w', root / 'other_format.pth'], capsys)
    assert "'spacing'" in _exit_2(['-d', 901, '-w', root / 'incomplete.pth'], capsys)
    assert 'not found' in _exit_2(['-d', 901, '-w', root / 'missing.pth'], capsys)
    assert _files(root / 'preprocessed') == [] and _files(root / 'results') == []


def test_bad_datasets_exit_2_and_write_nothing(nnunet_folders, capsys):
    root = nnunet_folders
    export = _write_fake_export(root / 'export.pth')
    write_synthetic_dataset(str(root / 'raw'), 901, 'Down', n_cases=2, shape=(16, 16, 16), labelled=True)
    write_synthetic_dataset(str(root / 'raw'), 902, 'Unlabelled', n_cases=2, shape=(16, 16, 16), labelled=False)
    (root / 'preprocessed' / 'Dataset903_OnlyPreprocessed').mkdir()

    message = _exit_2(['-d', 977, '-w', export], capsys)
    assert "dataset '977' not found" in message
    assert 'not labelled' in _exit_2(['-d', 902, '-w', export], capsys)
    assert 'has no raw dataset' in _exit_2(['-d', 903, '-w', export], capsys)
    assert 'unknown nnU-Net planner' in _exit_2(['-d', 901, '-w', export, '-pl', 'NoSuchPlanner'], capsys)
    assert 'plans name' in _exit_2(['-d', 901, '-w', export, '-p', '../escape'], capsys)
    assert _files(root / 'preprocessed') == [] and _files(root / 'results') == []


def test_foreign_plans_file_is_never_overwritten(nnunet_folders, capsys):
    root = nnunet_folders
    export = _write_fake_export(root / 'export.pth')
    name = write_synthetic_dataset(str(root / 'raw'), 901, 'Down', n_cases=2, shape=(16, 16, 16), labelled=True)
    stock = root / 'preprocessed' / name / 'nnUNetPlans.json'
    stock.parent.mkdir()
    stock.write_text('{"plans_name": "nnUNetPlans", "configurations": {}}')
    before = stock.read_bytes()
    assert 'not overwriting' in _exit_2(['-d', 901, '-w', export, '-p', 'nnUNetPlans'], capsys)
    assert stock.read_bytes() == before and _files(root / 'preprocessed') == [f'{name}/nnUNetPlans.json']


def test_planner_failure_becomes_one_error_and_is_rolled_back(nnunet_folders, monkeypatch, capsys):
    """A planner assert (here a bare one, as many of nnU-Net's are) -> DesdError naming it; the folder is restored."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    import nnunetv2_desd.planning.plan_like_pretrained as module
    root = nnunet_folders
    export = _write_fake_export(root / 'export.pth')
    name = write_synthetic_dataset(str(root / 'raw'), 901, 'Down', n_cases=2, shape=(16, 16, 16), labelled=True)
    pre = root / 'preprocessed' / name
    pre.mkdir()
    (pre / 'dataset.json').write_text('{"old": true}')
    (pre / 'nnUNetPlans.json').write_text('{"stock": true}')

    def fake_fingerprint(dataset_name, dataset_id, num_processes):  # what nnU-Net's extractor leaves behind
        (pre / 'dataset_fingerprint.json').write_text('{}')

    # a plain module (not rewritten by pytest), so the assert carries no message, like nnU-Net's own
    (root / 'failing_planner.py').write_text(
        'import os\n'
        'def plan_experiment(self):\n'
        f'    open(os.path.join({str(pre)!r}, "dataset.json"), "w").write("copied")\n'
        f'    os.mkdir(os.path.join({str(pre)!r}, "partial_data"))\n'
        '    assert len(self.dataset) > 99\n')
    spec = importlib.util.spec_from_file_location('failing_planner', root / 'failing_planner.py')
    failing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(failing)
    monkeypatch.setattr(module, '_extract_fingerprint', fake_fingerprint)
    monkeypatch.setattr(ExperimentPlanner, 'plan_experiment', failing.plan_experiment)
    message = _exit_2(['-d', 901, '-w', export], capsys)
    assert message.startswith(f'nnU-Net planner ExperimentPlanner failed on {name} at target spacing [3.0, 1.0, 1.5]')
    assert message.endswith('AssertionError: assert len(self.dataset) > 99 (failing_planner.py:5)')
    assert _files(pre) == ['dataset.json', 'nnUNetPlans.json'] and not (pre / 'partial_data').exists()
    assert (pre / 'dataset.json').read_text() == '{"old": true}'
    assert (pre / 'nnUNetPlans.json').read_text() == '{"stock": true}'


# -------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
    """A real (1-step) DeSD export of an unlabelled pool at 2 mm, and a labelled downstream dataset at 1.5x1.5x3 mm."""
    root = tmp_path_factory.mktemp('plan_like_pretrained')
    env = nnunet_env(root)
    source = write_synthetic_dataset(env['nnUNet_raw'], 900, n_cases=3, shape=(32, 32, 32), spacing=(2, 2, 2),
                                     labelled=False)
    run_command(['desd_pretrain', '-d', '900', '--epochs', '1', '--iters-per-epoch', '1', *TINY], env)
    export = root / 'results' / source / 'desd__nnUNetPlans__3d_fullres' / 'pretrained_export.pth'
    downstream = write_synthetic_dataset(env['nnUNet_raw'], 901, 'Down', n_cases=5, shape=(32, 32, 32),
                                         spacing=(1.5, 1.5, 3), labelled=True, seed=1)
    return root, env, export, downstream


@pytest.mark.e2e
def test_console_script_plans_and_preprocesses_like_the_export(pretrained, monkeypatch):
    from nnunetv2.experiment_planning.plan_and_preprocess_api import plan_experiment_dataset
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root, env, export, name = pretrained
    proc = run_command(['desd_plan_like_pretrained', '-d', '901', '-w', export, '-np', '1'], env)
    assert f'next: nnUNetv2_train 901 3d_fullres FOLD -tr nnUNetTrainerDeSD -p nnUNetPlans_pretrained ' \
           f'-pretrained_weights {export}' in proc.stdout, proc.stdout
    assert "(the export's)" in proc.stdout  # both datasets have one 'CT' channel

    checkpoint = torch.load(export, map_location='cpu', weights_only=True)
    meta = checkpoint['desd_export']
    pre = root / 'preprocessed' / name
    plans = json.loads((pre / 'nnUNetPlans_pretrained.json').read_text())
    cfg = plans['configurations']['3d_fullres']
    assert list(plans['configurations']) == ['3d_fullres']
    assert cfg['architecture'] == meta['architecture']
    assert cfg['spacing'] == meta['spacing'] == [2.0, 2.0, 2.0]  # the downstream's own would be (3, 1.5, 1.5)
    assert plans['transpose_forward'] == meta['transpose_forward']
    assert all(p % s == 0 and p >= s for p, s in zip(cfg['patch_size'], total_stride(cfg['architecture']['arch_kwargs'])))
    assert plans[PROVENANCE_KEY]['file_sha256'] == _sha256(export)
    assert plans[PROVENANCE_KEY]['content_sha256'] == meta['content_sha256']
    assert plans[PROVENANCE_KEY]['file'] == str(export) and plans[PROVENANCE_KEY]['method'] == 'desd'
    assert cfg['normalization_schemes'] == meta['normalization_schemes']
    assert plans['foreground_intensity_properties_per_channel'] == meta['foreground_intensity_properties_per_channel']

    cases = sorted(p.name[:-len('_0000.nii.gz')] for p in (root / 'raw' / name / 'imagesTr').iterdir())
    data = pre / 'nnUNetPlans_pretrained_3d_fullres'
    assert len(cases) == 5
    assert sorted(p.stem for p in data.glob('*.b2nd') if not p.stem.endswith('_seg')) == cases
    assert sorted(p.stem for p in data.glob('*_seg.b2nd')) == [c + '_seg' for c in cases]
    assert not (pre / 'nnUNetPlans_3d_fullres').exists()

    # the plans build a network whose every non-seg_layers tensor has the export's key and shape
    pm = PlansManager(plans)
    dataset_json = json.loads((pre / 'dataset.json').read_text())
    network = nnUNetTrainer.build_network_architecture(
        pm, pm.get_configuration('3d_fullres'), len(dataset_json['channel_names']),
        pm.get_label_manager(dataset_json).num_segmentation_heads)
    mine = {k: tuple(v.shape) for k, v in network.state_dict().items() if '.seg_layers.' not in k}
    theirs = {k: tuple(v.shape) for k, v in checkpoint['network_weights'].items() if '.seg_layers.' not in k}
    assert mine == theirs
    load_pretrained_weights(network, str(export))  # stock nnU-Net loading asserts keys and shapes itself
    encoder = {k: v for k, v in network.state_dict().items() if k.startswith('encoder.')}
    assert encoder and all(torch.equal(v, checkpoint['network_weights'][k]) for k, v in encoder.items())

    # stock plans made afterwards are left alone by another pre-trained plan, and cannot be overwritten by one
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    plan_experiment_dataset(901)
    stock = (pre / 'nnUNetPlans.json').read_bytes()
    second = plan_like_pretrained('901', str(export), plans_name='nnUNetPlans_pretrained2', preprocess=False)
    assert (pre / 'nnUNetPlans.json').read_bytes() == stock
    again = json.loads(Path(second).read_text())
    assert again['configurations']['3d_fullres']['data_identifier'] == 'nnUNetPlans_pretrained2_3d_fullres'
    assert again['configurations']['3d_fullres']['patch_size'] == cfg['patch_size']
    assert not (pre / 'nnUNetPlans_pretrained2_3d_fullres').exists()
    with pytest.raises(DesdError, match='not overwriting'):
        plan_like_pretrained('901', str(export), plans_name='nnUNetPlans', preprocess=False)
    assert (pre / 'nnUNetPlans.json').read_bytes() == stock


@pytest.mark.e2e
def test_truncated_real_export_exits_2(pretrained, tmp_path, monkeypatch, capsys):
    root, env, export, name = pretrained
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(export.read_bytes()[:export.stat().st_size // 2])
    before = _files(root / 'preprocessed')
    message = _exit_2(['-d', 901, '-w', truncated, '-p', 'never_written'], capsys)
    assert message.startswith(f'{truncated} is not a valid checkpoint') and 'Traceback' not in message
    assert _files(root / 'preprocessed') == before
