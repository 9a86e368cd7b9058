"""nnU-Net-style training log file and progress.png for pre-training runs."""
import os
from datetime import datetime

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from nnunetv2_desd.pretraining.engine.checkpoint import atomic_write

# panel order and axis labels for the known quantities; anything else is appended in recording order
_LABELS = {'loss': 'loss', 'teacher_temp': 'teacher temperature', 'teacher_momentum': 'teacher momentum',
           'lr': 'learning rate', 'epoch_time': 'epoch time [s]'}


class ProgressLog:
    """Timestamped log file plus per-epoch scalar history. Non-main ranks (is_main=False) do nothing."""

    def __init__(self, output_folder: str, is_main: bool = True, name: str = 'pretraining'):
        self.output_folder = output_folder
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
        keys = [k for k in _LABELS if k in self.history] + [k for k in self.history if k not in _LABELS]
        fig = Figure(figsize=(10, 3 * len(keys)))
        FigureCanvasAgg(fig)
        for i, key in enumerate(keys):
            ax = fig.add_subplot(len(keys), 1, i + 1)
            ax.plot(self.history[key]['epoch'], self.history[key]['value'], color='b', linewidth=2)
            ax.set_ylabel(_LABELS.get(key, key))
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
