"""Fine-tuning on an ImageFolder (``DATA/train``, ``DATA/val``): timm's factories, resumable, torchrun-aware.

The recipe is timm's: ``create_transform(is_training=True)`` augmentation, ``create_optimizer_v2`` (AdamW),
``create_scheduler_v2`` (cosine, per-step), label-smoothed cross-entropy, AMP on CUDA. By default the model
starts from its spec's pretrained weights (a variant's default tag is the warm start) with a new head sized
to the class folders.

Output folder (written by rank 0 only, once): timm's Hub layout via :func:`ema_hub.hub.save_pretrained`
(``config.json`` with the class folder names as ``label_names`` and the data config the model was trained
with; ``model.safetensors``; ``README.md`` with the measured accuracy) plus ``metrics.json``. While training,
``checkpoint.pt`` holds the last completed epoch's state (model, optimizer, scheduler, epoch; tensors and
plain values only, read back with ``torch.load(weights_only=True)``); ``resume=True`` continues from it,
and it is removed once the result is written.

Under ``torchrun --nproc-per-node N`` every process trains on its shard (DistributedSampler, DDP; gloo on
CPU, NCCL on CUDA); ``batch_size`` is per process, as in timm's train.py. Validation is sharded exactly
(every image once) and summed, so the reported accuracy is the saved model's.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..errors import DataError, TrainingStateError
from . import distributed as dist_utils
from .output import progress_bar
from .validate import ImageFolderDataset, default_workers, evaluate, make_loader, scan_image_folder

__all__ = ['FinetuneConfig', 'finetune', 'check_data', 'CHECKPOINT_FILE', 'METRICS_FILE']

CHECKPOINT_FILE = 'checkpoint.pt'
METRICS_FILE = 'metrics.json'
PathLike = Union[str, Path]


@dataclass
class FinetuneConfig:
    """Settings of one fine-tuning run; the defaults reach >= 90 % on small data sets within a few epochs."""
    model: str
    data: str
    output: str
    epochs: int = 8
    img_size: Optional[int] = None      # square input size; None: the model's default
    batch_size: int = 64                # per process
    lr: float = 2e-3
    opt: str = 'adamw'
    weight_decay: float = 0.05
    warmup_epochs: int = 1
    smoothing: float = 0.1
    hflip: float = 0.5
    scale_min: float = 0.5              # RandomResizedCrop's smallest area fraction (ImageNet training: 0.08)
    color_jitter: float = 0.4
    crop_pct: Optional[float] = None    # eval crop; None: the model's
    pretrained: bool = True
    seed: int = 42
    workers: Optional[int] = None
    device: Optional[str] = None

    # Settings that define the run: a resumed run takes them from its checkpoint.
    RUN_KEYS = ('model', 'epochs', 'img_size', 'batch_size', 'lr', 'opt', 'weight_decay', 'warmup_epochs',
                'smoothing', 'hflip', 'scale_min', 'color_jitter', 'crop_pct', 'pretrained', 'seed')

    def run_settings(self) -> Dict[str, object]:
        return {k: getattr(self, k) for k in self.RUN_KEYS}

    @property
    def init(self) -> str:
        """What training starts from: the model spec, or ``'random'`` (hf-hub:/local-dir: specs always load theirs)."""
        if self.pretrained or self.model.startswith(('hf-hub:', 'local-dir:')):
            return self.model
        return 'random'


def check_data(data: PathLike):
    """Scan ``DATA/train`` and ``DATA/val``; DataError names a missing split, empty classes or mismatched classes."""
    data = Path(data)
    if not data.is_dir():
        raise DataError(f'data folder {data} does not exist or is not a folder')
    missing = [s for s in ('train', 'val') if not (data / s).is_dir()]
    if missing:
        raise DataError(f'data folder {data} has no {" or ".join(m + "/" for m in missing)}; expected '
                        f'{data}/train/<class>/<images> and {data}/val/<class>/<images> (ImageFolder layout)')
    train = scan_image_folder(data / 'train', what='training folder')
    val = scan_image_folder(data / 'val', what='validation folder')
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        parts = ([f'only in train/: {", ".join(only_train[:5])}'] if only_train else []) + \
                ([f'only in val/: {", ".join(only_val[:5])}'] if only_val else [])
        raise DataError(f'data folder {data}: train/ and val/ have different class folders ({"; ".join(parts)}); '
                        f'both need the same classes')
    return train, val


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _log(msg: str) -> None:
    if dist_utils.is_main():
        print(msg, file=sys.stderr, flush=True)


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + '.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path) -> Dict[str, object]:
    try:
        return torch.load(str(path), map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, or anything that is not plain tensors and values
        raise TrainingStateError(f'{path} cannot be read as a training checkpoint ({type(e).__name__}); remove it '
                                 f'to start over') from None


def _broadcast_buffers(module: nn.Module) -> None:
    """Give every process rank 0's BatchNorm statistics (each updated its own on its last batch)."""
    if dist_utils.is_distributed():
        for buf in module.buffers():
            dist.broadcast(buf.data, src=0)


