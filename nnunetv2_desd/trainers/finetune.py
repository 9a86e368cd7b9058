"""nnU-Net trainers that fine-tune a pre-trained export: ``nnUNetTrainerDeSD``, ``nnUNetTrainerCADS``,
``nnUNetTrainerReFs``.

    nnUNetv2_train D 3d_fullres FOLD -tr nnUNetTrainerDeSD [-p nnUNetPlans_pretrained] -pretrained_weights EXPORT

``FINETUNE_PRESETS`` holds the two recipes (``vanilla``, the default, and ``pretrained``); the trainer attributes
``warmup_epochs``, ``from_scratch``, ``encoder_lr_multiplier`` and ``freeze_encoder_epochs`` adjust them, and the
network class may ask for AdamW (``preferred_optimizer``). ``initialize()`` loads the export's encoder itself,
comparing every tensor first and adapting the stem to other input channels.
Settings, loading and design: docs/finetuning.md.
"""
import os
import sys
from typing import Optional

import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2_desd.common.checkpoint import atomic_write_json
from nnunetv2_desd.common.errors import DesdError
from nnunetv2_desd.common.export_record import NNSSL_FORMAT
from nnunetv2_desd.common.pretrained_weights import mismatch_message, plan_loading, read_export
from nnunetv2_desd.common.wrappers import unwrapped
from nnunetv2_desd.trainers.lookup import PROVENANCE_FILE
from nnunetv2_desd.trainers.lr_schedule import WarmupPolyLRScheduler


# what a trainer's ``recipe`` (and its ``_<name>Recipe`` variant) sets; pre-training's recipes are config.RECIPES
FINETUNE_PRESETS = {
    'pretrained': {'initial_lr': 1e-3, 'enable_deep_supervision': False},  # nnU-Net main's PretrainedTrainer
    'vanilla': {'initial_lr': 1e-2, 'enable_deep_supervision': True},  # nnUNetTrainer's own values
}
DEFAULT_FINETUNE_PRESET = 'vanilla'  # measured: docs/studies.md, label-efficiency study
WARMUP_SHARE = 0.05  # nnU-Net main: 50 warm-up epochs of 1000
# nnU-Net's one loader of -pretrained_weights (module, function) and the arguments of it read here
NNUNET_WEIGHTS_LOADER = ('nnunetv2.run.run_training', 'maybe_load_checkpoint')
NNUNET_LOADER_ARGUMENTS = ('continue_training', 'validation_only', 'pretrained_weights_file')


def scaled_warmup_epochs(num_epochs: int) -> int:
    """5% of num_epochs, rounded half up, at least 1 (50 of 1000, 8 of 150, 1 of 10)."""
    return max(1, int(WARMUP_SHARE * num_epochs + 0.5))


def weights_nnunet_will_load() -> Optional[str]:
    """The ``-pretrained_weights`` file nnU-Net 2.8.1 is about to load, or None.

    ``nnunetv2.run.run_training.maybe_load_checkpoint(trainer, continue_training, validation_only,
    pretrained_weights_file)`` is the one place that loads such weights, on every path: ``nnUNetv2_train``, the
    ``run_training(..., pretrained_weights=X)`` API and each DDP child. For a fresh training with weights it calls
    ``trainer.initialize()`` right before its own loader; ``--c`` and ``--val`` reach ``initialize()`` through it
    too, and then load no weights. None where ``initialize()`` runs elsewhere (nnU-Net then loads no weights).

    Why a frame walk: nnU-Net 2.8.1 declares no contract that names the file. It is an argument of that function
    only: the trainer is built without it and holds no attribute for it, ``initialize()`` takes no argument, the
    plans and dataset.json do not record it, and ``load_pretrained_weights`` runs after ``initialize()``. So the
    file is read from that function's frame up the call stack (nothing of nnU-Net's is changed). The names read
    are ``NNUNET_WEIGHTS_LOADER`` and ``NNUNET_LOADER_ARGUMENTS``; tests/test_finetune.py fails when nnU-Net
    renames them.
    """
    module, function = NNUNET_WEIGHTS_LOADER
    continue_training, validation_only, weights_file = NNUNET_LOADER_ARGUMENTS
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == function and frame.f_globals.get('__name__') == module:
            local = frame.f_locals
            if local.get(continue_training) or local.get(validation_only):
                return None
            return local.get(weights_file)
        frame = frame.f_back
    return None


def preferred_optimizer(network: torch.nn.Module) -> str:
    """'adamw' or 'sgd', from the architecture's class attribute ``preferred_optimizer`` (default 'sgd')."""
    name = str(getattr(network, 'preferred_optimizer', 'sgd')).lower()
    if name not in ('sgd', 'adamw'):
        raise DesdError(f'{type(network).__name__}.preferred_optimizer is {name!r}; fine-tuning knows sgd and adamw.')
    return name


