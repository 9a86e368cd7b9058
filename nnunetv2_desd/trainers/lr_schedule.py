"""Fine-tuning learning rate: linear warm-up, then nnU-Net's poly decay, per parameter group."""
from torch.optim.lr_scheduler import LRScheduler


def warmup_poly(epoch: int, peak: float, warmup_epochs: int, num_epochs: int, start_epoch: int = 0,
                exponent: float = 0.9) -> float:
    """0 before ``start_epoch``; then peak * (e + 1) / W for e = epoch - start_epoch < W;
    then peak * (1 - (e - W) / (num_epochs - start_epoch - W)) ** exponent (nnU-Net's poly, offset by the warm-up).
    """
    e = epoch - start_epoch
    if e < 0:
        return 0.0
    if e < warmup_epochs:
        return peak * (e + 1) / warmup_epochs
    decay_epochs = max(1, num_epochs - start_epoch - warmup_epochs)
    return peak * max(0.0, 1 - (e - warmup_epochs) / decay_epochs) ** exponent


class WarmupPolyLRScheduler(LRScheduler):
    """Sets every group's lr to warmup_poly(epoch, peak_lr * group['lr_scale'], ..., group['start_epoch']).

    A group with ``start_epoch`` F is frozen (lr 0) for F epochs, then warms up on its own. nnU-Net calls
    ``step(current_epoch)`` at the start of each epoch, also after ``--c``.
    """

    def __init__(self, optimizer, peak_lr: float, warmup_epochs: int, num_epochs: int, exponent: float = 0.9):
        self.peak_lr, self.warmup_epochs, self.num_epochs, self.exponent = peak_lr, warmup_epochs, num_epochs, exponent
        super().__init__(optimizer)

    def step(self, epoch: int = None) -> None:
        self.last_epoch = self.last_epoch + 1 if epoch is None else epoch
        for group in self.optimizer.param_groups:
            group['lr'] = warmup_poly(self.last_epoch, self.peak_lr * group.get('lr_scale', 1.0), self.warmup_epochs,
                                      self.num_epochs, group.get('start_epoch', 0), self.exponent)
        self._last_lr = [group['lr'] for group in self.optimizer.param_groups]
