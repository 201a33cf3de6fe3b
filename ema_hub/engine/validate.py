"""ImageFolder data and top-1/top-5 evaluation, as timm's ``validate.py`` does it (torchrun-aware).

An ImageFolder is a folder with one sub-folder per class; images anywhere below a class folder belong to it.
Classes are the sub-folder names in timm's order (``natural_key``: sorted, with digit runs compared as numbers,
as ``timm.data.create_dataset`` orders them). Image files are those ``images.is_image_file`` accepts, decoded
by ``images.load_image`` at full size (EXIF orientation, every mode to RGB, alpha on white, high bit depths
scaled), as ``classify`` and ``features`` decode them. Unreadable images are skipped and counted, never fatal.
"""
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from timm.data import create_transform, resolve_data_config
from timm.utils.misc import natural_key

from ..errors import DataError, _names
from . import distributed as dist_utils
from .images import DECODE_ERRORS, is_image_file, load_image
from .inference import available_cpus
from .output import progress_bar

__all__ = [
    'ImageFolderData', 'scan_image_folder', 'ImageFolderDataset', 'collate_skip', 'make_loader',
    'evaluate', 'validate', 'eval_data_config',
]

PathLike = Union[str, Path]


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


def scan_image_folder(root: PathLike, what: str = 'data folder', allow_empty_classes: bool = False) -> ImageFolderData:
    """Classes (sub-folders, timm's order) and image files of an ImageFolder; DataError explains a bad layout."""
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


class ImageFolderDataset(Dataset):
    """(image tensor, class index) per sample; an unreadable image gives ``(None, index)`` instead."""

    def __init__(self, samples: Sequence[Tuple[str, int]], transform: Optional[Callable] = None):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        try:
            img = load_image(path)  # full size: no JPEG draft for training or evaluation
            if self.transform is not None:
                img = self.transform(img)
        except DECODE_ERRORS:
            return None, index
        return img, target, index


def collate_skip(batch):
    """Stack the readable samples; return ``(images, targets, indices, skipped_indices)``."""
    good = [b for b in batch if b[0] is not None]
    skipped = [b[1] for b in batch if b[0] is None]
    if not good:
        return None, None, torch.zeros(0, dtype=torch.long), skipped
    images = torch.stack([b[0] for b in good])
    targets = torch.tensor([b[1] for b in good], dtype=torch.long)
    indices = torch.tensor([b[2] for b in good], dtype=torch.long)
    return images, targets, indices, skipped


def make_loader(dataset: Dataset, batch_size: int, workers: int, *, sampler=None, shuffle: bool = False,
                generator: Optional[torch.Generator] = None, pin_memory: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False, sampler=sampler,
                      num_workers=workers, collate_fn=collate_skip, pin_memory=pin_memory, generator=generator,
                      persistent_workers=False, drop_last=False)


