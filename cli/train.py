"""Fine-tuning commands of ``ema-hub``: ``finetune`` and ``validate`` (both run unchanged under torchrun).

``cli/app.py`` calls :func:`register`; heavy imports (torch, timm) happen inside the commands.
"""
import json
from enum import Enum
from typing import Annotated, Optional

import typer

from .common import DebugOpt, DeviceOpt, WorkersOpt, device_or_none, errors

__all__ = ['register']


class ValidateFormat(str, Enum):
    text = 'text'
    json = 'json'


def finetune(
        model: Annotated[str, typer.Argument(
            help='A variant (starts from its default tag, the warm start), variant.tag, hf-hub:<repo_id> or '
                 'local-dir:<folder>.', show_default=False)],
        data: Annotated[str, typer.Argument(
            help='Folder with train/ and val/, each one sub-folder of images per class (ImageFolder).',
            show_default=False)],
        output: Annotated[str, typer.Option(
            '--output', '-o', metavar='DIR', show_default=False,
            help='Folder for the result: config.json, model.safetensors, README.md, metrics.json (loads with '
                 'local-dir:DIR); holds checkpoint.pt while training.')],
        epochs: Annotated[int, typer.Option('--epochs', min=1, help='Training epochs.')] = 8,
        img_size: Annotated[Optional[int], typer.Option(
            '--img-size', min=8, show_default=False, help='Square input size \\[default: the model\'s].')] = None,
        batch_size: Annotated[int, typer.Option(
            '--batch-size', '-b', min=2, help='Images per batch, per process.')] = 64,
        lr: Annotated[float, typer.Option('--lr', min=0.0, help='Peak learning rate (cosine schedule).')] = 2e-3,
        opt: Annotated[str, typer.Option('--opt', help='timm optimizer name (create_optimizer_v2).')] = 'adamw',
        weight_decay: Annotated[float, typer.Option('--weight-decay', min=0.0)] = 0.05,
        hflip: Annotated[float, typer.Option(
            '--hflip', min=0.0, max=1.0, help='Horizontal flip probability (0 for text, digits, ...).')] = 0.5,
        scale_min: Annotated[float, typer.Option(
            '--scale-min', min=0.01, max=1.0,
            help='Smallest crop area of the random-resized-crop augmentation (timm\'s ImageNet recipe: 0.08; '
                 'milder suits small data sets and low resolutions).')] = 0.5,
        pretrained: Annotated[bool, typer.Option(
            '--pretrained/--no-pretrained', help='Start from the pretrained weights (else random init).')] = True,
        add_ema: Annotated[bool, typer.Option(
            '--add-ema', help='MODEL is any timm model (name or name.tag): graft EMA into it at its family\'s '
                              'placement, keeping its pretrained function (ema_hub.add_ema).')] = False,
        resume: Annotated[bool, typer.Option(
            '--resume', help='Continue an interrupted run in --output from its last completed epoch.')] = False,
        workers: WorkersOpt = None,
        seed: Annotated[int, typer.Option('--seed', help='Random seed.')] = 42,
        device: DeviceOpt = 'auto',
        debug: DebugOpt = False,
) -> None:
    """Fine-tune a model on an ImageFolder; writes a loadable model folder with its val accuracy.

    Runs as is under `torchrun --nproc-per-node N` (DDP: gloo on CPU, NCCL on CUDA); rank 0 writes.
    """
    with errors(debug):
        from ema_hub.engine.distributed import launch_rank
        from ema_hub.engine.finetune import FinetuneConfig, finetune as run

        cfg = FinetuneConfig(model=model, data=data, output=output, epochs=epochs, img_size=img_size,
                             batch_size=batch_size, lr=lr, opt=opt, weight_decay=weight_decay, hflip=hflip,
                             scale_min=scale_min, pretrained=pretrained, add_ema=add_ema, seed=seed,
                             workers=workers,
                             device=device_or_none(device))
        metrics = run(cfg, resume=resume)
        if launch_rank() == 0:  # under torchrun, one line from rank 0
            typer.echo(json.dumps({k: metrics[k] for k in ('top1', 'top5', 'epochs', 'train_time_s',
                                                         'num_classes', 'images_skipped')}
                                  | {'output': output}))


def validate(
        model: Annotated[str, typer.Argument(
            help='A variant, variant.tag, hf-hub:<repo_id> or local-dir:<folder>.', show_default=False)],
        data_dir: Annotated[str, typer.Argument(
            help='An ImageFolder (one sub-folder per class, in sorted order = class index); a fine-tuning DATA '
                 'folder (train/ + val/) is validated on val/.', show_default=False)],
        fmt: Annotated[ValidateFormat, typer.Option('--format', '-f', help='text or json.')] = ValidateFormat.text,
        batch_size: Annotated[int, typer.Option('--batch-size', '-b', min=1)] = 64,
        img_size: Annotated[Optional[int], typer.Option(
            '--img-size', min=8, show_default=False, help='Square input size \\[default: the model\'s].')] = None,
        workers: WorkersOpt = None,
        device: DeviceOpt = 'auto',
        debug: DebugOpt = False,
) -> None:
    """Top-1/top-5 accuracy (percent) on an ImageFolder, like timm's validate.py."""
    with errors(debug):
        from ema_hub.engine import distributed
        from ema_hub.engine.validate import format_result, validate as run

        try:
            result = run(model, data_dir, batch_size=batch_size, workers=workers, img_size=img_size,
                         device=device_or_none(device))
        finally:
            is_main = distributed.is_main()
            distributed.cleanup()
        if not is_main:
            return
        if fmt is ValidateFormat.json:
            keys = ('model', 'data', 'top1', 'top5', 'loss', 'images', 'skipped', 'num_classes', 'classes',
                    'img_size', 'interpolation', 'crop_pct', 'time_s')
            typer.echo(json.dumps({k: result[k] for k in keys}))
        else:
            typer.echo(format_result(result))


def register(app: typer.Typer) -> None:
    """Add ``finetune`` and ``validate`` to the ``ema-hub`` app."""
    app.command(
        name='finetune',
        epilog='Example: ema-hub finetune resnet18_ema data/ --output runs/r18 --epochs 8 --img-size 128',
    )(finetune)
    app.command(name='validate', epilog='Example: ema-hub validate local-dir:runs/r18 data/val --format json')(validate)
