"""Where a model runs, how many cores this process may use, and mixed precision's one policy."""
import os
from typing import Optional

import torch

from ..errors import UsageError

__all__ = ['select_device', 'available_cpus', 'amp_dtype', 'autocast', 'grad_scaler']


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


# Mixed precision (--amp, and validation and fine-tuning on CUDA), one policy for every loop: bfloat16 autocast
# where the device computes it (the CPU, CUDA GPUs that have it), else float16; training under float16 scales
# its loss (a GradScaler), bfloat16 needs none.
def amp_dtype(device: torch.device, enabled: bool = True) -> Optional[torch.dtype]:
    """The autocast dtype on ``device`` under the policy above; None (full precision) when not ``enabled`` or on
    a device it does not name."""
    if not enabled or device.type not in ('cpu', 'cuda', 'mps'):
        return None
    if device.type == 'cpu' or (device.type == 'cuda' and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """A ``torch.autocast`` context for ``device`` under the policy (a disabled one when ``amp_dtype`` is None)."""
    dtype = amp_dtype(device, enabled)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, enabled: bool = True) -> Optional['torch.amp.GradScaler']:
    """The loss scaler a training step under ``autocast(device, enabled)`` needs: one for float16, else None."""
    return torch.amp.GradScaler(device.type) if amp_dtype(device, enabled) == torch.float16 else None
