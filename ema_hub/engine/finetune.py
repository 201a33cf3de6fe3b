"""Fine-tuning on an ImageFolder (``DATA/train``, ``DATA/val``): timm's factories, resumable, torchrun-aware.

The recipe is timm's: ``create_transform(is_training=True)`` augmentation, ``create_optimizer_v2`` (AdamW),
``create_scheduler_v2`` (cosine, per-step), label-smoothed cross-entropy, AMP on CUDA (``devices.autocast``'s
policy: bfloat16 where the GPU has it, else float16 with a GradScaler). By default the model starts from its spec's pretrained weights (a variant's
default tag is the warm start) with a new head sized to the class folders.

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
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Set

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DistributedSampler

from timm.data import create_transform, resolve_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..errors import DataError, TrainingStateError
from ..files import atomic_path
from ..hub import create_model, save_pretrained
from ..specs import PathLike, parse_spec
from . import distributed as dist_utils
from .data import ImageDataset, decode_threads, decode_workers, make_loader, scan_image_folder, stack
from .devices import autocast, grad_scaler
from .output import progress_bar
from .validate import evaluate

__all__ = ['FinetuneConfig', 'finetune', 'check_data', 'CHECKPOINT_FILE', 'METRICS_FILE']

CHECKPOINT_FILE = 'checkpoint.pt'
METRICS_FILE = 'metrics.json'


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
    add_ema: bool = False               # model is any timm model; EMA grafted at its family's placement
    seed: int = 42
    workers: Optional[int] = None
    device: Optional[str] = None

    # Settings that define the run: a resumed run takes them from its checkpoint.
    RUN_KEYS = ('model', 'epochs', 'img_size', 'batch_size', 'lr', 'opt', 'weight_decay', 'warmup_epochs',
                'smoothing', 'hflip', 'scale_min', 'color_jitter', 'crop_pct', 'pretrained', 'add_ema', 'seed')

    def run_settings(self) -> Dict[str, object]:
        return {k: getattr(self, k) for k in self.RUN_KEYS}

    @property
    def init(self) -> str:
        """What training starts from: the model spec, or ``'random'`` (hf-hub:/local-dir: specs always load theirs)."""
        if self.pretrained or parse_spec(self.model).is_checkpoint:
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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
    info = dist_utils.init(cfg.device)
    try:
        out = Path(cfg.output)
        train_data, val_data = check_data(cfg.data)
        state = _resume_state(cfg, out, train_data.classes, resume)
        if cfg.epochs < 1:
            raise DataError(f'epochs must be at least 1, got {cfg.epochs}')
        run = _Run.start(cfg, train_data, val_data, state, info, progress)
        val_metrics = None
        for epoch in range(run.epoch, cfg.epochs):
            val_metrics = run.train_epoch(epoch)
            run.save_checkpoint(out / CHECKPOINT_FILE)
        if val_metrics is None:  # resumed after the last epoch: measure the checkpoint's model
            val_metrics = run.evaluate()
        return run.finish(out, val_metrics)
    finally:
        dist_utils.cleanup()


def _resume_state(cfg: FinetuneConfig, out: Path, classes: List[str], resume: bool) -> Optional[Dict[str, object]]:
    """The checkpoint of the run to continue (its settings then replace ``cfg``'s), or None to start afresh;
    TrainingStateError when ``out`` holds a run this one must not overwrite or cannot continue."""
    ckpt_path = out / CHECKPOINT_FILE
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
        return state
    if resume:
        if (out / METRICS_FILE).is_file():
            raise TrainingStateError(f'{out} already holds a finished run ({METRICS_FILE}); nothing to resume')
        _log(f'no {CHECKPOINT_FILE} in {out}; starting from scratch')
    elif ckpt_path.is_file() or (out / 'model.safetensors').is_file():
        raise TrainingStateError(f'{out} already holds a training run; pass --resume to continue it, or choose '
                                 f'another --output folder')
    return None


def _create_model(cfg: FinetuneConfig, num_classes: int, state: Optional[Dict[str, object]],
                  device: torch.device) -> nn.Module:
    """The spec's model with a head of ``num_classes``: its pretrained weights (rank 0 downloads first, the others
    then read the cache), or the resumed checkpoint's."""
    _seed_all(cfg.seed)
    if not dist_utils.is_main():
        dist_utils.barrier()
    try:
        model = create_model(cfg.model, pretrained=cfg.pretrained and state is None, num_classes=num_classes,
                             add_ema=cfg.add_ema)
    finally:
        if dist_utils.is_main():
            dist_utils.barrier()
    if state is not None:
        model.load_state_dict(state['model'])
    model.to(device)
    if device.type == 'cuda':
        model.to(memory_format=torch.channels_last)
    return model