def default_workers() -> int:
    return min(4, max(0, available_cpus() // max(dist_utils.world_size(), 1) - 1))


def eval_data_config(model: nn.Module, img_size: Optional[int] = None) -> Dict[str, object]:
    """The model's preprocessing (its pretrained cfg), optionally at another square size."""
    args = {'input_size': (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(args, model=model)
    for key in ('test_input_size', 'test_crop_pct'):
        cfg.pop(key, None)
    return cfg


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: ImageFolderDataset, *, batch_size: int = 64, workers: int = 0,
             device: Optional[torch.device] = None, amp: bool = False, progress: bool = False,
             desc: str = 'validate') -> Dict[str, object]:
    """Top-1/top-5 (percent, as timm reports them) of ``model`` on ``dataset``.

    Under torchrun each process evaluates an exact shard (every image once) and the counts are summed, so
    the result equals a single-process pass. Unreadable images are skipped and counted.
    """
    device = device or next(model.parameters()).device
    model.eval()
    indices = dist_utils.shard_indices(len(dataset))
    loader = make_loader(Subset(dataset, indices), batch_size, workers, pin_memory=device.type == 'cuda')
    num_classes = getattr(model, 'num_classes', None)
    counts = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, seen, loss sum
    skipped: List[int] = []
    bar = progress_bar(len(loader), desc, 'batch', None if progress and dist_utils.is_main() else False)
    criterion = nn.CrossEntropyLoss(reduction='sum')
    for images, targets, _, bad in loader:
        skipped += bad
        if images is not None:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=amp and device.type == 'cuda'):
                logits = model(images)
            logits = logits.float()
            k = min(5, logits.shape[1])
            top = logits.topk(k, dim=1).indices
            hit = top.eq(targets[:, None])
            counts += torch.tensor([hit[:, 0].sum().item(), hit.any(dim=1).sum().item(), len(targets),
                                    criterion(logits, targets).item()], dtype=torch.float64)
        bar.update(1)
    bar.close()
    counts = dist_utils.all_reduce_sum(counts.to(device)).cpu()
    skipped = sorted(i for part in dist_utils.all_gather_objects(skipped) for i in part)
    seen = int(counts[2])
    return {
        'top1': 100.0 * counts[0].item() / seen if seen else float('nan'),
        'top5': 100.0 * counts[1].item() / seen if seen else float('nan'),
        'loss': counts[3].item() / seen if seen else float('nan'),
        'images': seen,
        'skipped': len(skipped),
        'skipped_files': [dataset.samples[i][0] for i in skipped],
        'num_classes': num_classes,
    }


def _resolve_eval_root(root: Path) -> Path:
    """A fine-tuning DATA folder (train/ and val/ only) is validated on its val/ split."""
    if root.is_dir():
        subdirs = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith('.')}
        if subdirs == {'train', 'val'}:
            return root / 'val'
    return root


def _target_map(model_labels: Optional[List[str]], classes: List[str], num_classes: int, root: Path) -> Optional[List[int]]:
    """Folder index -> model class index: by name when the model's labels name every folder, else positional."""
    if model_labels and set(classes) <= set(model_labels):
        where = {name: i for i, name in enumerate(model_labels)}
        return [where[c] for c in classes]
    if len(classes) > num_classes:
        raise DataError(f'{root} has {len(classes)} class folders but the model has {num_classes} classes; '
                        f'validate a model trained on these classes (folder order is class index order)')
    return None


def validate(model: Union[str, nn.Module], data_dir: PathLike, *, batch_size: int = 64, workers: Optional[int] = None,
             img_size: Optional[int] = None, device: Optional[str] = None, progress: bool = True,
             pretrained: bool = True) -> Dict[str, object]:
    """timm-style validation of ``model`` (a spec or a module) on an ImageFolder: top-1/top-5 in percent.

    Folder ``i`` in timm's sorted order is class index ``i``, as in timm's ``validate.py``; when the model
    carries label names (a fine-tuned checkpoint), folders are matched to them by name instead. A folder
    holding only ``train/`` and ``val/`` is validated on ``val/``. Runs unchanged under torchrun.
    """
    from ..hub import create_model, label_names

    info = dist_utils.init(device)
    root = _resolve_eval_root(Path(data_dir))
    data = scan_image_folder(root, what='validation folder', allow_empty_classes=True)
    if not data.samples:
        raise DataError(f'validation folder {root} holds no image files')
    net = create_model(model, pretrained=pretrained) if isinstance(model, str) else model
    net = net.to(info.device).eval()
    mapping = _target_map(label_names(net), data.classes, net.num_classes, root)
    samples = data.samples if mapping is None else [(p, mapping[t]) for p, t in data.samples]
    cfg = eval_data_config(net, img_size)
    dataset = ImageFolderDataset(samples, create_transform(**cfg, is_training=False))
    start = time.perf_counter()
    workers = default_workers() if workers is None else workers
    result = evaluate(net, dataset, batch_size=batch_size, workers=workers, device=info.device,
                      amp=info.device.type == 'cuda', progress=progress)
    result.update({
        'model': model if isinstance(model, str) else net.pretrained_cfg.get('architecture'),
        'data': str(root), 'classes': data.classes, 'img_size': cfg['input_size'][-1],
        'interpolation': cfg['interpolation'], 'crop_pct': cfg['crop_pct'],
        'time_s': round(time.perf_counter() - start, 3), 'world_size': info.world_size,
    })
    result['num_classes'] = net.num_classes
    return result


def format_result(result: Dict[str, object]) -> str:
    """A one-line human summary (timm's validate prints the same numbers)."""
    extra = f', {result["skipped"]} unreadable skipped' if result.get('skipped') else ''
    return (f'{result["model"]} on {result["data"]}: top-1 {result["top1"]:.3f} %, top-5 {result["top5"]:.3f} % '
            f'({result["images"]} images, {len(result["classes"])} classes, loss {result["loss"]:.4f}{extra})')

