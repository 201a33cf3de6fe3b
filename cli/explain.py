"""``ema-hub explain``: heatmaps of where a model looks (CAM methods) and of EMA's own gates, over image files.

``cli/app.py`` calls :func:`register`; torch and ema_hub load inside the command.
"""
import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from .common import BatchOpt, DebugOpt, DeviceOpt, PathsArg, UseEmaOpt, WeightsOpt, errors

__all__ = ['register']

_METHODS_HELP = ('Comma-separated: gradcam, gradcam++, hirescam, xgradcam, layercam, eigencam, eigengradcam, '
                 'scorecam (one forward per channel: slow), ablationcam (slow), fullgrad, and ema (the spatial gate '
                 'of EMA layers).')


def explain(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        paths: PathsArg,
        output: Annotated[str, typer.Option(
            '--output', '-o', metavar='DIR', show_default=False,
            help='Folder for the overlays (<image stem>.<method>-<layer>.png) and --grid\'s grid.png.')],
        method: Annotated[str, typer.Option('--method', metavar='METHODS', help=_METHODS_HELP)] = 'gradcam',
        layer: Annotated[Optional[List[str]], typer.Option(
            '--layer', metavar='NAME', show_default=False,
            help='Repeatable. A module name is the CAM methods\' target layer \\[default: the last feature stage: '
                 'layer4, bn2, stages.3]; an EMA layer\'s name (or all) picks the gates --method ema draws '
                 '\\[default: the first EMA layer of each stage].')] = None,
        target: Annotated[Optional[str], typer.Option(
            '--target', metavar='CLASS', show_default=False,
            help='The class to explain, by index or name \\[default: each image\'s top-1].')] = None,
        grid: Annotated[bool, typer.Option(
            '--grid', help='Also draw grid.png: the images in rows, their maps in columns, with class and score.')] = False,
        save_maps: Annotated[Optional[str], typer.Option(
            '--save-maps', metavar='FILE.npz', show_default=False,
            help='The raw maps in the images\' own pixel grids, scaled to \\[0, 1], keyed by input path (path::column '
                 'when several columns are drawn).')] = None,
        weights: WeightsOpt = None,
        use_ema: UseEmaOpt = False,
        batch_size: BatchOpt = None,
        device: DeviceOpt = 'auto',
        debug: DebugOpt = False,
) -> None:
    """Draw where MODEL looks in each image: Grad-CAM and its relatives, or EMA's own attention.

    One record per image on stdout (JSON lines in a pipe): the class explained, its score, the files drawn.
    Unreadable images get an error record and the others are drawn. Exit code: 0 if every image was drawn, 1 if
    any failed, 2 for usage errors. The CAM methods need the explain extra: pip install 'ema-hub\\[explain]'.
    """
    with errors(debug):
        from ema_hub.engine.images import require_inputs
        from ema_hub.engine.inference import load_model, select_device
        from ema_hub.engine.output import progress_bar
        from ema_hub.errors import UsageError
        from ema_hub.explain import columns, explain as run

        if save_maps is not None and not save_maps.lower().endswith('.npz'):
            raise UsageError(f'--save-maps {save_maps}: the maps are written as .npz; name a FILE.npz')
        entries = require_inputs(paths)
        dev = select_device(device)
        net = load_model(model, weights, dev, use_ema=use_ema)
        names = columns(net, method, layer or ())
        progress = progress_bar(len(entries))
        explanations = run(net, entries, method, layer or (), target, batch_size=batch_size, device=dev,
                           progress=progress.update)
        failed = _draw(explanations, names, Path(output), grid, save_maps, progress)
        if failed:
            typer.echo(f'{failed} of {len(entries)} image(s) could not be explained', err=True)
        raise typer.Exit(1 if failed else 0)


def _draw(explanations, names: List[str], folder: Path, grid: bool, save_maps: Optional[str], progress) -> int:
    """Write each explanation's overlays (and the grid and maps file); print its record; return the failures."""
    from contextlib import ExitStack

    from ema_hub.engine.overlays import ContactSheet, MapWriter, column_slug, overlay

    folder.mkdir(parents=True, exist_ok=True)
    table = sys.stdout.isatty()
    sheet = ContactSheet(names) if grid else None
    failed, used = 0, set()
    with ExitStack() as stack:
        maps_file = stack.enter_context(MapWriter(save_maps, names)) if save_maps is not None else None
        stack.callback(progress.close)
        for item in explanations:
            progress.clear()
            if item.error is not None:
                failed += 1
                _print({'path': item.path, 'error': item.error}, table)
                if sheet is not None:
                    sheet.add(None, {}, f'{Path(item.path).name}: {item.error}'[:60])
                continue
            stem = _unique_stem(Path(item.path).stem, used)
            used.add(stem)
            pictures, files = {}, {}
            for column, heat in item.maps.items():
                if heat is not None:
                    pictures[column] = overlay(item.image, heat)
                    files[column] = str(folder / f'{stem}.{column_slug(column)}.png')
                    pictures[column].save(files[column])
            if sheet is not None:
                sheet.add(item.image, pictures, f'{item.label[:40]} {100 * item.score:.1f}%')
            if maps_file is not None:
                maps_file.add(item.path, item.maps)
            _print({'path': item.path, 'index': item.index, 'label': item.label, 'score': round(item.score, 6),
                    'files': files, **({'notes': item.notes} if item.notes else {})}, table)
    if sheet is not None:
        sheet.render().save(folder / 'grid.png')
    return failed


def _unique_stem(stem: str, taken: set) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... when images from several folders share a name."""
    n, name = 1, stem
    while name in taken:
        n += 1
        name = f'{stem}-{n}'
    return name


def _print(record: dict, table: bool) -> None:
    if not table:
        typer.echo(json.dumps(record, ensure_ascii=False))
        return
    if 'error' in record:
        typer.echo(f"{record['path']}\n  error: {record['error']}")
        return
    typer.echo(f"{record['path']}\n  {100 * record['score']:6.2f}%  [{record['index']}]  {record['label']}")
    for column, file in record['files'].items():
        typer.echo(f'  {column}: {file}')
    for column, note in record.get('notes', {}).items():
        typer.echo(f'  {column}: {note}')


def register(app: typer.Typer) -> None:
    """Add ``explain`` to the ``ema-hub`` app."""
    app.command(name='explain', epilog='Example: ema-hub explain resnet50_ema photos/ -o cams --method gradcam,ema '
                                       '--grid')(explain)
