"""Worker processes for per-case work that end the command when a worker dies, instead of waiting for ever."""
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Callable, Iterable, Iterator, Optional, Sequence

from tqdm import tqdm

from nnunetv2_desd.common.errors import DesdError


def default_processes(num_processes: Optional[int]) -> int:
    """``num_processes``, or nnU-Net's ``default_num_processes`` (``nnUNet_def_n_proc``, 8) where None."""
    from nnunetv2.configuration import default_num_processes  # reads the environment when first imported
    return default_num_processes if num_processes is None else max(1, int(num_processes))


def run_in_processes(function: Callable, jobs: Sequence, num_processes: Optional[int], stage: str,
                     show_progress: bool = True) -> Iterator:
    """Yields ``function(job)`` for every job, in completion order, with a progress bar named ``stage``.

    ``num_processes`` > 1 runs the jobs in that many spawned processes, with at most two jobs per process in
    flight. A process that dies (the OOM killer, a signal) ends the iteration at once with a DesdError naming
    ``stage``; a job that raises re-raises here. Work already yielded stays done.
    """
    num_processes = default_processes(num_processes)
    bar = tqdm(total=len(jobs), desc=stage, disable=not show_progress or not jobs)
    try:
        if num_processes <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield function(job)
                bar.update()
            return
        yield from _in_pool(function, jobs, min(num_processes, len(jobs)), stage, bar)
    finally:
        bar.close()


def _in_pool(function: Callable, jobs: Iterable, processes: int, stage: str, bar) -> Iterator:
    pending = iter(jobs)
    executor = ProcessPoolExecutor(processes, mp_context=get_context('spawn'))
    in_flight = set()
    try:
        for job in pending:
            in_flight.add(executor.submit(function, job))
            if len(in_flight) < 2 * processes:
                continue
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                bar.update()
        while in_flight:
            done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
                bar.update()
    except BrokenProcessPool:
        _end_processes(executor)
        raise DesdError(f'{stage}: a worker process died (killed by the system, e.g. out of memory?). The cases '
                        f'finished so far are kept; run the same command again to go on, with a smaller -np if memory '
                        f'is short.') from None
    finally:
        executor.shutdown(wait=False, cancel_futures=True)


def _end_processes(executor: ProcessPoolExecutor) -> None:
    """Ends the pool's remaining processes: after one died, the others may wait on queues left in a dirty state
    (``_processes`` is the executor's own table of its processes)."""
    processes = list((getattr(executor, '_processes', None) or {}).values())
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(5)
