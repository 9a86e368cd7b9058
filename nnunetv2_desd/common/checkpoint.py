"""Checkpoint I/O: crash-safe saving, validated loading, digests and RNG state.

Everything written here loads with ``torch.load(weights_only=True)``: only tensors, numbers, strings,
None and lists/tuples/dicts of those are stored.
"""
import hashlib
import json
import os
import random
import re
import tempfile
from typing import IO, Callable, Mapping, Optional

import numpy as np
import torch

from nnunetv2_desd.common.errors import DesdError


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Calls ``write(file)`` on a temp file next to ``path``, fsyncs, then renames it onto ``path``.

    A crash or an exception at any point leaves ``path`` either untouched or complete, never half-written.
    The one way this package writes checkpoints, exports, JSON records, tables and figures.
    """
    path = os.path.abspath(path)
    folder = os.path.dirname(path)
    tmp = tempfile.NamedTemporaryFile(dir=folder, prefix='.tmp_', suffix='_' + os.path.basename(path), delete=False)
    try:
        with tmp:
            write(tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o644)  # NamedTemporaryFile creates 0600
        os.replace(tmp.name, path)
    except BaseException:
        if os.path.exists(tmp.name):
            os.remove(tmp.name)
        raise
    try:  # persist the rename itself; not supported everywhere (e.g. Windows)
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def atomic_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def atomic_write_json(obj, path: str) -> None:
    atomic_write_text(json.dumps(obj, indent=2), path)


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint dict on CPU with ``weights_only=True``; any failure becomes a DesdError."""
    if not os.path.isfile(path):
        raise DesdError(f"no checkpoint at {path}")
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise DesdError(f"{path} is not a valid checkpoint ({type(e).__name__}: {_one_line(e)})") from e
    if not isinstance(checkpoint, dict):
        raise DesdError(f"{path} is not a valid checkpoint (holds a {type(checkpoint).__name__}, expected a dict)")
    return checkpoint


def _one_line(error: Exception) -> str:
    """Most telling line of an error message: the weights_only refusal reason if present, else the first line."""
    lines = [l.strip() for l in re.sub(r'\x1b\[[0-9;]*m', '', str(error)).splitlines() if l.strip()]
    refusal = [l for l in lines if l.startswith('WeightsUnpickler error:')]
    return (refusal or lines or [''])[0].split('. Please use')[0]


def tensor_digest(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted keys, dtype, shape and raw bytes of every tensor. Independent of key order and device."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor_digest: entry {key!r} is a {type(t).__name__}, not a tensor")
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header = f"{key}|{t.dtype}|{tuple(t.shape)}|{len(raw)}|".encode()
        h.update(len(header).to_bytes(8, 'little'))
        h.update(header)
        h.update(raw)
    return h.hexdigest()


def file_sha256(path: str, chunk_size: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(chunk_size), b''):
            h.update(chunk)
    return h.hexdigest()


def capture_rng_state() -> dict:
    """States of python ``random``, the numpy global RNG, torch CPU and all CUDA devices, weights_only-safe."""
    py_version, py_state, py_gauss = random.getstate()
    np_kind, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        'python': {'version': py_version, 'state': torch.tensor(py_state, dtype=torch.int64), 'gauss_next': py_gauss},
        'numpy': {'kind': str(np_kind), 'key': torch.from_numpy(np_key.astype(np.int64)), 'pos': int(np_pos),
                  'has_gauss': int(np_has_gauss), 'cached_gaussian': float(np_gauss)},
        'torch': torch.get_rng_state(),
        'cuda': list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state. CUDA states are restored for the devices present in both."""
    py = state['python']
    random.setstate((int(py['version']), tuple(int(v) for v in py['state'].tolist()), py['gauss_next']))
    npy = state['numpy']
    np.random.set_state((npy['kind'], npy['key'].numpy().astype(np.uint32), int(npy['pos']),
                         int(npy['has_gauss']), float(npy['cached_gaussian'])))
    torch.set_rng_state(state['torch'].to(device='cpu', dtype=torch.uint8))
    cuda_states = state.get('cuda') or []
    if cuda_states and torch.cuda.is_available():
        for device, s in enumerate(cuda_states[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.to(device='cpu', dtype=torch.uint8), device)


def rng_state_of_process(saved, rank: int) -> Optional[dict]:
    """The RNG state a checkpoint holds for process ``rank``: checkpoints keep one state per process (a list);
    older ones hold process 0's only (a dict). None where the checkpoint has none for this process (another
    number of processes): it then keeps its own seed."""
    states = [saved] if isinstance(saved, dict) else list(saved or [])
    return states[rank] if rank < len(states) else None


def cpu_state_dict(module: torch.nn.Module) -> dict:
    """module.state_dict() with every tensor detached, copied to CPU and contiguous (loads without map_location)."""
    return {k: v.detach().to('cpu', copy=True).contiguous() if isinstance(v, torch.Tensor) else v
            for k, v in module.state_dict().items()}
