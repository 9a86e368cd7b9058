"""One writer at a time per prepared folder: an exclusive POSIX lock (``fcntl.lockf``, honoured over NFSv4)."""
import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager

LOCK_FILE = '.desd_prepare.lock'


@contextmanager
def folder_lock(folder: str, what: str = 'preparation'):
    """Holds ``folder``'s lock; a second holder waits, saying who holds it. Released by the OS if the holder dies."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    handle = open(path, 'a+')
    try:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or 'another process'
            print(f'{folder} is being prepared by {holder}; waiting for it to finish (lock {path}).',
                  file=sys.stderr, flush=True)
            start = time.time()
            fcntl.lockf(handle, fcntl.LOCK_EX)
            print(f'lock {path} acquired after {time.time() - start:.0f} s.', file=sys.stderr, flush=True)
        handle.seek(0)
        handle.truncate()
        handle.write(f'{what} by pid {os.getpid()} on {socket.gethostname()}')
        handle.flush()
        try:
            yield
        finally:  # no stale name for the next waiter: it reads 'another process' until the next holder writes
            handle.seek(0)
            handle.truncate()
            handle.flush()
    finally:
        handle.close()  # closing releases the lock
