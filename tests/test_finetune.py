"""Fine-tuning building blocks: stem adaptation, warm-up + poly schedule, argument lookup, load planning."""
import contextlib
import importlib
import math
import sys

import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.run.run_training import maybe_load_checkpoint
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

from nnunetv2_desd.common.pretrained_weights import (PretrainedExport, adapt_input_channels,
                                                     mismatch_message, plan_loading)
from nnunetv2_desd.common.wrappers import unwrapped
from nnunetv2_desd.trainers.ext import nnunetv2_desd_trainers as ext
from nnunetv2_desd.trainers.finetune import (FINETUNE_PRESETS, NNUNET_LOADER_ARGUMENTS, NNUNET_WEIGHTS_LOADER,
                                             nnUNetTrainerCADS, nnUNetTrainerDeSD, nnUNetTrainerReFs,
                                             scaled_warmup_epochs, weights_nnunet_will_load)
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER, TRAINER_FOR_METHOD
from nnunetv2_desd.trainers.lr_schedule import WarmupPolyLRScheduler, warmup_poly


def test_adapt_input_channels_sums_and_spreads_over_new_channels():
    one_channel = torch.tensor([3.0, 6.0]).view(2, 1, 1, 1, 1)
    two = adapt_input_channels(one_channel, 2)
    assert two.shape == (2, 2, 1, 1, 1)
    assert two.flatten().tolist() == [1.5, 1.5, 3.0, 3.0]
    two_channels = torch.tensor([1.0, 3.0]).view(1, 2, 1, 1, 1)
    assert adapt_input_channels(two_channels, 1).flatten().tolist() == [4.0]
    assert adapt_input_channels(two_channels, 4).flatten().tolist() == [1.0, 1.0, 1.0, 1.0]
    # the same image in every new channel gives the pre-trained response to that image
    x = torch.randn(1, 1, 4, 4, 4)
    w = torch.randn(8, 1, 3, 3, 3)
    expected = torch.nn.functional.conv3d(x, w)
    got = torch.nn.functional.conv3d(x.repeat(1, 3, 1, 1, 1), adapt_input_channels(w, 3))
    assert torch.allclose(got, expected, atol=1e-5)


def test_warmup_scales_with_the_number_of_epochs():
    # 5%, rounded half up, at least 1: 50 of 1000 (nnU-Net main), 7.5 -> 8 of 150, 1.45 -> 1 of 29, 1.5 -> 2 of 30
    assert [scaled_warmup_epochs(n) for n in (1000, 150, 30, 29, 10, 2, 1)] == [50, 8, 2, 1, 1, 1, 1]
    trainer = object.__new__(nnUNetTrainerDeSD)  # the property only reads two attributes
    trainer.num_epochs, trainer.warmup_epochs = 200, None
    assert trainer.warmup_epoch_count == 10
    trainer.warmup_epochs = 3  # set: kept as it is
    assert trainer.warmup_epoch_count == 3


def test_every_method_names_its_own_trainer():
    # desd_plan_like_pretrained recommends TRAINER_FOR_METHOD[export method]; a ReFs export once got nnUNetTrainerDeSD
    assert TRAINER_FOR_METHOD == {cls.method: cls.__name__ for cls in (nnUNetTrainerDeSD, nnUNetTrainerCADS,
                                                                       nnUNetTrainerReFs)}


def test_recipes_and_their_variants():
    assert FINETUNE_PRESETS['pretrained'] == {'initial_lr': 1e-3, 'enable_deep_supervision': False}
    assert FINETUNE_PRESETS['vanilla'] == {'initial_lr': 1e-2, 'enable_deep_supervision': True}
    other = next(r for r in FINETUNE_PRESETS if r != nnUNetTrainerDeSD.recipe)
    variant = getattr(ext, f'nnUNetTrainerDeSDDemo_{other}Recipe')
    twin = getattr(ext, f'nnUNetTrainerDeSDDemo_{other}Recipe_scratch')
    assert variant.recipe == other and not variant.from_scratch and issubclass(twin, variant) and twin.from_scratch
    assert getattr(ext, 'nnUNetTrainerReFsTiny_scratch').from_scratch
    assert getattr(ext, 'nnUNetTrainerReFsTiny_scratch').recipe == nnUNetTrainerDeSD.recipe


# every trainer nnU-Net finds through nnUNet_extTrainer, written out by hand so that a lost or renamed one fails here
SHORT_SCHEDULE_TRAINERS = ['nnUNetTrainerTiny', 'nnUNetTrainerDemo', 'nnUNetTrainerDMDTiny', 'nnUNetTrainerDMDDemo']
PRETRAINED_TRAINERS = ['nnUNetTrainerDeSD', 'nnUNetTrainerCADS', 'nnUNetTrainerReFs',
                       'nnUNetTrainerDeSDTiny', 'nnUNetTrainerCADSTiny', 'nnUNetTrainerReFsTiny',
                       'nnUNetTrainerDeSDDemo', 'nnUNetTrainerCADSDemo', 'nnUNetTrainerReFsDemo']