def finetune(cfg: FinetuneConfig, resume: bool = False, progress: bool = True) -> Dict[str, object]:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write ``cfg.output``; return the metrics (rank 0's view)."""
    from ..hub import create_model, save_pretrained

    info = dist_utils.init(cfg.device)
    try:
        return _finetune(cfg, resume, progress, info, create_model, save_pretrained)
    finally:
        dist_utils.cleanup()


def _finetune(cfg, resume, progress, info, create_model, save_pretrained) -> Dict[str, object]:
    out = Path(cfg.output)
    ckpt_path = out / CHECKPOINT_FILE
    train_data, val_data = check_data(cfg.data)
    classes = train_data.classes

    state = None
    if resume and ckpt_path.is_file():
        state = _load_checkpoint(ckpt_path)
        if list(state['classes']) != classes:
            raise TrainingStateError(f'{ckpt_path} was trained on classes {", ".join(state["classes"][:5])}...; '
                                     f'{cfg.data} has {", ".join(classes[:5])}...; resume with the same data')
        saved = dict(state['settings'])
        changed = {k: v for k, v in saved.items() if getattr(cfg, k) != v}
        for k, v in saved.items():
            setattr(cfg, k, v)
        if changed:
            _log(f'resuming with the checkpoint\'s settings ({", ".join(f"{k}={v}" for k, v in changed.items())})')
    elif resume:
        if (out / METRICS_FILE).is_file():
            raise TrainingStateError(f'{out} already holds a finished run ({METRICS_FILE}); nothing to resume')
        _log(f'no {CHECKPOINT_FILE} in {out}; starting from scratch')
    elif ckpt_path.is_file() or (out / 'model.safetensors').is_file():
        raise TrainingStateError(f'{out} already holds a training run; pass --resume to continue it, or choose '
                                 f'another --output folder')

    if cfg.epochs < 1:
        raise DataError(f'epochs must be at least 1, got {cfg.epochs}')

    # Model: the spec's pretrained weights (rank 0 downloads first, the others then read the cache).
    _seed_all(cfg.seed)
    kwargs = {'num_classes': len(classes)}
    if not dist_utils.is_main():
        dist_utils.barrier()
    try:
        model = create_model(cfg.model, pretrained=cfg.pretrained and state is None, **kwargs)
    finally:
        if dist_utils.is_main():
            dist_utils.barrier()
    if state is not None:
        model.load_state_dict(state['model'])
    device = info.device
    model.to(device)
    if device.type == 'cuda':
        model.to(memory_format=torch.channels_last)

    # Data configuration the model is trained (and then evaluated and saved) with.
    args = {}
    if cfg.img_size:
        args['input_size'] = (3, cfg.img_size, cfg.img_size)
    if cfg.crop_pct:
        args['crop_pct'] = cfg.crop_pct
    data_cfg = resolve_data_config(args, model=model)
    data_cfg = {k: data_cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}
    train_tf = create_transform(
        input_size=data_cfg['input_size'], is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
        color_jitter=cfg.color_jitter, interpolation=data_cfg['interpolation'], mean=data_cfg['mean'],
        std=data_cfg['std'])
    eval_tf = create_transform(**data_cfg, is_training=False)
    train_set = ImageFolderDataset(train_data.samples, train_tf)
    val_set = ImageFolderDataset(val_data.samples, eval_tf)
    workers = default_workers() if cfg.workers is None else cfg.workers
    sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=False)
    steps_per_epoch = max(1, math.ceil(len(sampler) / cfg.batch_size))

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched='cosine', num_epochs=cfg.epochs,
                                       warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1), warmup_lr=cfg.lr * 0.01,
                                       min_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps_per_epoch)
    amp_dtype = None
    if device.type == 'cuda':
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler('cuda') if amp_dtype == torch.float16 else None
    start_epoch, history, train_time, skipped_train = 0, [], 0.0, set()
    if state is not None:
        optimizer.load_state_dict(state['optimizer'])
        scheduler.load_state_dict(state['scheduler'])
        if scaler is not None and state.get('scaler'):
            scaler.load_state_dict(state['scaler'])
        start_epoch = int(state['epoch'])
        history = list(state['history'])
        train_time = float(state['train_time_s'])
        skipped_train = set(state['skipped_train'])
        _log(f'resuming from epoch {start_epoch} of {cfg.epochs} ({ckpt_path})')
        if start_epoch >= cfg.epochs:
            _log(f'all {cfg.epochs} epochs were done; writing the result')

    net = model
    if info.distributed:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
    if dist_utils.is_main():
        out.mkdir(parents=True, exist_ok=True)
    _log(f'fine-tuning {cfg.model} ({"random init" if cfg.init == "random" else "pretrained"}) on {cfg.data}: '
         f'{len(classes)} classes, {len(train_set)} train / {len(val_set)} val images, '
         f'{data_cfg["input_size"][-1]}px, batch {cfg.batch_size} x {info.world_size} process(es), '
         f'{cfg.opt} lr {cfg.lr:g}, {cfg.epochs} epochs, device {device.type}')

    val_metrics = None
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        net.train()
        sampler.set_epoch(epoch)
        epoch_seed = cfg.seed + 1000 * epoch + info.rank
        _seed_all(epoch_seed)
        gen = torch.Generator().manual_seed(epoch_seed)
        loader = make_loader(train_set, cfg.batch_size, workers, sampler=sampler, generator=gen,
                             pin_memory=device.type == 'cuda')
        bar = progress_bar(len(loader), f'epoch {epoch + 1}/{cfg.epochs}', 'batch',
                           None if progress and dist_utils.is_main() else False)
        loss_sum, seen, step_skips = 0.0, 0, []
        for step, (images, targets, _, bad) in enumerate(loader):
            step_skips += bad
            num_updates = epoch * steps_per_epoch + step
            if images is None or len(images) < 2:  # BatchNorm needs two samples; all ranks must still step
                images, targets = _filler_batch(images, targets, train_set, bad)
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            if device.type == 'cuda':
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss = criterion(net(images), targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step_update(num_updates + 1)
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
            if not bar.disable:
                rate = seen * info.world_size / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f'loss {loss_sum / seen:.4f}, {rate:.0f} img/s', refresh=False)
            bar.update(1)
        bar.close()
        scheduler.step(epoch + 1)
        for part in dist_utils.all_gather_objects(step_skips):
            skipped_train.update(train_set.samples[i][0] for i in part)
        totals = dist_utils.all_reduce_sum(torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device))
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        epoch_time = time.perf_counter() - t0
        _broadcast_buffers(model)
        val_metrics = evaluate(model, val_set, batch_size=cfg.batch_size, workers=workers, device=device,
                               amp=amp_dtype is not None, progress=progress, desc='validate')
        elapsed = time.perf_counter() - t0
        train_time += elapsed
        history.append({'epoch': epoch + 1, 'train_loss': round(train_loss, 5), 'val_loss': round(val_metrics['loss'], 5),
                        'top1': val_metrics['top1'], 'top5': val_metrics['top5'], 'time_s': round(elapsed, 2)})
        _log(f'epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val_metrics["loss"]:.4f}, '
             f'top-1 {val_metrics["top1"]:.2f} %, top-5 {val_metrics["top5"]:.2f} % '
             f'({totals[1].item() / max(epoch_time, 1e-9):.0f} img/s, {elapsed:.1f} s)')
        if dist_utils.is_main():
            _atomic_save({
                'epoch': epoch + 1, 'model': model.state_dict(), 'optimizer': optimizer.state_dict(),
                'scheduler': scheduler.state_dict(), 'scaler': scaler.state_dict() if scaler is not None else {},
                'classes': classes, 'settings': cfg.run_settings(), 'history': history,
                'train_time_s': train_time, 'skipped_train': sorted(skipped_train),
            }, ckpt_path)
        dist_utils.barrier()

    if val_metrics is None:  # resumed after the last epoch: measure the checkpoint's model
        _broadcast_buffers(model)
        val_metrics = evaluate(model, val_set, batch_size=cfg.batch_size, workers=workers, device=device,
                               amp=amp_dtype is not None, progress=progress)

    skipped = sorted(skipped_train | set(val_metrics['skipped_files']))
    metrics = {
        'top1': val_metrics['top1'], 'top5': val_metrics['top5'], 'val_loss': val_metrics['loss'],
        'epochs': cfg.epochs, 'train_time_s': round(train_time, 2), 'num_classes': len(classes),
        'classes': classes, 'train_images': len(train_set), 'val_images': val_metrics['images'],
        'images_skipped': len(skipped), 'skipped_files': skipped, 'model': cfg.model,
        'img_size': data_cfg['input_size'][-1], 'data_config': _jsonable(data_cfg), 'settings': cfg.run_settings(),
        'world_size': info.world_size, 'device': device.type, 'history': history,
    }
    if skipped:
        _log(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped[:3])}{" ..." if len(skipped) > 3 else ""}')
    if dist_utils.is_main():
        _write_result(model, out, cfg, classes, data_cfg, metrics, save_pretrained)
        ckpt_path.unlink(missing_ok=True)
        _log(f'top-1 {metrics["top1"]:.2f} %, top-5 {metrics["top5"]:.2f} % after {cfg.epochs} epochs '
             f'({train_time:.0f} s); wrote {out}')
    dist_utils.barrier()
    return metrics