def _data_config(cfg: FinetuneConfig, model: nn.Module) -> Dict[str, object]:
    """The preprocessing the model is trained (and then evaluated and saved) with."""
    args = {}
    if cfg.img_size:
        args['input_size'] = (3, cfg.img_size, cfg.img_size)
    if cfg.crop_pct:
        args['crop_pct'] = cfg.crop_pct
    data_cfg = resolve_data_config(args, model=model)
    return {k: data_cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')}


@dataclass
class _Run:
    """One fine-tuning run's state: the model and its optimisation, the data, and the progress so far."""
    cfg: FinetuneConfig
    info: dist_utils.DistInfo
    model: nn.Module
    net: nn.Module                     # the model, wrapped in DDP under torchrun
    classes: List[str]
    data_cfg: Dict[str, object]
    train_set: ImageDataset
    val_set: ImageDataset
    sampler: DistributedSampler
    workers: int
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: Optional[torch.amp.GradScaler]
    amp: bool
    progress: bool
    epoch: int = 0
    history: List[Dict[str, object]] = field(default_factory=list)
    train_time: float = 0.0
    skipped_train: Set[str] = field(default_factory=set)

    @classmethod
    def start(cls, cfg: FinetuneConfig, train_data, val_data, state: Optional[Dict[str, object]],
              info: dist_utils.DistInfo, progress: bool) -> '_Run':
        device = info.device
        model = _create_model(cfg, len(train_data.classes), state, device)
        data_cfg = _data_config(cfg, model)
        train_tf = create_transform(
            input_size=data_cfg['input_size'], is_training=True, scale=(cfg.scale_min, 1.0), hflip=cfg.hflip,
            color_jitter=cfg.color_jitter, interpolation=data_cfg['interpolation'], mean=data_cfg['mean'],
            std=data_cfg['std'])
        workers = decode_workers(device, info.world_size) if cfg.workers is None else cfg.workers
        # Augmentation draws from the global RNGs: one decoding thread keeps their order, so a seed gives one run.
        train_set = train_data.dataset(train_tf)
        val_set = val_data.dataset(create_transform(**data_cfg, is_training=False),
                                   decode_threads(workers, info.world_size))
        sampler = DistributedSampler(train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                     seed=cfg.seed, drop_last=False)
        steps = max(1, math.ceil(len(sampler) / cfg.batch_size))
        optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler, _ = create_scheduler_v2(
            optimizer, sched='cosine', num_epochs=cfg.epochs, warmup_epochs=min(cfg.warmup_epochs, cfg.epochs - 1),
            warmup_lr=cfg.lr * 0.01, min_lr=cfg.lr * 0.01, step_on_epochs=False, updates_per_epoch=steps)
        amp = device.type == 'cuda'  # mixed precision on CUDA, under devices.autocast's policy
        scaler = grad_scaler(device, amp)
        net = model
        if info.distributed:
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == 'cuda' else None)
        run = cls(cfg, info, model, net, train_data.classes, data_cfg, train_set, val_set, sampler, workers,
                  optimizer, scheduler, scaler, amp, progress)
        if state is not None:
            run.restore(state)
        if dist_utils.is_main():
            Path(cfg.output).mkdir(parents=True, exist_ok=True)
        _log(f'fine-tuning {cfg.model} ({"random init" if cfg.init == "random" else "pretrained"}) on {cfg.data}: '
             f'{len(run.classes)} classes, {len(train_set)} train / {len(val_set)} val images, '
             f'{data_cfg["input_size"][-1]}px, batch {cfg.batch_size} x {info.world_size} process(es), '
             f'{cfg.opt} lr {cfg.lr:g}, {cfg.epochs} epochs, device {device.type}')
        return run

    def restore(self, state: Dict[str, object]) -> None:
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        if self.scaler is not None and state.get('scaler'):
            self.scaler.load_state_dict(state['scaler'])
        self.epoch = int(state['epoch'])
        self.history = list(state['history'])
        self.train_time = float(state['train_time_s'])
        self.skipped_train = set(state['skipped_train'])
        _log(f'resuming from epoch {self.epoch} of {self.cfg.epochs} ({Path(self.cfg.output) / CHECKPOINT_FILE})')
        if self.epoch >= self.cfg.epochs:
            _log(f'all {self.cfg.epochs} epochs were done; writing the result')

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.sampler) / self.cfg.batch_size))

    def train_epoch(self, epoch: int) -> Dict[str, object]:
        """One epoch of training, then validation; returns the validation metrics."""
        cfg, device = self.cfg, self.info.device
        t0 = time.perf_counter()
        self.net.train()
        self.sampler.set_epoch(epoch)
        epoch_seed = cfg.seed + 1000 * epoch + self.info.rank
        _seed_all(epoch_seed)
        loader = make_loader(self.train_set, cfg.batch_size, self.workers, sampler=self.sampler,
                             generator=torch.Generator().manual_seed(epoch_seed), pin_memory=device.type == 'cuda')
        bar = progress_bar(len(loader), f'epoch {epoch + 1}/{cfg.epochs}', 'batch',
                           None if self.progress and dist_utils.is_main() else False)
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.smoothing)
        loss_sum, seen, step_skips = 0.0, 0, []
        for step, samples in enumerate(loader):
            images, targets, failed = stack(samples)
            step_skips += [s.index for s in failed]
            if images is None or len(images) < 2:  # BatchNorm needs two samples; all ranks must still step
                images, targets = _filler_batch(images, targets, self.train_set)
            loss = self.step(images, targets, criterion, epoch * self.steps_per_epoch + step)
            loss_sum += loss * len(targets)
            seen += len(targets)
            if not bar.disable:
                rate = seen * self.info.world_size / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f'loss {loss_sum / seen:.4f}, {rate:.0f} img/s', refresh=False)
            bar.update(1)
        bar.close()
        self.scheduler.step(epoch + 1)
        for part in dist_utils.all_gather_objects(step_skips):
            self.skipped_train.update(self.train_set.entries[i].path for i in part)
        totals = dist_utils.all_reduce_sum(torch.tensor([loss_sum, float(seen)], dtype=torch.float64, device=device))
        train_loss = (totals[0] / totals[1].clamp(min=1)).item()
        epoch_time = time.perf_counter() - t0
        val_metrics = self.evaluate()
        elapsed = time.perf_counter() - t0
        self.train_time += elapsed
        self.epoch = epoch + 1
        self.history.append({'epoch': epoch + 1, 'train_loss': round(train_loss, 5),
                             'val_loss': round(val_metrics['loss'], 5), 'top1': val_metrics['top1'],
                             'top5': val_metrics['top5'], 'time_s': round(elapsed, 2)})
        _log(f'epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, val loss {val_metrics["loss"]:.4f}, '
             f'top-1 {val_metrics["top1"]:.2f} %, top-5 {val_metrics["top5"]:.2f} % '
             f'({totals[1].item() / max(epoch_time, 1e-9):.0f} img/s, {elapsed:.1f} s)')
        return val_metrics

    def step(self, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module, num_updates: int) -> float:
        """One optimisation step; returns the batch's mean loss."""
        device = self.info.device
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device.type == 'cuda':
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, self.amp):
            loss = criterion(self.net(images), targets)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.scheduler.step_update(num_updates + 1)
        return loss.item()

    def evaluate(self) -> Dict[str, object]:
        _broadcast_buffers(self.model)
        return evaluate(self.model, self.val_set, batch_size=self.cfg.batch_size, workers=self.workers,
                        device=self.info.device, amp=self.amp, progress=self.progress)

    def save_checkpoint(self, path: Path) -> None:
        """The last completed epoch's state, for ``--resume`` (rank 0 writes; every rank waits for it)."""
        if dist_utils.is_main():
            _atomic_save({
                'epoch': self.epoch, 'model': self.model.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(),
                'scaler': self.scaler.state_dict() if self.scaler is not None else {},
                'classes': self.classes, 'settings': self.cfg.run_settings(), 'history': self.history,
                'train_time_s': self.train_time, 'skipped_train': sorted(self.skipped_train),
            }, path)
        dist_utils.barrier()

    def finish(self, out: Path, val_metrics: Dict[str, object]) -> Dict[str, object]:
        """Write the result folder (rank 0), remove the checkpoint; return the metrics."""
        cfg = self.cfg
        skipped = sorted(self.skipped_train | set(val_metrics['skipped_files']))
        metrics = {
            'top1': val_metrics['top1'], 'top5': val_metrics['top5'], 'val_loss': val_metrics['loss'],
            'epochs': cfg.epochs, 'train_time_s': round(self.train_time, 2), 'num_classes': len(self.classes),
            'classes': self.classes, 'train_images': len(self.train_set), 'val_images': val_metrics['images'],
            'images_skipped': len(skipped), 'skipped_files': skipped, 'model': cfg.model,
            'img_size': self.data_cfg['input_size'][-1], 'data_config': _jsonable(self.data_cfg),
            'settings': cfg.run_settings(), 'world_size': self.info.world_size, 'device': self.info.device.type,
            'history': self.history,
        }
        if skipped:
            _log(f'skipped {len(skipped)} unreadable image(s): {", ".join(skipped[:3])}'
                 f'{" ..." if len(skipped) > 3 else ""}')
        if dist_utils.is_main():
            _write_result(self.model, out, cfg, self.classes, self.data_cfg, metrics)
            (out / CHECKPOINT_FILE).unlink(missing_ok=True)
            _log(f'top-1 {metrics["top1"]:.2f} %, top-5 {metrics["top5"]:.2f} % after {cfg.epochs} epochs '
                 f'({self.train_time:.0f} s); wrote {out}')
        dist_utils.barrier()
        return metrics


def _filler_batch(images, targets, dataset: ImageDataset):
    """A batch too small for BatchNorm (unreadable images removed): top it up with readable training images."""
    extra_imgs, extra_tgts = [], []
    for i in range(len(dataset)):
        if len(extra_imgs) + (0 if images is None else len(images)) >= 2:
            break
        sample = dataset[i]
        if sample.tensor is not None:
            extra_imgs.append(sample.tensor)
            extra_tgts.append(sample.target)
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


def _write_result(model, out: Path, cfg: FinetuneConfig, classes: List[str], data_cfg, metrics):
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
