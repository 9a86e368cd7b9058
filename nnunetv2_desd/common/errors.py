"""One-line errors for every command: ``DesdError``, an argument parser that reports in one line, exit code 2."""
import argparse
import sys
from contextlib import contextmanager


class DesdError(Exception):
    """A problem with the user's input. Command-line tools print its message alone and exit with code 2."""


@contextmanager
def command_errors(prog: str):
    """The body of a command: a DesdError ends it with ``PROG: error: MESSAGE`` on one line and exit code 2."""
    try:
        yield
    except DesdError as e:
        message = ' '.join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f'{prog}: error: {message}', file=sys.stderr)
        sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (unknown option, wrong type, bad choice) are one line, ``PROG: error: ...``,
    with exit code 2, as DesdError's; ``-h`` still prints the usage."""

    def error(self, message: str):
        print(f'{self.prog}: error: {message} (see {self.prog} -h)', file=sys.stderr)
        sys.exit(2)