def _filler_batch(images, targets, dataset, bad):
    """A batch too small for BatchNorm (unreadable images removed): top it up with readable training images."""
    extra_imgs, extra_tgts = [], []
    for i in range(len(dataset)):
        if len(extra_imgs) + (0 if images is None else len(images)) >= 2:
            break
        item = dataset[i]
        if item[0] is not None:
            extra_imgs.append(item[0])
            extra_tgts.append(item[1])
    if images is not None:
        extra_imgs = list(images) + extra_imgs
        extra_tgts = targets.tolist() + extra_tgts
    if len(extra_imgs) < 2:
        raise DataError('fewer than two readable training images')
    return torch.stack(extra_imgs), torch.tensor(extra_tgts, dtype=torch.long)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


def _write_result(model, out: Path, cfg: FinetuneConfig, classes: List[str], data_cfg, metrics, save_pretrained):
    """The Hub layout (label names and training data config in config.json, card with the accuracy) + metrics.json."""
    model = model.eval().to('cpu')
    pcfg = dict(model.pretrained_cfg)
    for key in ('label_descriptions', 'label_offset', 'tag', 'test_input_size', 'test_crop_pct', 'test_pool_size'):
        pcfg.pop(key, None)
    pcfg['num_classes'] = len(classes)
    pcfg['label_names'] = list(classes)
    start = f'{pcfg["architecture"]} (random init)' if cfg.init == 'random' else cfg.model
    pcfg['description'] = (f'Fine-tuned from {start} on {Path(cfg.data).name} ({len(classes)} classes, '
                           f'{cfg.epochs} epochs): val top-1 {metrics["top1"]:.2f} %.')
    model.pretrained_cfg = pcfg
    card_metrics = {'top1': metrics['top1'], 'top5': metrics['top5'], 'dataset': Path(cfg.data).resolve().name,
                    'num_classes': len(classes), 'split': 'val', 'init': cfg.init}
    # label_names also go to config.json's top level, where the Hub and timm look first
    save_pretrained(model, out, metrics=card_metrics, data_config=dict(data_cfg), label_names=classes)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + '\n', encoding='utf-8')

