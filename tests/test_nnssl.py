"""nnssl interoperability: the nnssl_adaptation_plan of our exports, read back as nnU-Net main's route reads it; nnssl
checkpoints (built here from the schema in docs/nnssl.md, a small ResidualEncoderUNet) planned like, fine-tuned through
stock nnUNetv2_train and predicted; --init from both kinds; bad checkpoints refused in one line."""
import importlib
import json
import pydoc
import shutil

import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

from conftest import TINY, nnunet_env, run_command
from nnunetv2_desd.common.checkpoint import load_checkpoint
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE, with_ext_trainers

pytestmark = pytest.mark.e2e

DATASET = 'Dataset901_Synthetic'
RESENC = dict(n_stages=3, features_per_stage=[8, 16, 32], conv_op='torch.nn.modules.conv.Conv3d',
              kernel_sizes=[[3, 3, 3]] * 3, strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_blocks_per_stage=[1, 1, 1],
              n_conv_per_stage_decoder=[1, 1], conv_bias=True, norm_op='torch.nn.modules.instancenorm.InstanceNorm3d',
              norm_op_kwargs={'eps': 1e-5, 'affine': True}, dropout_op=None, dropout_op_kwargs=None,
              nonlin='torch.nn.LeakyReLU', nonlin_kwargs={'inplace': True})
IMPORTED = ['conv_op', 'norm_op', 'dropout_op', 'nonlin']


def _build_like_nnssl(architecture_plans: dict, num_input_channels: int, num_outputs: int) -> torch.nn.Module:
    """What nnssl's reader does with architecture_plans: a bare class name searched in
    dynamic_network_architectures.architectures, the listed kwargs imported from their dotted names."""
    kwargs = dict(architecture_plans['arch_kwargs'])
    for key in architecture_plans['arch_kwargs_requiring_import']:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    module = importlib.import_module('dynamic_network_architectures.architectures.unet')
    cls = getattr(module, architecture_plans['arch_class_name'])
    return cls(num_input_channels, num_classes=num_outputs, **kwargs)


def nnssl_checkpoint(path, arch_class_name='ResidualEncoderUNet', key_to_encoder='encoder.stages',
                     trainer_name='BaseMAETrainer') -> dict:
    """An nnssl-layout checkpoint: network_weights of the whole network plus the adaptation plan and trainer state."""
    kwargs = {k: (pydoc.locate(v) if k in IMPORTED and v else v) for k, v in RESENC.items()}
    network = ResidualEncoderUNet(1, num_classes=1, **kwargs)  # an MAE reconstructs one channel
    plan = {
        'architecture_plans': {'arch_class_name': arch_class_name, 'arch_kwargs': RESENC,
                               'arch_kwargs_requiring_import': IMPORTED},
        'pretrain_plan': {
            'dataset_name': 'Dataset745_OpenMind', 'plans_name': 'nnsslPlans', 'original_median_spacing_after_transp':
                [1.0, 1.0, 1.0], 'image_reader_writer': 'SimpleITKIO', 'transpose_forward': [0, 1, 2],
            'transpose_backward': [0, 1, 2], 'experiment_planner_used': 'FixedResEncUNetPlanner',
            'configurations': {'onemmiso': {
                'data_identifier': 'nnsslPlans_onemmiso', 'preprocessor_name': 'DefaultPreprocessor',
                'spacing_style': 'onemmiso', 'normalization_schemes': ['ZScoreNormalization'],
                'use_mask_for_norm': [False], 'resampling_fn_data': 'resample_data_or_seg_to_shape',
                'resampling_fn_data_kwargs': {'is_seg': False, 'order': 3, 'order_z': 0, 'force_separate_z': None},
                'resampling_fn_mask': 'resample_data_or_seg_to_shape',
                'resampling_fn_mask_kwargs': {'is_seg': True, 'order': 1, 'order_z': 0, 'force_separate_z': None},
                'spacing': [1.5, 1.5, 1.5], 'patch_size': [16, 16, 16]}}},
        'pretrain_num_input_channels': 1, 'recommended_downstream_patchsize': [16, 16, 16],
        'key_to_encoder': key_to_encoder, 'key_to_stem': 'encoder.stem',
        'keys_to_in_proj': ['encoder.stem.convs.0.conv', 'encoder.stem.convs.0.all_modules.0'], 'key_to_lpe': None,
    }
    checkpoint = {'network_weights': network.state_dict(), 'nnssl_adaptation_plan': plan,
                  'optimizer_state': {}, 'grad_scaler_state': None, 'logging': {}, 'current_epoch': 1000,
                  'init_args': {}, 'trainer_name': trainer_name,
                  'citations': [{'type': 'method', 'name': 'MAE', 'apa_citations': ['(test)']}]}
    torch.save(checkpoint, path)
    return checkpoint


