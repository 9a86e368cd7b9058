"""One-line errors for every command: ``DesdError``, an argument parser that reports in one line, exit code 2."""
import argparse
import sys
from contextlib import contextmanager


class DesdError(Exception):
    """A problem with the user's input. Command-line tools print its message alone and exit with code 2."""


class RunInterrupted(Exception):
    """A run stopped by a signal after writing its checkpoint; commands exit with ``EXIT_INTERRUPTED``."""


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: try again (with --c); a job script requeues on it


@contextmanager
def command_errors(prog: str):
    """The body of a command: a DesdError ends it with ``PROG: error: MESSAGE`` on one line and exit code 2."""
    try:
        yield
    except DesdError as e:
        message = ' '.join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f'{prog}: error: {message}', file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as e:
        print(f'{prog}: interrupted: {e}', file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (unknown option, wrong type, bad choice) are one line, ``PROG: error: ...``,
    with exit code 2, as DesdError's; ``-h`` still prints the usage."""

    def error(self, message: str):
        print(f'{self.prog}: error: {message} (see {self.prog} -h)', file=sys.stderr)
        sys.exit(2)


def add_share_options(parser: argparse.ArgumentParser) -> None:
    """``--part I --parts N``: the preparation commands' split of the cases across jobs."""
    parser.add_argument('--part', type=int, default=0,
                        help='prepare only share I (0-based) of --parts N; run every part, in any order or at once, '
                             'then a run without them finds everything done (default: %(default)s)')
    parser.add_argument('--parts', type=int, default=1, help='number of shares (default: %(default)s)')


def check_share(part: int, parts: int, preparation_only: bool = True):
    """(part, parts), or DesdError for a share that does not exist or a training run given one."""
    if parts < 1 or not 0 <= part < parts:
        raise DesdError(f'--part {part} --parts {parts}: expected 0 <= part < parts.')
    if parts > 1 and not preparation_only:
        raise DesdError('--part/--parts split the preparation across jobs: use them with --preprocess-only.')
    return part, parts
