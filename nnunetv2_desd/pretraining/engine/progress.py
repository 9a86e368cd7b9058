"""nnU-Net-style training log file and progress.png for pre-training runs; per-step values summed on the device;
the stop signals of a cluster."""
import os
import signal
from contextlib import contextmanager
from datetime import datetime
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunetv2_desd.common.checkpoint import atomic_write

# panels in order: (axis label, quantities drawn in it); anything else gets a panel of its own, in recording order
_PANELS = (('loss', ('loss',)), ('entropy', ('teacher_entropy', 'student_entropy')),
           ('KL(teacher || student)', ('kl_teacher_student',)), ('teacher temperature', ('teacher_temp',)),
           ('teacher momentum', ('teacher_momentum',)), ('learning rate', ('lr',)), ('epoch time [s]', ('epoch_time',)))
_PANEL_KEYS = {'loss': 'loss', 'entropy': 'entropy'}  # reference_lines name panels by these keys


class ProgressLog:
    """Timestamped log file plus per-epoch scalar history. Non-main ranks (is_main=False) do nothing."""

    def __init__(self, output_folder: str, is_main: bool = True, name: str = 'pretraining',
                 reference_lines: Optional[Dict[str, Tuple[float, str]]] = None):
        """``reference_lines``: panel key ('loss', 'entropy') -> (value, label) drawn as a horizontal line."""
        self.output_folder = output_folder
        self.reference_lines = reference_lines or {}
        self.is_main = is_main
        self.name = name
        self.history = {}  # quantity -> {'epoch': [int], 'value': [float]}
        self.log_file = None
        if is_main:
            os.makedirs(output_folder, exist_ok=True)
            stamp = datetime.now().strftime('%Y_%m_%d_%H_%M_%S')
            self.log_file = os.path.join(output_folder, f'training_log_{stamp}.txt')
            with open(self.log_file, 'a'):
                pass

    def log(self, *msg) -> None:
        if not self.is_main:
            return
        line = datetime.now().strftime('%Y-%m-%d %H:%M:%S.%f') + ': ' + ' '.join(str(m) for m in msg)
        with open(self.log_file, 'a') as f:
            f.write(line + '\n')
        print(line, flush=True)

    def record(self, epoch: int, **values: float) -> None:
        """Store scalars for ``epoch``; recording an epoch again (e.g. after a resume) overwrites it."""
        for key, value in values.items():
            series = self.history.setdefault(key, {'epoch': [], 'value': []})
            if epoch in series['epoch']:
                series['value'][series['epoch'].index(epoch)] = float(value)
            else:
                series['epoch'].append(int(epoch))
                series['value'].append(float(value))

    def plot(self) -> None:
        """Write progress.png (one panel per quantity vs epoch) atomically into output_folder."""
        if not self.is_main or not self.history:
            return
        panels = [(label, [k for k in keys if k in self.history]) for label, keys in _PANELS]
        known = {k for _, keys in _PANELS for k in keys}
        panels = [p for p in panels if p[1]] + [(k, [k]) for k in self.history if k not in known]
        fig = Figure(figsize=(10, 3 * len(panels)))
        FigureCanvasAgg(fig)
        for i, (label, keys) in enumerate(panels):
            ax = fig.add_subplot(len(panels), 1, i + 1)
            for key, color in zip(keys, ('b', 'r', 'g')):
                ax.plot(self.history[key]['epoch'], self.history[key]['value'], color=color, linewidth=2,
                        label=key.replace('_', ' '))
            reference = self.reference_lines.get(_PANEL_KEYS.get(label, ''))
            if reference is not None:
                ax.axhline(reference[0], color='k', linestyle='--', linewidth=1, label=reference[1])
            if len(keys) > 1 or reference is not None:
                ax.legend(fontsize=8)
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(self.name)
        ax.set_xlabel('epoch')
        fig.tight_layout()
        atomic_write(os.path.join(self.output_folder, 'progress.png'), lambda f: fig.savefig(f, format='png'))

    def state_dict(self) -> dict:
        return {k: {'epoch': list(v['epoch']), 'value': list(v['value'])} for k, v in self.history.items()}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: {'epoch': [int(e) for e in v['epoch']], 'value': [float(x) for x in v['value']]}
                        for k, v in state.items()}


class RunningMeans:
    """Per-step values (tensors or numbers) summed on the device, finite values only (a step skipped by AMP's scaler
    may have none); ``means`` reads them with one all-reduce and one host sync, as DINO's logger does."""

    def __init__(self, device: torch.device):
        self.device = device
        self.names: list = []
        self.sums: Optional[torch.Tensor] = None    # (2, n): sums of finite values, counts of finite values
        self.seconds = 0.0  # time spent in the epoch before an interruption

    def add(self, **values) -> None:
        for name in values:
            if name not in self.names:
                self.names.append(name)
                grown = torch.zeros(2, len(self.names), dtype=torch.float64, device=self.device)
                if self.sums is not None:
                    grown[:, :self.sums.shape[1]] = self.sums
                self.sums = grown
        row = torch.stack([torch.as_tensor(values[n], dtype=torch.float64, device=self.device).reshape(())
                           if n in values else torch.tensor(float('nan'), dtype=torch.float64, device=self.device)
                           for n in self.names])
        finite = torch.isfinite(row)
        self.sums += torch.stack([torch.where(finite, row, torch.zeros_like(row)), finite.double()])

    def local_mean(self, name: str) -> float:
        """This process's mean of ``name`` so far (one host sync)."""
        total, count = self.sums[:, self.names.index(name)].tolist()
        return total / count if count else float('nan')

    def means(self) -> Dict[str, float]:
        """{name: mean over the steps and processes}; every process must call it at the same point."""
        if self.sums is None:
            return {}
        sums = self.sums.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        totals, counts = sums.tolist()
        return {n: t / c if c else float('nan') for n, t, c in zip(self.names, totals, counts)}

    def state_dict(self) -> dict:
        """The sums over every process (an all-reduce: every process calls it), for process 0 to save."""
        sums = None if self.sums is None else self.sums.clone()
        if sums is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        return {'names': list(self.names), 'sums': None if sums is None else sums.cpu(), 'seconds': float(self.seconds)}

    def load_state_dict(self, state: Optional[dict], rank: int = 0) -> None:
        """Process 0 takes the saved totals, the others start from zero, so the totals hold for any world size."""
        if state and state.get('sums') is not None:
            self.names, self.sums = list(state['names']), state['sums'].to(self.device)
            if rank != 0:
                self.sums = torch.zeros_like(self.sums)
            self.seconds = float(state.get('seconds', 0.0))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption / scancel, and sbatch --signal's warning


@contextmanager
def stop_on_signals(trainer):
    """While in the block, SIGTERM and SIGUSR1 set ``trainer.stop_signal`` instead of killing the process; the
    training loop then stops at a step boundary (``Pretrainer.stop``). The previous handlers come back after."""
    def handler(signum, frame):
        trainer.stop_signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