RECIPE_AND_SCRATCH_VARIANTS = [
    'nnUNetTrainerDeSD_scratch', 'nnUNetTrainerDeSD_pretrainedRecipe', 'nnUNetTrainerDeSD_pretrainedRecipe_scratch',
    'nnUNetTrainerCADS_scratch', 'nnUNetTrainerCADS_pretrainedRecipe', 'nnUNetTrainerCADS_pretrainedRecipe_scratch',
    'nnUNetTrainerReFs_scratch', 'nnUNetTrainerReFs_pretrainedRecipe', 'nnUNetTrainerReFs_pretrainedRecipe_scratch',
    'nnUNetTrainerDeSDTiny_scratch', 'nnUNetTrainerDeSDTiny_pretrainedRecipe',
    'nnUNetTrainerDeSDTiny_pretrainedRecipe_scratch',
    'nnUNetTrainerCADSTiny_scratch', 'nnUNetTrainerCADSTiny_pretrainedRecipe',
    'nnUNetTrainerCADSTiny_pretrainedRecipe_scratch',
    'nnUNetTrainerReFsTiny_scratch', 'nnUNetTrainerReFsTiny_pretrainedRecipe',
    'nnUNetTrainerReFsTiny_pretrainedRecipe_scratch',
    'nnUNetTrainerDeSDDemo_scratch', 'nnUNetTrainerDeSDDemo_pretrainedRecipe',
    'nnUNetTrainerDeSDDemo_pretrainedRecipe_scratch',
    'nnUNetTrainerCADSDemo_scratch', 'nnUNetTrainerCADSDemo_pretrainedRecipe',
    'nnUNetTrainerCADSDemo_pretrainedRecipe_scratch',
    'nnUNetTrainerReFsDemo_scratch', 'nnUNetTrainerReFsDemo_pretrainedRecipe',
    'nnUNetTrainerReFsDemo_pretrainedRecipe_scratch',
]
EXT_TRAINERS = (['nnUNetTrainerDMD', 'nnUNetTrainerDMDEnsemble'] + SHORT_SCHEDULE_TRAINERS + PRETRAINED_TRAINERS +
                RECIPE_AND_SCRATCH_VARIANTS)


def test_nnunets_lookup_finds_every_trainer_and_variant_by_name():

    exported = {name for name, value in vars(ext).items() if isinstance(value, type) and
                issubclass(value, nnUNetTrainer)}
    assert exported == set(EXT_TRAINERS) and len(RECIPE_AND_SCRATCH_VARIANTS) == 27
    try:  # nnUNetv2_train -tr NAME's search of an nnUNet_extTrainer folder (its slow cleanup: once, at the end)
        for name in EXT_TRAINERS:
            found = recursive_find_python_class(EXT_TRAINER_FOLDER, name, None, base_folder=EXT_TRAINER_FOLDER)
            assert found is getattr(ext, name) and found.__name__ == name and issubclass(found, nnUNetTrainer), name
    finally:
        sys.modules.pop('nnunetv2_desd_trainers', None)
    for name in RECIPE_AND_SCRATCH_VARIANTS:  # one override each, on the trainer its name extends
        cls = getattr(ext, name)
        parent = name[:-len('_scratch')] if name.endswith('_scratch') else name[:-len('_pretrainedRecipe')]
        assert cls.__bases__ == (getattr(ext, parent),), name
        assert cls.from_scratch == name.endswith('_scratch') and not getattr(ext, parent).from_scratch, name
        assert cls.recipe == ('pretrained' if '_pretrainedRecipe' in name else nnUNetTrainerDeSD.recipe), name
    assert nnUNetTrainerDeSD.recipe != 'pretrained' and 'pretrained' in FINETUNE_PRESETS


def test_warmup_poly_by_hand():
    # peak 1, 2 warm-up epochs, 10 epochs: 0.5, 1, then (1 - (e - 2) / 8) ** 0.9
    values = [warmup_poly(e, 1.0, 2, 10) for e in range(10)]
    assert values[0] == 0.5 and values[1] == 1.0 and values[2] == 1.0
    assert math.isclose(values[3], (7 / 8) ** 0.9) and math.isclose(values[9], (1 / 8) ** 0.9)
    # a group frozen for 3 epochs: 0, 0, 0, then its own warm-up and decay over the remaining 7 epochs
    frozen = [warmup_poly(e, 1.0, 2, 10, start_epoch=3) for e in range(10)]
    assert frozen[:3] == [0.0, 0.0, 0.0] and frozen[3] == 0.5 and frozen[4] == 1.0
    assert math.isclose(frozen[6], (1 - 1 / 5) ** 0.9)


