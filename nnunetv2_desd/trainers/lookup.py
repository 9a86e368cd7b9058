"""Where nnU-Net finds this package's trainers (``nnUNet_extTrainer``), the trainer of each pre-training method, and
the provenance file that fine-tuning writes.

nnU-Net looks up ``-tr NAME`` in its own trainer folder, then in every folder listed in the environment variable
``nnUNet_extTrainer`` (also in DDP children and at prediction). ``EXT_TRAINER_FOLDER`` only re-exports this
package's trainers, so pointing the variable at it imports nothing else.
"""
import os

EXT_TRAINER_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ext')
PROVENANCE_FILE = 'pretrained_weights.json'  # written into fold_X by every pre-trained fine-tuning run
TRAINER_FOR_METHOD = {'desd': 'nnUNetTrainerDeSD', 'cads': 'nnUNetTrainerCADS', 'refs': 'nnUNetTrainerReFs'}  # finetune


def with_ext_trainers(env: dict) -> dict:
    """A copy of ``env`` whose nnUNet_extTrainer lists EXT_TRAINER_FOLDER first (other folders are kept)."""
    env = dict(env)
    folders = [f for f in env.get('nnUNet_extTrainer', '').split(os.pathsep) if f and f != EXT_TRAINER_FOLDER]
    env['nnUNet_extTrainer'] = os.pathsep.join([EXT_TRAINER_FOLDER, *folders])
    return env
