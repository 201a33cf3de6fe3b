"""``ema-hub export``: a model as an ONNX file for onnxruntime, or as a torch.export program.

``cli/app.py`` calls :func:`register`; torch and ema_hub load inside the command.
"""
import re
from typing import Annotated, Optional, Tuple

import typer

from .common import DebugOpt, UseEmaOpt, WeightsOpt, errors

__all__ = ['register']


def _image_size(value: Optional[str]) -> Optional[Tuple[int, int]]:
    """``H`` or ``H W`` (also ``HxW``, ``H,W``) as (H, W)."""
    if value is None:
        return None
    parts = [p for p in re.split(r'[\sx,]+', value.strip()) if p]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise typer.BadParameter(f'{value!r} is not H or "H W" (positive integers)')
    return int(parts[0]), int(parts[-1])


def export(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        output: Annotated[str, typer.Argument(
            metavar='OUTPUT', help='.onnx (standard ONNX operators: onnxruntime and any ONNX runtime) or .pt2 (a '
                                   'torch.export program; loading it needs `import ema_hub`).')],
        dynamic_size: Annotated[bool, typer.Option(
            '--dynamic-size', help='Make height and width dynamic too (the batch always is).')] = False,
        batch_size: Annotated[int, typer.Option(
            '--batch-size', '-b', min=2, help='The example batch the model is traced and checked with.')] = 2,
        img_size: Annotated[Optional[str], typer.Option(
            '--img-size', metavar='H [W]', show_default=False, callback=_image_size,
            help='Example image size: H, or "H W" \\[default: the model\'s input size].')] = None,
        weights: WeightsOpt = None,
        use_ema: UseEmaOpt = False,
        debug: DebugOpt = False,
) -> None:
    """Export a model and check the file against PyTorch (the largest output difference is printed).

    The suffix picks the format. ONNX needs the export extra: pip install 'ema-hub\\[export]'.
    """
    with errors(debug):
        from ema_hub.export import export_model

        report = export_model(model, output, weights=weights, use_ema=use_ema, batch_size=batch_size,
                              img_size=img_size, dynamic_size=dynamic_size)
        typer.echo(f'wrote {report.path} ({report.format}, dynamic: {", ".join(report.dynamic)}) in '
                   f'{report.export_s:.1f} s')
        runtime = 'onnxruntime' if report.format == 'onnx' else 'torch.export.load'
        for shape, diff in report.max_abs_diff.items():
            typer.echo(f'{runtime} vs PyTorch at {shape}: max |difference| {diff:.2e} '
                       f'({report.max_rel_diff[shape]:.2e} of the largest output)')


def register(app: typer.Typer) -> None:
    """Add ``export`` to the ``ema-hub`` app."""
    app.command(name='export', epilog='Example: ema-hub export resnet50_ema resnet50_ema.onnx --dynamic-size')(export)
