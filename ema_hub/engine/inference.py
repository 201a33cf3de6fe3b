"""Batched inference over image files: classification records and pooled features, streamed in input order.

The pipeline (see DESIGN.md, "Data flow of ema-classify"): a list of ``InputEntry`` (``images.list_inputs``)
-> a map-style Dataset decoding in DataLoader workers (``images.load_image``: EXIF transpose, RGB, JPEG draft
mode) -> timm's eval transform from the model's pretrained cfg -> batches -> the model under
``torch.inference_mode`` (optional channels_last / autocast) -> per-image results in input order.

A file that cannot be decoded never stops a run: its failure travels through the collate as an error and
comes out as an error record in its place. Loader chunks are smaller than model batches (so workers start
feeding the model early) and are re-batched here.

Sharding for torchrun: every entry point takes ``rank``/``world_size`` and then handles
``entries[rank::world_size]`` only; writers (``ema_hub.engine.output``) are separate, so rank 0 can gather
and write once.
"""
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .images import InputEntry, describe_error, load_image

__all__ = [
    'select_device', 'load_model', 'eval_transform', 'ImageDataset', 'Item', 'collate_items', 'run_model',
    'classify', 'iter_features', 'FeatureBatch', 'default_workers', 'default_batch_size', 'available_cpus',
]


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    return min(4, available_cpus())


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == 'cuda' else 16


def select_device(name: str = 'auto') -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an explicit device that is missing is an error."""
    if name == 'auto':
        if torch.cuda.is_available():
            return torch.device('cuda')
        if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
            return torch.device('mps')
        return torch.device('cpu')
    device = torch.device(name)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} requested but CUDA is not available; use --device cpu or auto')
    if device.type == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        raise ValueError(f'device {name!r} requested but MPS is not available; use --device cpu or auto')
    return device


def load_model(spec: str, weights: Optional[str] = None, device: Optional[torch.device] = None,
               channels_last: bool = False, **kwargs) -> nn.Module:
    """``ema_hub.hub.create_model`` in eval mode on ``device``; a ``weights`` file sets num_classes by its head."""
    from ..hub import create_model

    model = create_model(spec, pretrained=weights is None, weights=weights, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def eval_transform(model: nn.Module) -> Tuple[Callable, Optional[int], Dict[str, object]]:
    """timm's eval transform for ``model``'s pretrained cfg, the shorter side it resizes to, and the data config."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    transform = create_transform(**config, is_training=False)
    resize = None
    for t in getattr(transform, 'transforms', [transform]):
        size = getattr(t, 'size', None)
        if type(t).__name__ == 'Resize' and size is not None:
            resize = size if isinstance(size, int) else (min(size) if len(size) > 1 else size[0])
            break
    if resize is None:
        resize = max(config['input_size'][1:])
    return transform, int(resize), config


@dataclass
class Item:
    """One decoded input: its position, and the tensor or the reason it failed."""
    index: int
    tensor: Optional[torch.Tensor]
    error: Optional[str]


class ImageDataset(Dataset):
    """Map-style dataset over entries: decoding failures become ``Item.error``, never exceptions."""

    def __init__(self, entries: Sequence[InputEntry], transform: Callable, draft_size: Optional[int] = None):
        self.entries = entries
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Item:
        entry = self.entries[index]
        if entry.error is not None:
            return Item(index, None, entry.error)
        try:
            image = load_image(entry.path, draft_size=self.draft_size)
            return Item(index, self.transform(image), None)
        except Exception as e:  # every decoding failure is a per-file error record
            return Item(index, None, describe_error(e))


def collate_items(items: List[Item]) -> List[Item]:
    """Keep items as they are (failures included); tensors are stacked per model batch after re-batching."""
    return items


def _loader(dataset: Dataset, chunk: int, workers: int) -> DataLoader:
    kwargs = {}
    if workers > 0:
        kwargs.update(prefetch_factor=4, persistent_workers=False)
    return DataLoader(dataset, batch_size=chunk, shuffle=False, num_workers=workers, collate_fn=collate_items,
                      **kwargs)