@pytest.fixture
def env(finetune_datasets, tmp_path):
    """A copy of the shared 901 (raw and preprocessed) in this test's own nnU-Net folders."""
    root, _, export = finetune_datasets
    env = with_ext_trainers(nnunet_env(tmp_path))
    for sub in ('raw', 'preprocessed'):
        shutil.copytree(root / sub / DATASET, tmp_path / sub / DATASET)
    return env, export


def test_an_exports_adaptation_plan_rebuilds_its_network_and_names_its_tensors(finetune_datasets):
    _, _, export = finetune_datasets
    checkpoint = load_checkpoint(str(export))
    plan, weights = checkpoint['nnssl_adaptation_plan'], checkpoint['network_weights']
    json.dumps(plan)  # JSON-serialisable, as nnssl stores it in plans files
    assert checkpoint['citations'][0]['name'] == 'DeSD' and checkpoint['citations'][0]['apa_citations']
    assert 'desd_export' in checkpoint  # our own metadata stays as it is
    arch = plan['architecture_plans']
    assert arch['arch_class_name'] == 'PlainConvUNet'
    configuration, = plan['pretrain_plan']['configurations'].values()
    assert configuration['spacing'] == checkpoint['desd_export']['spacing'] and configuration['patch_size'] == [16] * 3
    assert configuration['normalization_schemes'] == ['CTNormalization']
    assert plan['pretrain_num_input_channels'] == 1 and len(plan['recommended_downstream_patchsize']) == 3
    network = _build_like_nnssl(arch, plan['pretrain_num_input_channels'], 3)
    state = network.state_dict()
    for key in ('key_to_encoder', 'key_to_stem'):  # PretrainedTrainer loads the tensors below these module names
        below = {k: v for k, v in weights.items() if k.startswith(plan[key] + '.')}
        assert below and all(state[k].shape == v.shape for k, v in below.items()), key
    for name in plan['keys_to_in_proj']:
        assert weights[name + '.weight'].shape[1] == plan['pretrain_num_input_channels']
    assert plan['key_to_lpe'] is None


