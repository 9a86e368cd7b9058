"""Console commands that make nnU-Net find this package's trainers.

``desd_trainer_path`` prints the line that sets nnUNet_extTrainer (``eval "$(desd_trainer_path)"``), after which
the stock nnUNetv2_* commands find the trainers. ``desd_train``, ``desd_predict`` and
``desd_find_best_configuration`` are the stock entry points with the variable set in their own environment
(inherited by DDP children and prediction workers).
"""
import os
import sys

from nnunetv2_desd.common.errors import command_errors
from nnunetv2_desd.trainers.lookup import EXT_TRAINER_FOLDER, with_ext_trainers


def print_trainer_path() -> None:
    print(f'export nnUNet_extTrainer="{EXT_TRAINER_FOLDER}${{nnUNet_extTrainer:+{os.pathsep}$nnUNet_extTrainer}}"')


def _run_stock(entry_point) -> None:
    os.environ.update(with_ext_trainers(os.environ))
    with command_errors(os.path.basename(sys.argv[0])):
        entry_point()


def train() -> None:
    from nnunetv2.run.run_training import run_training_entry  # heavy (nnUNetTrainer)
    _run_stock(run_training_entry)


def predict() -> None:
    # here: imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.inference.predict_from_raw_data import predict_entry_point
    _run_stock(predict_entry_point)


def find_best_configuration() -> None:
    # here: imports nnunetv2.configuration, which reads the environment at import
    from nnunetv2.evaluation.find_best_configuration import find_best_configuration_entry_point
    _run_stock(find_best_configuration_entry_point)