class nnUNetTrainerPretrained(nnUNetTrainer):
    """nnU-Net's trainer with a pre-trained encoder from ``-pretrained_weights`` and the fine-tuning schedule."""
    method = None  # the pre-training method this trainer is named after; another method's export only warns
    recipe = DEFAULT_FINETUNE_PRESET
    from_scratch = False  # the _scratch twins: same recipe and schedule, nnU-Net's random initialisation

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        for key, value in FINETUNE_PRESETS[self.recipe].items():
            setattr(self, key, value)
        self.warmup_epochs = None  # None: scaled_warmup_epochs(num_epochs)
        self.encoder_lr_multiplier = 1.0
        self.freeze_encoder_epochs = 0
        self.adamw_lr = 1e-4  # peak lr for architectures that prefer AdamW
        self.adamw_weight_decay = 0.05
        self.optimizer_name, self.peak_lr = None, None  # set by configure_optimizers
        self.pretrained_file = None
        self._stem_to_restore = None

    @property
    def bare_network(self) -> torch.nn.Module:
        return unwrapped(self.network)

    @property
    def warmup_epoch_count(self) -> int:
        return scaled_warmup_epochs(self.num_epochs) if self.warmup_epochs is None else int(self.warmup_epochs)

    def initialize(self):
        pretrained_file = weights_nnunet_will_load()
        if self.from_scratch and pretrained_file is not None:
            raise DesdError(f'{type(self).__name__} is a from-scratch baseline (nnU-Net\'s random initialisation): '
                            f'drop -pretrained_weights.')
        super().initialize()
        self.pretrained_file = pretrained_file
        if self.pretrained_file is not None:
            self.load_pretrained_encoder(self.pretrained_file)

    def configure_optimizers(self):
        network = self.bare_network
        self.optimizer_name = preferred_optimizer(network)
        encoder = [p for p in network.encoder.parameters() if p.requires_grad]  # PVT's frozen 2D path left out
        encoder_ids = {id(p) for p in network.encoder.parameters()}
        rest = [p for p in network.parameters() if id(p) not in encoder_ids and p.requires_grad]
        # the decoder's group comes first: nnU-Net logs and plots param_groups[0]['lr']
        parts = [('decoder', rest, {}),
                 ('encoder', encoder, {'lr_scale': self.encoder_lr_multiplier,
                                       'start_epoch': self.freeze_encoder_epochs})]
        if self.optimizer_name == 'adamw':
            self.peak_lr = self.adamw_lr
            groups = [{'params': [p for p in params if p.ndim > 1], 'name': name, **extra} for name, params, extra
                      in parts] + [{'params': [p for p in params if p.ndim <= 1], 'name': f'{name} (no decay)',
                                    'weight_decay': 0.0, **extra} for name, params, extra in parts]
            optimizer = torch.optim.AdamW(groups, self.peak_lr, weight_decay=self.adamw_weight_decay)
        else:
            self.peak_lr = self.initial_lr
            groups = [{'params': params, 'name': name, **extra} for name, params, extra in parts]
            optimizer = torch.optim.SGD(groups, self.peak_lr, weight_decay=self.weight_decay, momentum=0.99,
                                        nesterov=True)
        scheduler = WarmupPolyLRScheduler(optimizer, self.peak_lr, self.warmup_epoch_count, self.num_epochs)
        return optimizer, scheduler

    def load_pretrained_encoder(self, path: str) -> None:
        export = read_export(path)
        network = self.bare_network
        plan = plan_loading(network, export.weights)
        dataset = self.plans_manager.dataset_name
        if not plan.fits:
            message = mismatch_message(plan, export, dataset, self.plans_manager.plans_name,
                                       type(network).__name__)
            self.print_to_log_file(message)
            raise DesdError(message)
        network.encoder.load_state_dict(plan.encoder_tensors)
        if plan.stem_key is not None:
            stem = network.get_parameter(plan.stem_key)
            self._stem_to_restore = (stem, stem.data.clone())
            stem.data = export.weights[plan.stem_key].to(stem.device, stem.dtype)  # what nnU-Net's loader checks
        record = export.record
        reference = (record.method_settings or {}).get('reference')
        if record.method == 'refs' and reference == dataset:
            warning = (f'WARNING: {export.file} was pre-trained with {dataset} as its ReFs reference task: its '
                       f'encoder and decoder have already been trained on these labels, validation cases included, '
                       f'so this fold\'s validation is not independent of pre-training. Use a reference dataset '
                       f'other than the one you fine-tune on.')
            self.print_to_log_file(warning)
            print(warning, file=sys.stderr)
        if self.method is not None and record.method != self.method:
            self.print_to_log_file(f'WARNING: {type(self).__name__} is named after {self.method}, but the export '
                                   f'was pre-trained with {record.method}.')
        origin = f'an nnssl checkpoint trained by {record.trainer_name}' \
            if record.format == NNSSL_FORMAT else f'a {record.method} export'
        self.print_to_log_file(
            f'loaded {plan.num_loaded} of {plan.num_encoder_tensors} encoder tensors from {export.file} '
            f'({origin}, sha256 {export.file_sha256})' +
            (f'; stem {plan.stem_key} adapted from {tuple(export.weights[plan.stem_key].shape)} to '
             f'{tuple(self._stem_to_restore[1].shape)} input channels' if plan.stem_key else ''))
        self.print_to_log_file(self.recipe_line())
        if self.local_rank == 0:
            atomic_write_json({
                'file': export.file, 'file_sha256': export.file_sha256,
                'content_sha256': record.content_sha256, 'method': record.method,
                'checkpoint_format': record.format, 'nnssl_trainer_name': record.trainer_name,
                'source_dataset': record.source_dataset, 'export_plans_name': record.plans_name,
                'trainer': type(self).__name__, 'plans_name': self.plans_manager.plans_name,
                'loaded_encoder_tensors': plan.num_loaded, 'encoder_tensors': plan.num_encoder_tensors,
                'adapted_stem': plan.stem_key,
                'recipe': {'name': self.recipe, 'optimizer': self.optimizer_name, 'peak_lr': self.peak_lr,
                           'initial_lr': self.initial_lr, 'warmup_epochs': self.warmup_epoch_count,
                           'deep_supervision': self.enable_deep_supervision,
                           'encoder_lr_multiplier': self.encoder_lr_multiplier,
                           'freeze_encoder_epochs': self.freeze_encoder_epochs, 'num_epochs': self.num_epochs},
            }, os.path.join(self.output_folder, PROVENANCE_FILE))

    def recipe_line(self) -> str:
        return (f'fine-tuning recipe {self.recipe!r}: {self.optimizer_name}, peak lr {self.peak_lr}, deep supervision '
                f'{"on" if self.enable_deep_supervision else "off"}, warm-up {self.warmup_epoch_count} of '
                f'{self.num_epochs} epochs, encoder lr x{self.encoder_lr_multiplier}, encoder frozen for '
                f'{self.freeze_encoder_epochs} epochs' + (', from scratch' if self.from_scratch else ''))

    def restore_adapted_stem(self) -> None:
        """Puts the channel-adapted stem back once nnU-Net's loader has run (no-op without adaptation)."""
        if self._stem_to_restore is not None:
            stem, adapted = self._stem_to_restore
            stem.data = adapted
            self._stem_to_restore = None

    def on_train_start(self):
        self.restore_adapted_stem()
        if not self.from_scratch and self.pretrained_file is None and self.current_epoch == 0:
            raise DesdError(f'{type(self).__name__} fine-tunes pre-trained weights: add -pretrained_weights EXPORT '
                            f'to nnUNetv2_train (train from scratch with nnUNetTrainer or {type(self).__name__}'
                            f'_scratch).')
        super().on_train_start()  # initialises the trainer where no weights were loaded
        if self.from_scratch:
            self.print_to_log_file(self.recipe_line())


class nnUNetTrainerDeSD(nnUNetTrainerPretrained):
    """Fine-tunes a DeSD export (``desd_pretrain -m desd``)."""
    method = 'desd'


class nnUNetTrainerCADS(nnUNetTrainerPretrained):
    """Fine-tunes a CADS export (``desd_pretrain -m cads``); same recipe as DeSD."""
    method = 'cads'


class nnUNetTrainerReFs(nnUNetTrainerPretrained):
    """Fine-tunes a ReFs export (``desd_pretrain -m refs --reference R``); same recipe as DeSD. The export's decoder
    was trained on the reference task (its segmentation outputs are not transferred), so nnU-Net's loader starts
    the decoder from it rather than from a random initialisation; the warm-up still applies to both.

    The pair is not one network: the encoder is the EMA teacher's (as for DeSD), the decoder the one trained against
    the student encoder's features (the teacher never runs the reference task). The teacher follows the student
    closely (momentum -> 1), so the decoder sees slightly shifted features at the start of fine-tuning; the warm-up
    absorbs that. A reference dataset equal to the fine-tuning dataset is warned about: its labels, validation cases
    included, were seen in pre-training."""
    method = 'refs'
