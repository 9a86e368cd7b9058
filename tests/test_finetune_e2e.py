"""Fine-tuning through nnU-Net: the trainers load the export, adapt the stem, refuse mismatches clearly, and the
stock commands (train, predict, evaluate, find best configuration) work with them."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import BIN, run_command
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.checkpoint import file_sha256
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER, PROVENANCE_FILE
from nnunetv2_desd.common.pretrained_weights import adapt_input_channels

pytestmark = pytest.mark.e2e


def _trainer(env, monkeypatch, dataset, trainer='nnUNetTrainerDeSDTiny', plans='nnUNetPlans', export=None):
    """A trainer built in this process as nnU-Net's Python API run_training builds it: nothing on the command line,
    the weights given to nnU-Net's own maybe_load_checkpoint (our loader inside initialize, then nnU-Net's)."""
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint
    for key in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv('nnUNet_extTrainer', EXT_TRAINER_FOLDER)
    monkeypatch.setattr(sys, 'argv', ['python'])
    trainer = get_trainer_from_args(dataset, '3d_fullres', 'all', trainer, plans, device=torch.device('cpu'))
    maybe_load_checkpoint(trainer, False, False, str(export) if export else None)
    return trainer


def _export_weights(export):
    return torch.load(export, map_location='cpu', weights_only=True)['network_weights']


def test_encoder_is_loaded_after_initialize_and_recorded(finetune_datasets, monkeypatch):
    root, env, export = finetune_datasets
    import nnunetv2.run.run_training as run_training
    # nnU-Net's own loader switched off: whatever the encoder holds now, our loader put there
    monkeypatch.setattr(run_training, 'load_pretrained_weights', lambda *args, **kwargs: None)
    trainer = _trainer(env, monkeypatch, '901', export=export)
    weights = _export_weights(export)
    state = trainer.network.state_dict()
    encoder_keys = [k for k in state if k.startswith('encoder.')]
    assert encoder_keys and all(torch.equal(state[k], weights[k]) for k in encoder_keys)
    # a fresh network differs from the export, so the equality above is not an accident of initialisation
    fresh = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1,
                                               trainer.label_manager.num_segmentation_heads).state_dict()
    assert not all(torch.equal(fresh[k], weights[k]) for k in encoder_keys if k.endswith('conv.weight'))

    record = json.loads((root / 'results' / 'Dataset901_Synthetic' / 'nnUNetTrainerDeSDTiny__nnUNetPlans__3d_fullres'
                         / 'fold_all' / PROVENANCE_FILE).read_text())
    assert record['file'] == str(export) and record['file_sha256'] == file_sha256(str(export))
    assert record['loaded_encoder_tensors'] == record['encoder_tensors'] > 0 and record['method'] == 'desd'
    log = open(trainer.log_file).read()
    assert f'loaded {record["encoder_tensors"]} of {record["encoder_tensors"]} encoder tensors from {export} ' \
           f'(a desd export, sha256 {record["file_sha256"]})' in log


def test_two_channel_dataset_gets_the_adapted_stem(finetune_datasets, monkeypatch):
    _, env, export = finetune_datasets
    trainer = _trainer(env, monkeypatch, '902', export=export)
    trainer.restore_adapted_stem()  # on_train_start does this before the first step
    weights = _export_weights(export)
    state = trainer.network.state_dict()
    stem = 'encoder.stages.0.0.convs.0.conv.weight'
    assert weights[stem].shape[1] == 1 and state[stem].shape[1] == 2
    assert torch.equal(state[stem], adapt_input_channels(weights[stem], 2))
    assert all(torch.equal(state[k], weights[k]) for k in state if k.startswith('encoder.') and
               not k.startswith('encoder.stages.0.0.convs.0.'))


def test_other_architecture_is_refused_with_the_tensors_and_the_fix(finetune_datasets, monkeypatch):
    root, env, export = finetune_datasets
    pre = root / 'preprocessed' / 'Dataset902_Synthetic'
    plans = json.loads((pre / 'nnUNetPlans.json').read_text())
    plans['plans_name'] = 'nnUNetPlans_wide'
    plans['configurations']['3d_fullres']['architecture']['arch_kwargs']['features_per_stage'][-1] = 160
    (pre / 'nnUNetPlans_wide.json').write_text(json.dumps(plans))
    with pytest.raises(DesdError) as error:
        _trainer(env, monkeypatch, '902', plans='nnUNetPlans_wide', export=export)
    message = str(error.value)
    assert 'encoder.stages.2.0.convs.0.conv.weight: export (128, 64, 3, 3, 3), network (160, 64, 3, 3, 3)' in message
    assert f'desd_plan_like_pretrained -d Dataset902_Synthetic -w {export}' in message

    # the wrapper prints it as one error with exit code 2, never nnU-Net's bare assertion
    proc = run_command(['desd_train', '902', '3d_fullres', '0', '-tr', 'nnUNetTrainerDeSDTiny', '-p', 'nnUNetPlans_wide',
                        '-pretrained_weights', export, '-device', 'cpu'], env, check=False)
    assert proc.returncode == 2 and 'desd_train: error:' in proc.stderr and 'AssertionError' not in proc.stderr


def test_training_without_pretrained_weights_is_refused(finetune_datasets, monkeypatch):
    _, env, _ = finetune_datasets
    trainer = _trainer(env, monkeypatch, '901')
    with pytest.raises(DesdError, match='add -pretrained_weights EXPORT'):
        trainer.on_train_start()


def test_stock_commands_train_predict_evaluate_and_rank(finetune_datasets, tmp_path):
    """A user's session: the printed export line, then only stock nnU-Net commands, each in a fresh process."""
    root, env, export = finetune_datasets
    env = {k: v for k, v in env.items() if k != 'nnUNet_extTrainer'}
    line = run_command(['desd_trainer_path'], env).stdout.strip()
    assert EXT_TRAINER_FOLDER in line

    def stock(*args):
        script = f'{line}\n' + ' '.join(str(BIN / args[0]) if i == 0 else f"'{a}'" for i, a in enumerate(args))
        proc = subprocess.run(['bash', '-c', script], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc

    stock('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', 'nnUNetTrainerDeSDTiny', '-pretrained_weights', export,
          '-device', 'cpu')
    fold = root / 'results' / 'Dataset901_Synthetic' / 'nnUNetTrainerDeSDTiny__nnUNetPlans__3d_fullres' / 'fold_0'
    assert json.loads((fold / PROVENANCE_FILE).read_text())['file_sha256'] == file_sha256(str(export))
    # --val with the same -pretrained_weights: nnU-Net ignores them, and so do we (the record stays as training left it)
    recorded = (fold / PROVENANCE_FILE).stat().st_mtime_ns
    stock('nnUNetv2_train', '901', '3d_fullres', '0', '-tr', 'nnUNetTrainerDeSDTiny', '--val', '-pretrained_weights',
          export, '-device', 'cpu')
    assert (fold / PROVENANCE_FILE).stat().st_mtime_ns == recorded
    assert (fold / 'checkpoint_final.pth').is_file() and (fold / 'progress.png').is_file()
    summary = json.loads((fold / 'validation' / 'summary.json').read_text())
    assert 0.0 <= summary['foreground_mean']['Dice'] <= 1.0

    raw = root / 'raw' / 'Dataset901_Synthetic'
    images, references, out = tmp_path / 'in', tmp_path / 'ref', tmp_path / 'out'
    images.mkdir()
    references.mkdir()
    for case in sorted((raw / 'imagesTr').iterdir())[:2]:
        shutil.copy(case, images / case.name)
        shutil.copy(raw / 'labelsTr' / case.name.replace('_0000', ''), references)
    stock('nnUNetv2_predict', '-i', images, '-o', out, '-d', '901', '-c', '3d_fullres', '-tr',
          'nnUNetTrainerDeSDTiny', '-f', '0', '-device', 'cpu', '-npp', '1', '-nps', '1')
    predictions = sorted(p.name for p in out.glob('*.nii.gz'))
    assert predictions == sorted(p.name.replace('_0000', '') for p in images.iterdir())

    stock('nnUNetv2_evaluate_folder', references, out, '-djfile', raw / 'dataset.json', '-pfile',
          root / 'preprocessed' / 'Dataset901_Synthetic' / 'nnUNetPlans.json', '-np', '1')
    assert len(json.loads((out / 'summary.json').read_text())['metric_per_case']) == 2

    stock('nnUNetv2_find_best_configuration', '901', '-c', '3d_fullres', '-tr', 'nnUNetTrainerDeSDTiny', '-f', '0',
          '--disable_ensembling', '-np', '1')
    instructions = (root / 'results' / 'Dataset901_Synthetic' / 'inference_instructions.txt').read_text()
    assert 'nnUNetTrainerDeSDTiny' in instructions
