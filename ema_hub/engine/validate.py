"""Top-1/top-5 evaluation on an ImageFolder, as timm's ``validate.py`` does it (torchrun-aware).

Class folders and their order are ``data.scan_image_folder``'s (timm's); images are decoded at full size by
``images.load_image`` (EXIF orientation, every mode to RGB, alpha on white, high bit depths scaled), as
``classify`` and ``features`` decode them. Unreadable images are skipped and counted, never fatal.
"""
import time
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import Subset

from timm.data import create_transform, resolve_data_config

from ..errors import DataError
from ..hub import create_model, label_names
from ..specs import PathLike
from . import distributed as dist_utils
from .data import ImageDataset, decode_threads, decode_workers, make_loader, scan_image_folder, stack
from .devices import autocast
from .output import progress_bar

__all__ = ['evaluate', 'validate', 'eval_data_config', 'format_result']


def eval_data_config(model: nn.Module, img_size: Optional[int] = None) -> Dict[str, object]:
    """The model's preprocessing (its pretrained cfg), optionally at another square size."""
    args = {'input_size': (3, img_size, img_size)} if img_size else {}
    cfg = resolve_data_config(args, model=model)
    for key in ('test_input_size', 'test_crop_pct'):
        cfg.pop(key, None)
    return cfg


@torch.inference_mode()
def evaluate(model: nn.Module, dataset: ImageDataset, *, batch_size: int = 64, workers: int = 0,
             device: Optional[torch.device] = None, amp: bool = False, progress: bool = False,
             desc: str = 'validate') -> Dict[str, object]:
    """Top-1/top-5 (percent, as timm reports them) of ``model`` on ``dataset``.

    ``amp``: mixed precision under ``devices.autocast``'s policy. Under torchrun each process evaluates an exact
    shard (every image once) and the counts are summed, so the result equals a single-process pass. Unreadable
    images are skipped and counted.
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
    for samples in loader:
        images, targets, failed = stack(samples)
        skipped += [s.index for s in failed]
        if images is not None:
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast(device, amp):
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
        'skipped_files': [dataset.entries[i].path for i in skipped],
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
    info = dist_utils.init(device)
    root = _resolve_eval_root(Path(data_dir))
    data = scan_image_folder(root, what='validation folder', allow_empty_classes=True)
    if not data.samples:
        raise DataError(f'validation folder {root} holds no image files')
    net = create_model(model, pretrained=pretrained) if isinstance(model, str) else model
    net = net.to(info.device).eval()
    mapping = _target_map(label_names(net), data.classes, net.num_classes, root)
    cfg = eval_data_config(net, img_size)
    workers = decode_workers(info.device, info.world_size) if workers is None else workers
    dataset = data.dataset(create_transform(**cfg, is_training=False), decode_threads(workers, info.world_size),
                           targets=None if mapping is None else [mapping[t] for _, t in data.samples])
    start = time.perf_counter()
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