def test_scheduler_sets_each_group_and_follows_the_epoch_nnunet_passes():
    decoder, encoder = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{'params': [decoder]},
                                 {'params': [encoder], 'lr_scale': 0.1, 'start_epoch': 1}], lr=0.01)
    scheduler = WarmupPolyLRScheduler(optimizer, 0.01, warmup_epochs=2, num_epochs=10)
    assert [g['lr'] for g in optimizer.param_groups] == [0.005, 0.0]
    scheduler.step(2)  # nnU-Net passes current_epoch, also after --c
    assert math.isclose(optimizer.param_groups[0]['lr'], 0.01)
    assert math.isclose(optimizer.param_groups[1]['lr'], 0.001)
    scheduler.step(5)
    assert math.isclose(optimizer.param_groups[0]['lr'], 0.01 * (1 - 3 / 8) ** 0.9)
    assert math.isclose(optimizer.param_groups[1]['lr'], 0.001 * (1 - 2 / 7) ** 0.9)


class _RecordingTrainer:
    """Just what nnU-Net's maybe_load_checkpoint touches; initialize() records what our trainers would load."""
    def __init__(self, folder):
        self.output_folder, self.was_initialized, self.seen = str(folder), False, []

    def initialize(self):
        self.seen.append(weights_nnunet_will_load())
        raise _Stop  # nnU-Net's own loader would run next

    def load_checkpoint(self, _):
        self.initialize()


class _Stop(Exception):
    pass


def test_the_weights_file_comes_from_nnunets_loader_on_every_path(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['python'])  # the Python API: nothing on the command line
    (tmp_path / 'checkpoint_final.pth').write_bytes(b'')
    trainer = _RecordingTrainer(tmp_path)
    for continue_training, validation_only, weights in ((False, False, 'w.pth'), (False, True, 'w.pth'),
                                                        (True, False, None), (False, False, None)):
        with contextlib.suppress(_Stop):
            maybe_load_checkpoint(trainer, continue_training, validation_only, weights)
    # a fresh training with weights: the file; --val (even with -pretrained_weights) and --c: nothing; no weights:
    # nnU-Net does not initialise there at all
    assert trainer.seen == ['w.pth', None, None]
    assert weights_nnunet_will_load() is None  # outside nnU-Net's loader


def test_nnunets_loader_still_has_the_arguments_the_frame_walk_reads():
    module, function = NNUNET_WEIGHTS_LOADER
    code = getattr(importlib.import_module(module), function).__code__
    assert set(NNUNET_LOADER_ARGUMENTS) <= set(code.co_varnames[:code.co_argcount]), code.co_varnames


def test_unwrapped_takes_off_torch_compile():
    network = torch.nn.Linear(2, 2)
    assert unwrapped(network) is network and unwrapped(torch.compile(network)) is network


def _unet(in_channels=1, features=(8, 16, 32)):
    return PlainConvUNet(in_channels, 3, features, torch.nn.Conv3d, 3, [1, 2, 2], 2, 2, [1, 1], True,
                         torch.nn.InstanceNorm3d, {'affine': True}, nonlin=torch.nn.LeakyReLU,
                         deep_supervision=True)


def test_plan_loading_matches_adapts_the_stem_and_names_mismatches():
    export_weights = _unet().state_dict()
    fits = plan_loading(_unet(), export_weights)
    assert fits.fits and fits.stem_key is None
    assert fits.num_loaded == fits.num_encoder_tensors == 24  # 3 stages x 2 convs x (conv w, b, norm w, b)

    two_channels = plan_loading(_unet(in_channels=2), export_weights)
    assert two_channels.fits and two_channels.stem_key == 'encoder.stages.0.0.convs.0.conv.weight'
    stem = two_channels.encoder_tensors['stages.0.0.convs.0.conv.weight']
    assert torch.equal(stem, adapt_input_channels(export_weights[two_channels.stem_key], 2))

    wider = plan_loading(_unet(features=(8, 16, 64)), export_weights)
    assert not wider.fits
    names = [k for k, _, _ in wider.mismatched]
    assert 'encoder.stages.2.0.convs.0.conv.weight' in names
    assert all('.seg_layers.' not in k for k in names)
    message = mismatch_message(wider, PretrainedExport('/x/export.pth', export_weights, {}, 'abc'), 'Dataset7_X',
                               'nnUNetPlans', 'PlainConvUNet')
    assert 'encoder.stages.2.0.convs.0.conv.weight: export (32, 16, 3, 3, 3), network (64, 16, 3, 3, 3)' in message
    assert 'desd_plan_like_pretrained -d Dataset7_X -w /x/export.pth' in message
