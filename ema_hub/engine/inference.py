"""Batched inference over image files: the model loop and classification records, streamed in input order.

The pipeline: a list of ``InputEntry`` (``images.list_inputs``) -> ``data.ImageDataset`` (``images.load_image``:
EXIF transpose, RGB, JPEG draft mode; timm's eval transform from the model's pretrained cfg), decoded as the
worker policy says (``data.decode_workers``) -> batches -> the model under ``torch.inference_mode`` (optional
channels_last / autocast) -> per-image results in input order.

A file that cannot be decoded never stops a run: its ``Sample`` carries the error and comes out as an error
record in its place. Loader chunks are smaller than model batches (so workers start feeding the model early)
and are re-batched here.

Sharding for torchrun: every entry point takes ``rank``/``world_size`` and then handles
``entries[rank::world_size]`` only; writers (``ema_hub.engine.output``) are separate, so rank 0 can gather
and write once.
"""
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..hub import class_labels, create_model
from .data import ImageDataset, Sample, decode_threads, decode_workers, make_loader, stack
from .devices import autocast, available_cpus, select_device
from .images import InputEntry

__all__ = ['select_device', 'load_model', 'eval_transform', 'run_model', 'classify', 'default_batch_size']


def default_batch_size(device: torch.device) -> int:
    return 64 if device.type == 'cuda' else 16


def load_model(spec: str, weights: Optional[str] = None, device: Optional[torch.device] = None,
               channels_last: bool = False, use_ema: bool = False, **kwargs) -> nn.Module:
    """``ema_hub.hub.create_model`` in eval mode on ``device``; a ``weights`` file sets num_classes by its head
    (``use_ema``: a training checkpoint's averaged weights)."""
    model = create_model(spec, pretrained=weights is None, weights=weights, use_ema=use_ema, **kwargs)
    model.eval()
    if device is not None:
        model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


def eval_transform(model: nn.Module, squash: bool = False) -> Tuple[Callable, Optional[int], Dict[str, object]]:
    """timm's eval transform for ``model``'s pretrained cfg, the shorter side it resizes to, and the data config.
    ``squash``: the whole image resized to the input size, not cropped (so a map of the input covers the image)."""
    from timm.data import create_transform, resolve_data_config

    config = resolve_data_config({}, model=model)
    if squash:
        config = dict(config, crop_pct=1.0, crop_mode='squash')
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
        grad: bool = False,
        squash: bool = False,
) -> Iterator[List[Tuple[InputEntry, Optional[torch.Tensor], Optional[str]]]]:
    """Yield, per model batch and in input order, ``(entry, output row on cpu (float32) or None, error or None)``.

    ``forward(model, x)`` maps a batch to outputs (logits, features), or to a tuple of such batches (a row is
    then a tuple). ``grad``: forward runs with autograd on (methods that take gradients), not in inference
    mode. ``squash``: the images resized whole, not center-cropped (``eval_transform``). ``progress(n)`` is
    called as images finish.
    ``amp``: mixed precision under ``devices.autocast``'s policy.
    ``workers``: DataLoader processes (default: the worker policy, ``data.decode_workers``). ``set_threads``
    (for programs that own their process, like the CLI): on cpu, give torch the cores the decoding processes
    leave free, at least one; oversubscribed OpenMP threads stall each other badly.
    """
    if world_size > 1:
        entries = list(entries)[rank::world_size]
    device = device or next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    workers = decode_workers(device, world_size) if workers is None else workers
    transform, resize, _ = eval_transform(model, squash)
    # Loader chunks: small enough that every worker has work early and the model is fed soon.
    chunk = max(1, min(batch_size, math.ceil(batch_size / max(1, workers)), 8))
    n_chunks = math.ceil(len(entries) / chunk) if entries else 0
    workers = 0 if n_chunks <= 1 else min(workers, n_chunks)  # one chunk: a process would only add its start-up
    dataset = ImageDataset(entries, transform, draft_size=resize if draft else None,
                           threads=decode_threads(workers, world_size))
    if set_threads and device.type == 'cpu':
        torch.set_num_threads(max(1, available_cpus() - workers))

    def outputs(samples: List[Sample]):
        x, _, _ = stack(samples)
        rows = iter(())
        if x is not None:
            x = x.to(device, non_blocking=device.type == 'cuda')
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with (torch.enable_grad() if grad else torch.inference_mode()), autocast(device, amp):
                result = forward(model, x)
            rows = (zip(*(t.detach().float().cpu() for t in result)) if isinstance(result, tuple)
                    else iter(result.detach().float().cpu()))
        out = [(entries[s.index], next(rows) if s.tensor is not None else None, s.error) for s in samples]
        if progress is not None:
            progress(len(samples))
        return out

    for samples in _model_batches(make_loader(dataset, chunk, workers), batch_size):
        yield outputs(samples)


def _model_batches(loader, batch_size: int) -> Iterator[List[Sample]]:
    """Loader chunks regrouped into model batches of ``batch_size`` readable samples (failures ride along in order)."""
    pending: List[Sample] = []
    for samples in loader:
        pending.extend(samples)
        while sum(s.tensor is not None for s in pending) >= batch_size:
            count, cut = 0, 0
            for cut, sample in enumerate(pending, 1):
                count += sample.tensor is not None
                if count == batch_size:
                    break
            yield pending[:cut]
            pending = pending[cut:]
    if pending:
        yield pending


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
