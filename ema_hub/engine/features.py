"""Pooled embeddings of image files, batch by batch or written to a file, as one process or under torchrun.

``extract_features`` is what ``ema-hub features`` runs: under ``torchrun --nproc-per-node N`` every rank embeds
its strided shard and rank 0 gathers the rows back into input order and writes the file once, so the file is
the same as a single process writes.
"""
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from . import distributed as dist
from .images import InputEntry
from .inference import load_model, run_model, select_device
from .output import FeatureWriter, progress_bar

__all__ = ['FeatureBatch', 'pooled_features', 'iter_features', 'gather_features', 'extract_features',
           'FeatureSummary']


@dataclass
class FeatureBatch:
    """Features of the readable images of one batch (rows in input order) and the failures among them."""
    paths: List[str]
    features: np.ndarray               # (len(paths), D) float32
    errors: List[Tuple[str, str]]      # (path, reason)


def pooled_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The embedding of a batch: ``forward_head(forward_features(x), pre_logits=True)``."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _batch(rows: Sequence[Tuple[str, Optional[np.ndarray], Optional[str]]], dim: int) -> FeatureBatch:
    good = [(path, vec) for path, vec, _ in rows if vec is not None]
    feats = np.stack([v for _, v in good]).astype(np.float32, copy=False) if good else np.zeros((0, dim), np.float32)
    return FeatureBatch([p for p, _ in good], feats, [(path, error) for path, vec, error in rows if vec is None])


def iter_features(entries: Sequence[InputEntry], model: nn.Module, **kwargs) -> Iterator[FeatureBatch]:
    """Pooled embeddings batch by batch, in one process; arguments as ``inference.run_model``."""
    dim = getattr(model, 'num_features', 0)
    for batch in run_model(entries, model, pooled_features, **kwargs):
        yield _batch([(e.path, None if out is None else out.reshape(-1).numpy(), err) for e, out, err in batch], dim)


def gather_features(entries: Sequence[InputEntry], model: nn.Module, *, round_size: int = 256,
                    **kwargs) -> Iterator[FeatureBatch]:
    """``iter_features`` across all processes: rank 0 yields every input exactly once, in input order.

    Each process embeds its strided shard (``entries[rank::world_size]``); in rounds of ``round_size`` inputs per
    process the rows travel to rank 0 (``gather_object``), which interleaves them back into input order, so
    memory stays bounded however many images there are. Other ranks yield nothing. Single-process, this is
    ``iter_features`` itself.
    """
    if not dist.is_distributed():
        yield from iter_features(entries, model, **kwargs)
        return
    entries = list(entries)
    rank, world = dist.rank(), dist.world_size()
    local = ((entry.path, None if out is None else out.reshape(-1).numpy(), error)
             for batch in run_model(entries, model, pooled_features, rank=rank, world_size=world, **kwargs)
             for entry, out, error in batch)
    per_rank = -(-len(entries) // world)
    for _ in range(-(-per_rank // round_size)):
        part = [row for _, row in zip(range(round_size), local)]
        parts = dist.gather_objects(part)
        if rank == 0:  # rank k's j-th input of the round is input (round start + j) * world + k
            rows = [p[j] for j in range(max(len(p) for p in parts)) for p in parts if j < len(p)]
            yield _batch(rows, getattr(model, 'num_features', 0))


@dataclass
class FeatureSummary:
    """What ``extract_features`` wrote: how many rows of what width, and the inputs that failed."""
    rows: int
    dim: int
    failed: int


def extract_features(entries: Sequence[InputEntry], model: str, output: str, *, weights: Optional[str] = None,
                     use_ema: bool = False, device: str = 'auto',
                     report: Callable[[str, str], None] = lambda path, reason: None,
                     **kwargs) -> Optional[FeatureSummary]:
    """Embed ``entries`` with ``model`` (a spec) and write ``output`` (.npz or .safetensors), torchrun-aware.

    ``report(path, reason)`` is called on the writing process for each input that failed. ``kwargs``: batch_size,
    workers, amp, channels_last (as ``inference.run_model``). Returns the summary on the writing process (rank 0),
    None on the others.
    """
    distributed = dist.launch_world_size() > 1
    if distributed:  # every rank embeds its shard, rank 0 gathers and writes once
        place = dist.init(None if device == 'auto' else device)
        dev, is_main, share = place.device, place.is_main, len(dist.shard_indices(len(entries)))
    else:
        dev, is_main, share = select_device(device), True, len(entries)
    try:
        net = load_model(model, weights, dev, kwargs.get('channels_last', False), use_ema)
        progress = progress_bar(share, enabled=None if is_main else False)
        try:
            batches = gather_features(entries, net, device=dev, progress=progress.update,
                                      set_threads=not distributed, **kwargs)
            if not is_main:
                for _ in batches:  # take part in the gathers; rank 0 writes
                    pass
                return None
            failed = 0
            with FeatureWriter(output, metadata={'model': model}) as writer:
                for batch in batches:
                    writer.add(batch.paths, batch.features)
                    for path, reason in batch.errors:
                        progress.clear()
                        report(path, reason)
                        failed += 1
            return FeatureSummary(len(writer.paths), writer.dim or 0, failed)
        finally:
            progress.close()
    finally:
        if distributed:
            dist.cleanup()