def run_model(
        entries: Sequence[InputEntry],
        model: nn.Module,
        forward: Callable[[nn.Module, torch.Tensor], torch.Tensor],
        *,
        batch_size: Optional[int] = None,
        workers: Optional[int] = None,
        device: Optional[torch.device] = None,
        amp: bool = False,
        channels_last: bool = False,
        draft: bool = True,
        rank: int = 0,
        world_size: int = 1,
        progress: Optional[Callable[[int], None]] = None,
        set_threads: bool = False,
) -> Iterator[List[Tuple[InputEntry, Optional[torch.Tensor], Optional[str]]]]:
    """Yield, per model batch and in input order, ``(entry, output row on cpu (float32) or None, error or None)``.

    ``forward(model, x)`` maps a batch to outputs (logits, features). ``progress(n)`` is called as images finish.
    ``set_threads`` (for programs that own their process, like the CLI): on cpu, give torch the cores the
    decoding workers leave free, at least one; oversubscribed OpenMP threads stall each other badly.
    """
    if world_size > 1:
        entries = list(entries)[rank::world_size]
    device = device or next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    workers = default_workers() if workers is None else workers
    transform, resize, _ = eval_transform(model)
    dataset = ImageDataset(entries, transform, draft_size=resize if draft else None)
    # Loader chunks: small enough that every worker has work early and the model is fed soon.
    spread = max(1, workers)
    chunk = max(1, min(batch_size, math.ceil(batch_size / spread), 8))
    n_chunks = math.ceil(len(entries) / chunk) if entries else 0
    workers = min(workers, max(0, n_chunks))
    if n_chunks <= 1:
        workers = 0  # one chunk: a worker process would only add its start-up time
    loader = _loader(dataset, chunk, workers)
    if set_threads and device.type == 'cpu':
        torch.set_num_threads(max(1, available_cpus() - workers))
    autocast_dtype = {'cuda': torch.float16, 'cpu': torch.bfloat16, 'mps': torch.float16}.get(device.type)
    use_amp = amp and autocast_dtype is not None

    pending: List[Item] = []

    def flush(items: List[Item]):
        good = [it for it in items if it.tensor is not None]
        outputs = None
        if good:
            x = torch.stack([it.tensor for it in good])
            x = x.to(device, non_blocking=device.type == 'cuda')
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), torch.autocast(device.type, dtype=autocast_dtype, enabled=use_amp):
                outputs = forward(model, x)
            outputs = outputs.float().cpu()
        rows = iter(outputs) if outputs is not None else iter(())
        out = [(entries[it.index], next(rows) if it.tensor is not None else None, it.error) for it in items]
        if progress is not None:
            progress(len(items))
        return out

    for items in loader:
        pending.extend(items)
        while sum(it.tensor is not None for it in pending) >= batch_size:
            count, cut = 0, 0
            for cut, it in enumerate(pending, 1):
                count += it.tensor is not None
                if count == batch_size:
                    break
            batch, pending = pending[:cut], pending[cut:]
            yield flush(batch)
    if pending:
        yield flush(pending)


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def classify(
        entries: Sequence[InputEntry],
        model: nn.Module,
        *,
        top_k: int = 5,
        labels: Optional[Sequence[str]] = None,
        **kwargs,
) -> Iterator[Dict[str, object]]:
    """One record per entry, in input order: ``{'path', 'predictions': [{index, label, score}, ...]}`` or
    ``{'path', 'error'}``. Scores are softmax probabilities. ``labels`` default to the model's label names
    (``ema_hub.hub.class_labels``), else the class index as a string. Other arguments as ``run_model``.
    """
    if labels is None:
        from ..hub import class_labels
        labels = class_labels(model)
    for batch in run_model(entries, model, _logits, **kwargs):
        for entry, logits, error in batch:
            if logits is None:
                yield {'path': entry.path, 'error': error}
                continue
            probs = logits.softmax(-1)
            k = max(1, min(top_k, probs.numel()))
            scores, indices = probs.topk(k)
            yield {'path': entry.path, 'predictions': [
                {'index': int(i), 'label': labels[int(i)] if labels else str(int(i)), 'score': round(float(s), 6)}
                for s, i in zip(scores.tolist(), indices.tolist())]}


def _pooled(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.forward_head(model.forward_features(x), pre_logits=True)


@dataclass
class FeatureBatch:
    """Features of the readable images of one batch (rows in input order) and the failures among them."""
    paths: List[str]
    features: np.ndarray               # (len(paths), D) float32
    errors: List[Tuple[str, str]]      # (path, reason)


def iter_features(entries: Sequence[InputEntry], model: nn.Module, **kwargs) -> Iterator[FeatureBatch]:
    """Pooled embeddings (``forward_head(..., pre_logits=True)``) batch by batch; arguments as ``run_model``."""
    dim = getattr(model, 'num_features', 0)
    for batch in run_model(entries, model, _pooled, **kwargs):
        rows = [(e.path, out) for e, out, _ in batch if out is not None]
        feats = (torch.stack([r for _, r in rows]).reshape(len(rows), -1).numpy().astype(np.float32, copy=False)
                 if rows else np.zeros((0, dim), np.float32))
        yield FeatureBatch([p for p, _ in rows], feats, [(e.path, err) for e, out, err in batch if out is None])
