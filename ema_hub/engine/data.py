"""Image data for every loop over files (classify, features, validate, fine-tune): one dataset, one loader, one
worker policy, and ImageFolder scanning.

A file that cannot be used (missing, not an image, truncated, a decompression bomb) never stops a loop: its
``Sample`` carries the reason instead of a tensor, and callers report or skip it.

The worker policy (``decode_workers``): decoding in DataLoader processes beside a model that runs on the same
cores only makes them compete, so with the model on the CPU the main process decodes each chunk with a thread
per core (Pillow and torch release the GIL) between model batches; with the model on an accelerator, worker
processes decode while it computes. docs/performance.md (classifying folders of photos) has the measurements.
"""
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError, _names
from ..specs import PathLike
from .devices import available_cpus
from .images import InputEntry, describe_error, is_image_file, load_image

__all__ = [
    'Sample', 'ImageDataset', 'stack', 'make_loader', 'decode_workers', 'decode_threads',
    'ImageFolderData', 'scan_image_folder',
]


@dataclass
class Sample:
    """One input: its position in the dataset, and the decoded tensor or the reason it could not be used."""
    index: int
    tensor: Optional[torch.Tensor]
    error: Optional[str] = None
    target: int = -1


class ImageDataset(Dataset):
    """Decoded, transformed images of ``entries``; failures become ``Sample.error``, never exceptions.

    Args:
        entries: the inputs (an entry whose listing already failed keeps its error).
        transform: PIL image -> tensor.
        targets: a class index per entry (ImageFolder data), else -1.
        draft_size: the shorter side the transform resizes to, for JPEG draft decoding (``images.load_image``);
            None decodes at full size.
        threads: decoding threads for a batch of indices (``decode_threads``).
    """

    def __init__(self, entries: Sequence[InputEntry], transform: Callable, targets: Optional[Sequence[int]] = None,
                 draft_size: Optional[int] = None, threads: int = 1):
        self.entries = entries
        self.transform = transform
        self.targets = targets
        self.draft_size = draft_size
        self.threads = threads
        self._pool: Optional[ThreadPoolExecutor] = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> Sample:
        entry = self.entries[index]
        target = -1 if self.targets is None else int(self.targets[index])
        if entry.error is not None:
            return Sample(index, None, entry.error, target)
        try:
            image = load_image(entry.path, draft_size=self.draft_size)
            return Sample(index, self.transform(image), None, target)
        except Exception as e:  # every decoding failure is the file's error, never the run's
            return Sample(index, None, describe_error(e), target)

    def __getitems__(self, indices: List[int]) -> List[Sample]:
        """A loader batch, decoded by ``threads`` threads (DataLoader calls this instead of ``__getitem__``)."""
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix='ema-hub-decode')
        return list(self._pool.map(self.__getitem__, indices))

    def __getstate__(self) -> Dict[str, object]:  # worker processes get the dataset, not the parent's threads
        return dict(self.__dict__, _pool=None)


def stack(samples: Sequence[Sample]) -> Tuple[Optional[torch.Tensor], torch.Tensor, List[Sample]]:
    """The readable samples as one batch (None if there are none), their targets, and the failed samples."""
    good = [s for s in samples if s.tensor is not None]
    images = torch.stack([s.tensor for s in good]) if good else None
    return images, torch.tensor([s.target for s in good], dtype=torch.long), [s for s in samples if s.tensor is None]


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, sampler=None, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, pin_memory: bool = False) -> DataLoader:
    """The DataLoader of every loop: batches are lists of ``Sample`` (failures included), in order."""
    extra = {'prefetch_factor': 4} if workers > 0 else {}
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=workers, collate_fn=list, pin_memory=pin_memory, generator=generator,
                      persistent_workers=False, drop_last=False, **extra)


def decode_workers(device: torch.device, world_size: int = 1) -> int:
    """The worker policy: DataLoader processes for a model on ``device``, each of ``world_size`` processes its share
    of the cores. None on the CPU (the main process decodes, ``decode_threads``); up to 4 beside an accelerator."""
    if device.type == 'cpu':
        return 0
    return min(4, max(1, available_cpus() // max(world_size, 1)))


def decode_threads(workers: int, world_size: int = 1) -> int:
    """Decoding threads in the main process: one per core of this process's share when it decodes (no workers)."""
    return max(1, available_cpus() // max(world_size, 1)) if workers == 0 else 1


@dataclass
class ImageFolderData:
    root: Path
    classes: List[str]
    samples: List[Tuple[str, int]]  # (path, class index), in natural path order
    empty: List[str] = field(default_factory=list)  # class folders without a single image file

    def counts(self) -> Dict[str, int]:
        out = {c: 0 for c in self.classes}
        for _, t in self.samples:
            out[self.classes[t]] += 1
        return out

    def dataset(self, transform: Callable, threads: int = 1, targets: Optional[Sequence[int]] = None) -> ImageDataset:
        """The images at full size (no JPEG draft for training or evaluation); ``targets`` replace the folder indices."""
        return ImageDataset([InputEntry(p) for p, _ in self.samples], transform,
                            targets=[t for _, t in self.samples] if targets is None else targets, threads=threads)


def scan_image_folder(root: PathLike, what: str = 'data folder', allow_empty_classes: bool = False) -> ImageFolderData:
    """Classes (sub-folders, timm's order) and image files of an ImageFolder; DataError explains a bad layout.

    Classes are the sub-folder names in timm's order (``natural_key``: sorted, digit runs compared as numbers,
    as ``timm.data.create_dataset`` orders them); images anywhere below a class folder belong to it.
    """
    from timm.utils.misc import natural_key

    root = Path(root)
    if not root.is_dir():
        raise DataError(f'{what} {root} does not exist or is not a folder')
    classes = sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')), key=natural_key)
    if not classes:
        loose = any(is_image_file(p.name) for p in root.iterdir() if p.is_file())
        hint = ' (images must sit in one sub-folder per class, not directly in it)' if loose else ''
        raise DataError(f'{what} {root} has no class folders{hint}; expected {root}/<class_name>/<image files>')
    samples: List[Tuple[str, int]] = []
    empty: List[str] = []
    for idx, name in enumerate(classes):
        found = []
        for dirpath, dirnames, filenames in os.walk(root / name, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith('.')]
            found += [os.path.join(dirpath, f) for f in filenames
                      if not f.startswith('.') and is_image_file(f)]
        if not found:
            empty.append(name)
        samples += [(f, idx) for f in sorted(found, key=natural_key)]
    if empty and not allow_empty_classes:
        raise DataError(f'{what} {root}: class folder(s) without images: {_names(empty)}; add images '
                        f'(jpg, png, bmp, webp, ...) or remove the folder(s)')
    return ImageFolderData(root, classes, samples, empty)
