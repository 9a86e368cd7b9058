"""Momentum (EMA) update of the teacher from the student."""
import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher_p <- m * teacher_p + (1 - m) * student_p for every parameter, paired by name.

    Pairing by name (not by registration order, as the official DeSD code did) cannot silently mix up
    parameters; differing names or shapes raise ValueError. Buffers are left alone: the encoders use
    instance norm (no running statistics) and the heads' BatchNorm statistics are the teacher's own,
    accumulated from its own forward passes.
    """
    teacher_params = dict(teacher.named_parameters())
    student_params = dict(student.named_parameters())
    if teacher_params.keys() != student_params.keys():
        only_teacher = sorted(teacher_params.keys() - student_params.keys())
        only_student = sorted(student_params.keys() - teacher_params.keys())
        raise ValueError(f"teacher and student parameter names differ: only in teacher "
                         f"{only_teacher[:3]}, only in student {only_student[:3]}")
    for name, t in teacher_params.items():
        if t.shape != student_params[name].shape:
            raise ValueError(f"parameter {name!r}: teacher shape {tuple(t.shape)} != student shape "
                             f"{tuple(student_params[name].shape)}")
    for name, t in teacher_params.items():
        t.mul_(momentum).add_(student_params[name].detach().to(t.dtype), alpha=1 - momentum)