def test_an_nnssl_checkpoint_is_planned_like_fine_tuned_and_predicted(env, tmp_path):
    env, _ = env
    ckpt = tmp_path / 'nnssl_mae.pth'
    checkpoint = nnssl_checkpoint(ckpt)
    proc = run_command(['desd_plan_like_pretrained', '-d', '901', '-w', ckpt, '-p', 'nnUNetPlans_nnssl', '-np', '1'],
                       env)
    assert 'nnssl checkpoint' in proc.stdout
    plans = json.loads((tmp_path / 'preprocessed' / DATASET / 'nnUNetPlans_nnssl.json').read_text())
    cfg = plans['configurations']['3d_fullres']
    assert cfg['architecture']['network_class_name'].endswith('ResidualEncoderUNet')
    assert cfg['architecture']['arch_kwargs']['features_per_stage'] == [8, 16, 32]
    assert cfg['spacing'] == [1.5, 1.5, 1.5] and cfg['patch_size'] == [16, 16, 16]
    assert cfg['normalization_schemes'] == ['ZScoreNormalization']  # what the checkpoint was trained with

    run_command(['nnUNetv2_train', '901', '3d_fullres', '0', '-tr', 'nnUNetTrainerDeSDTiny', '-p', 'nnUNetPlans_nnssl',
                 '-pretrained_weights', ckpt, '-device', 'cpu'], env)
    fold = tmp_path / 'results' / DATASET / 'nnUNetTrainerDeSDTiny__nnUNetPlans_nnssl__3d_fullres' / 'fold_0'
    record = json.loads((fold / PROVENANCE_FILE).read_text())
    assert record['checkpoint_format'] == 'nnssl' and record['nnssl_trainer_name'] == 'BaseMAETrainer'
    assert record['method'] == 'nnssl BaseMAETrainer' and record['loaded_encoder_tensors'] == record['encoder_tensors']
    log = next(fold.glob('training_log_*.txt')).read_text()
    assert 'an nnssl checkpoint trained by BaseMAETrainer' in log

    images = tmp_path / 'predict_in'
    images.mkdir()
    case = sorted((tmp_path / 'raw' / DATASET / 'imagesTr').iterdir())[0]
    shutil.copy(case, images / case.name)
    run_command(['nnUNetv2_predict', '-i', images, '-o', tmp_path / 'predict_out', '-d', '901', '-c', '3d_fullres',
                 '-p', 'nnUNetPlans_nnssl', '-tr', 'nnUNetTrainerDeSDTiny', '-f', '0', '-device', 'cpu', '-npp', '0',
                 '-nps', '0', '--disable_progress_bar'], env)  # 0, 0: nnU-Net predicts in-process
    assert (tmp_path / 'predict_out' / case.name.replace('_0000', '')).is_file()

    # --init from the nnssl checkpoint: DeSD on top of its encoder, with the plans that build it
    run_command(['desd_pretrain', '-d', '901', '-p', 'nnUNetPlans_nnssl', '--init', ckpt, '--epochs', '1',
                 '--iters-per-epoch', '1', *TINY], env)
    out = tmp_path / 'results' / DATASET / 'desd__nnUNetPlans_nnssl__3d_fullres'
    meta = load_checkpoint(str(out / 'pretrained_export.pth'))['desd_export']
    assert meta['initialised_from']['format'] == 'nnssl' and meta['initialised_from']['method'] == 'nnssl BaseMAETrainer'
    assert meta['initialised_from']['loaded_encoder_tensors'] > 0
    assert 'encoder initialised from' in next(out.glob('training_log_*.txt')).read_text()
    del checkpoint


def test_init_loads_the_encoder_into_student_and_teacher_or_names_the_differing_tensors(env, tmp_path, monkeypatch):
    env, export = env
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    from nnunetv2_desd.common.errors import DesdError
    from nnunetv2_desd.cli.pretrain import parse_config
    from nnunetv2_desd.pretraining.run import prepare_data
    from nnunetv2_desd.pretraining.distributed import init_distributed
    from nnunetv2_desd.pretraining.engine.loop import Pretrainer
    from nnunetv2_desd.common.pretrained_weights import read_export
    cfg, _ = parse_config(['-d', '901', '--epochs', '1', '--iters-per-epoch', '1', *TINY])
    ctx = init_distributed('cpu')
    prepared = prepare_data(cfg, ctx)
    cfg.plans = prepared.plans_identifier
    ours = read_export(str(export))
    trainer = Pretrainer(cfg, prepared, ctx, str(tmp_path / 'out'), init=ours)
    expected = {k[len('encoder.'):]: v for k, v in ours.weights.items() if k.startswith('encoder.')}
    state = trainer.network.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())
    # the teacher is copied from the loaded student encoder
    assert all(torch.equal(a, b) for a, b in zip(trainer.student.encoder.parameters(),
                                                 trainer.teacher.encoder.parameters()))
    fresh = Pretrainer(cfg, prepared, ctx, str(tmp_path / 'fresh'))
    assert not all(torch.equal(fresh.network.encoder.state_dict()[k], v) for k, v in expected.items())

    nnssl_checkpoint(tmp_path / 'resenc.pth')  # a ResidualEncoderUNet: not what these PlainConvUNet plans build
    with pytest.raises(DesdError, match='its encoder is not the one plans') as error:
        Pretrainer(cfg, prepared, ctx, str(tmp_path / 'other'), init=read_export(str(tmp_path / 'resenc.pth')))
    assert 'encoder.stem' in str(error.value) or 'missing from the checkpoint' in str(error.value)


