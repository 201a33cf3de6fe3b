"""Multi-process helpers: the same code runs as one process or under ``torchrun --nproc-per-node N`` (any nodes).

torchrun sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and the rendezvous variables); :func:`init` reads them,
starts the process group (NCCL when CUDA is available, gloo on CPU) and picks this process's device. Without
them, everything degrades to a single process: ``rank 0 of 1``, no process group, collectives are no-ops.
Only the main process (rank 0) writes files; :func:`is_main` says which one that is.
"""
import os
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.distributed as dist

from .devices import available_cpus, select_device

__all__ = [
    'DistInfo', 'launch_rank', 'launch_world_size', 'init', 'cleanup', 'is_distributed', 'rank', 'world_size',
    'is_main', 'barrier', 'all_reduce_sum', 'all_gather_objects', 'gather_objects', 'broadcast_object', 'shard_indices',
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun), group or no group."""
    return _env_int('RANK', 0)


def launch_world_size() -> int:
    """The number of processes torchrun started (1 when not launched by torchrun), group or no group."""
    return _env_int('WORLD_SIZE', 1)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def init(device: Optional[str] = None) -> DistInfo:
    """Start the process group when launched by torchrun (``WORLD_SIZE`` > 1); return this process's place.

    ``device``: ``'cpu'``, ``'cuda'`` (this process's ``cuda:LOCAL_RANK``) or None (CUDA when available).
    Calling it again returns the same answer without starting a second group.
    """
    world = launch_world_size()
    rank_ = launch_rank()
    local_rank = _env_int('LOCAL_RANK', 0)
    use_cuda = torch.cuda.is_available() if device in (None, 'auto') else str(device).startswith('cuda')
    if use_cuda:
        select_device(str(device or 'cuda'))  # a one-line error when CUDA is missing
        dev = torch.device('cuda', local_rank % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device('cpu')
    if world > 1 and not dist.is_initialized():
        backend = 'nccl' if use_cuda else 'gloo'
        kwargs = {'device_id': dev} if use_cuda else {}
        dist.init_process_group(backend=backend, **kwargs)
    if world > 1 and not use_cuda and 'OMP_NUM_THREADS' not in os.environ:
        # CPU workers share the machine: split its cores instead of oversubscribing them N times over.
        local_world = _env_int('LOCAL_WORLD_SIZE', world)
        torch.set_num_threads(max(1, available_cpus() // local_world))
    return DistInfo(rank_ if world > 1 else 0, world, local_rank, dev)


def cleanup() -> None:
    """Tear down the process group, if one was started."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this is the process that prints results and writes files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``values`` over all processes (``values`` itself when single-process)."""
    if is_distributed():
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(obj: Any) -> List[Any]:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not is_distributed():
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any) -> Optional[List[Any]]:
    """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the others."""
    if not is_distributed():
        return [obj]
    out: Optional[List[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, rank_: Optional[int] = None, world: Optional[int] = None) -> List[int]:
    """This process's share of ``range(n)``: every ``world``-th index from ``rank`` (no padding, no repeats).

    Across ranks the shards cover each index exactly once, so sums of per-shard counts equal a
    single-process pass (unlike DistributedSampler, which pads the last shard with repeats).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return list(range(rank_, n, world))
