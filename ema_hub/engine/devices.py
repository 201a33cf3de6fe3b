"""Where a model runs and how many cores this process may use."""
import os

import torch

from ..errors import UsageError

__all__ = ['select_device', 'available_cpus']


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def select_device(name: str = 'auto') -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is a UsageError."""
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise UsageError(f'device {name!r} requested but CUDA is not available; use --device cpu or auto')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise UsageError(f'device {name!r} requested but MPS is not available; use --device cpu or auto')
    return device