def test_bad_nnssl_checkpoints_are_refused_in_one_line_with_nothing_written(env, tmp_path):
    env, _ = env
    before = sorted(p.name for p in (tmp_path / 'preprocessed' / DATASET).iterdir())
    cases = {'primus': dict(arch_class_name='PrimusM'), 'keys': dict(key_to_encoder='backbone.stages')}
    messages = {}
    for name, changes in cases.items():
        nnssl_checkpoint(tmp_path / f'{name}.pth', **changes)
        messages[name] = tmp_path / f'{name}.pth'
    neither = tmp_path / 'neither.pth'
    torch.save({'network_weights': {'encoder.w': torch.zeros(2)}}, neither)
    messages['neither'] = neither
    expected = {'primus': 'Primus (transformer)', 'keys': "key_to_encoder = 'backbone.stages' names no tensor",
                'neither': 'neither "desd_export"'}
    for name, path in messages.items():
        for command in (['desd_plan_like_pretrained', '-d', '901', '-w', path, '-np', '1'],
                        ['desd_pretrain', '-d', '901', '--init', path, *TINY]):
            proc = run_command(command, env, check=False)
            lines = [line for line in proc.stderr.splitlines() if line.strip()]
            assert proc.returncode == 2 and len(lines) == 1 and expected[name] in lines[0], (name, proc.stderr)
    assert sorted(p.name for p in (tmp_path / 'preprocessed' / DATASET).iterdir()) == before
    assert not any((tmp_path / 'results').rglob('*.pth'))


def test_the_resenc_l_preset_is_read_as_nnssls_architecture(tmp_path):
    from nnunetv2_desd.common.nnssl import record_from_plan
    plan = nnssl_checkpoint(tmp_path / 'small.pth')['nnssl_adaptation_plan']
    plan['architecture_plans'] = {'arch_class_name': 'ResEncL', 'arch_kwargs': {}, 'arch_kwargs_requiring_import': []}
    kwargs = {k: (pydoc.locate(v) if k in IMPORTED and v else v) for k, v in RESENC.items()}
    weights = ResidualEncoderUNet(1, num_classes=1, **kwargs).state_dict()  # only the key maps are checked here
    arch = record_from_plan(plan, weights, 'BaseMAETrainer', 'x.pth').architecture
    assert arch['network_class_name'] == 'dynamic_network_architectures.architectures.unet.ResidualEncoderUNet'
    kw = arch['arch_kwargs']  # docs/nnssl.md: 6 stages, 32..320, 3x3x3, strides 1,2,2,2,2,2, blocks 1,3,4,6,6,6
    assert kw['features_per_stage'] == [32, 64, 128, 256, 320, 320] and kw['n_blocks_per_stage'] == [1, 3, 4, 6, 6, 6]
    assert kw['strides'] == [[1, 1, 1]] + [[2, 2, 2]] * 5 and kw['kernel_sizes'] == [[3, 3, 3]] * 6
    assert kw['n_conv_per_stage_decoder'] == [1] * 5 and kw['norm_op'].endswith('InstanceNorm3d')
    network = _build_like_nnssl({'arch_class_name': 'ResidualEncoderUNet', 'arch_kwargs': kw,
                                 'arch_kwargs_requiring_import': arch['_kw_requires_import']}, 1, 2)
    assert network.key_to_stem == 'encoder.stem' and len(network.encoder.stages) == 6
