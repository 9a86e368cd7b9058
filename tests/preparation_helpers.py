"""Runs a desd command with each case's preprocessing slowed down, so that a test can interrupt preparation part-way.

    python tests/preparation_helpers.py desd_pretrain -d 950 --preprocess-only ...

With ``DESD_TEST_CASE_DELAY=S`` in the environment every ``run_case_save`` of nnU-Net's preprocessor sleeps S seconds
after writing the case into the staging folder, before the command moves it into place: only the timing changes (in
this process; spawned workers run unchanged), and a kill then lands mid-case, with staged files not moved yet.
"""
import os
import sys
import time


def slow_down_preprocessing(delay: float) -> None:
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
    original = DefaultPreprocessor.run_case_save

    def run_case_save(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        time.sleep(delay)
        return result

    DefaultPreprocessor.run_case_save = run_case_save


def main() -> None:
    command, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
    delay = float(os.environ.get('DESD_TEST_CASE_DELAY', '0'))
    if delay > 0:
        slow_down_preprocessing(delay)
    if command == 'desd_pretrain':
        from nnunetv2_desd.cli.pretrain import main as command_main
    elif command == 'desd_preprocess_unlabelled':
        from nnunetv2_desd.cli.preprocess_unlabelled import main as command_main
    else:
        raise SystemExit(f'preparation_helpers: unknown command {command}')
    command_main()


if __name__ == '__main__':
    main()
