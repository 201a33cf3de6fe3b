"""Where a model runs and how many cores this process may use (ema_hub/engine/devices.py)."""
import os

import pytest
import torch

from ema_hub.engine.devices import available_cpus, select_device
from ema_hub.errors import UsageError


def test_available_cpus_is_this_process_share() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= (os.cpu_count() or cpus)
    if hasattr(os, 'sched_getaffinity'):
        assert cpus == len(os.sched_getaffinity(0))


def test_select_device() -> None:
    assert select_device('cpu') == torch.device('cpu')
    auto = select_device('auto')
    assert auto.type == ('cuda' if torch.cuda.is_available() else auto.type)
    if not torch.cuda.is_available():
        assert auto.type in ('cpu', 'mps')


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the answer on a machine without CUDA')
@pytest.mark.parametrize('name', ['cuda', 'cuda:1'])
def test_missing_cuda_is_a_usage_error(name: str) -> None:
    with pytest.raises(UsageError, match='CUDA is not available; use --device cpu or auto') as info:
        select_device(name)
    assert isinstance(info.value, ValueError) and info.value.exit_code == 2
