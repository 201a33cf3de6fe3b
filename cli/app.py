"""The Typer apps behind ``ema-classify`` (``classify_main``) and ``ema-hub`` (``main``).

Only typer is imported at module level: torch, timm and ema_hub load inside the commands, so ``--help``
answers at once. Failures are one ``error:`` line (no traceback unless ``--debug``); exit codes: ``ema_hub.errors``.
"""
import json
import sys
from contextlib import contextmanager
from enum import Enum
from typing import Annotated, Iterator, Optional

import typer

from . import explain, export, train
from .common import (
    CONTEXT, AmpOpt, BatchOpt, ChannelsLastOpt, DebugOpt, DeviceOpt, ModelOpt, PathsArg, UseEmaOpt, WeightsOpt,
    WorkersOpt, errors,
)

__all__ = ['app', 'classify_app', 'main', 'classify_main']

app = typer.Typer(
    name='ema-hub',
    help='EMA (Efficient Multi-Scale Attention) timm backbones: classify images, extract features, and manage '
         'pretrained weights on the Hugging Face Hub.',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode='rich',
    context_settings=CONTEXT,
)
classify_app = typer.Typer(
    name='ema-classify',
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode='rich',
    context_settings=CONTEXT,
)


class Format(str, Enum):
    table = 'table'
    json = 'json'
    jsonl = 'jsonl'
    csv = 'csv'


class ListFormat(str, Enum):
    table = 'table'
    json = 'json'


@contextmanager
def _text_output(output: Optional[str]) -> Iterator:
    """stdout, or a stream whose file replaces ``output`` only once every record is written (a full disk or an
    interrupt leaves no cut-off file and any previous one as it was)."""
    if output is None:
        yield sys.stdout
        return
    from ema_hub.files import atomic_path

    with atomic_path(output) as tmp, open(tmp, 'w', encoding='utf-8', newline='') as stream:
        yield stream


def classify(
        paths: PathsArg,
        model: ModelOpt = 'resnet50_ema',
        weights: WeightsOpt = None,
        use_ema: UseEmaOpt = False,
        top_k: Annotated[int, typer.Option('--top-k', '-k', min=1, help='Predictions per image.')] = 5,
        batch_size: BatchOpt = None,
        workers: WorkersOpt = None,
        device: DeviceOpt = 'auto',
        amp: AmpOpt = False,
        channels_last: ChannelsLastOpt = False,
        fmt: Annotated[Optional[Format], typer.Option(
            '--format', '-f', show_default=False,
            help='Output format \\[default: by --output suffix (.json, .jsonl, .csv, .txt), else table on a '
                 'terminal and jsonl in a pipe]. csv: one row per image (top-1 in index,label,score; top-k as '
                 'JSON in predictions; error).')] = None,
        output: Annotated[Optional[str], typer.Option(
            '--output', '-o', metavar='FILE', show_default=False, help='Write records here instead of stdout.')] = None,
        debug: DebugOpt = False,
) -> None:
    """Classify images: top-k labels and scores for each, one record per input image, in input order.

    Unreadable, truncated or non-image files get an error record and the run goes on; so does an argument that
    yields no image (a missing path, a folder without images, a pattern that matches nothing), in its place,
    even when no argument yields any. Exit code: 0 if every image was classified, 1 if any failed, 2 for usage errors.
    """
    with errors(debug):
        from ema_hub.engine import inference
        from ema_hub.engine.images import require_inputs
        from ema_hub.engine.output import RecordWriter, format_for_output, progress_bar

        entries = require_inputs(paths)
        dev = inference.select_device(device)
        net = inference.load_model(model, weights, dev, channels_last, use_ema)
        fmt_name = fmt.value if fmt is not None else format_for_output(output, sys.stdout)
        failed = 0
        with _text_output(output) as stream:
            writer = RecordWriter(stream, fmt_name)
            progress = progress_bar(len(entries))
            interleaved = not progress.disable and output is None and sys.stdout.isatty()
            try:
                for record in inference.classify(
                        entries, net, top_k=top_k, batch_size=batch_size, workers=workers, device=dev, amp=amp,
                        channels_last=channels_last, progress=progress.update, set_threads=True):
                    if interleaved:
                        progress.clear()
                    writer.write(record)
                    failed += 'error' in record
                writer.close()
            finally:
                progress.close()
        if failed:
            typer.echo(f'{failed} of {len(entries)} image(s) could not be classified', err=True)
        raise typer.Exit(1 if failed else 0)


classify_app.command(name='classify', epilog='Example: ema-classify photos/ --model resnet18_ema --top-k 3')(classify)
app.command(name='classify', epilog='Example: ema-hub classify photos/ --model resnet18_ema')(classify)


@app.command()
def features(
        paths: PathsArg,
        model: ModelOpt,
        output: Annotated[str, typer.Option(
            '--output', '-o', metavar='FILE', show_default=False,
            help='.npz (arrays features N x D float32 and paths) or .safetensors (tensor features; paths as JSON '
                 'in the metadata key "paths").')],
        weights: WeightsOpt = None,
        use_ema: UseEmaOpt = False,
        batch_size: BatchOpt = None,
        workers: WorkersOpt = None,
        device: DeviceOpt = 'auto',
        amp: AmpOpt = False,
        channels_last: ChannelsLastOpt = False,
        debug: DebugOpt = False,
) -> None:
    """Pooled embeddings (forward_head(..., pre_logits=True)) of every readable image, streamed to a file.

    Images that cannot be read, and arguments that yield no image, are left out of the file and reported on
    stderr; the exit code is then 1.
    Under torchrun each process embeds its share and rank 0 writes the file, rows in input order.
    """
    with errors(debug):
        from ema_hub.engine.features import extract_features
        from ema_hub.engine.images import require_inputs
        from ema_hub.engine.output import check_feature_output

        check_feature_output(output)
        entries = require_inputs(paths)
        summary = extract_features(
            entries, model, output, weights=weights, use_ema=use_ema, device=device, batch_size=batch_size,
            workers=workers, amp=amp, channels_last=channels_last,
            report=lambda path, reason: typer.echo(f'error: {path}: {reason}', err=True))
        if summary is None:  # a torchrun rank that is not the writer
            raise typer.Exit(0)
        typer.echo(f'wrote {summary.rows} x {summary.dim} features to {output}'
                   + (f'; {summary.failed} image(s) failed' if summary.failed else ''), err=True)
        raise typer.Exit(1 if summary.failed else 0)


@app.command('list')
def list_models(
        fmt: Annotated[ListFormat, typer.Option('--format', '-f', help='table or json.')] = ListFormat.table,
        all_tags: Annotated[bool, typer.Option(
            '--all', help='Every warm tag (one per pretrained tag of the base), not only the default ones.')] = False,
        debug: DebugOpt = False,
) -> None:
    """The registered variants and their default tags (--all: every tag): params, GMACs, base accuracy, cached."""
    with errors(debug):
        from ema_hub.hub import list_variants

        rows = list_variants(all_tags)
        if fmt == ListFormat.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        header = ['MODEL', 'BASE', 'PARAMS (M)', 'GMACS', 'BASE TOP-1', 'CACHED']
        table = [[r['model'] + (' (default)' if r['default'] else ''), r['base'], f"{r['params_m']:.2f}",
                  f"{r['gmacs']:.2f}", '-' if r['base_top1'] is None else f"{r['base_top1']:.2f}",
                  'yes' if r['cached'] else 'no'] for r in rows]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
        right = {2, 3, 4}
        for line in [header] + table:
            typer.echo('  '.join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths))).rstrip())


@app.command()
def info(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        as_json: Annotated[bool, typer.Option('--json', help='Print one JSON object.')] = False,
        debug: DebugOpt = False,
) -> None:
    """A model's pretrained cfg, its resolved data config (the eval preprocessing) and its card summary."""
    with errors(debug):
        from ema_hub.hub import describe

        result = describe(model)
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
            return
        cached = result['cached']
        cached_text = '' if cached is None else f", cached: {'yes' if cached else 'no'}"
        typer.echo(f"{model}: {result['architecture']}, {result['num_classes']} classes, {result['num_features']} "
                   f"features, {result['params_m']} M params{cached_text}")
        typer.echo('\npretrained cfg:')
        typer.echo(json.dumps(result['pretrained_cfg'], indent=2, default=str))
        typer.echo('\ndata config (eval transform):')
        typer.echo(json.dumps(result['data_config'], indent=2, default=str))
        if result['card_summary']:
            typer.echo('\ncard:')
            typer.echo(result['card_summary'])


@app.command()
def download(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        to: Annotated[Optional[str], typer.Option(
            '--to', metavar='DIR', show_default=False,
            help='Write a loadable folder (config.json, model.safetensors, README.md) instead of filling the '
                 'Hugging Face cache; use it as local-dir:DIR.')] = None,
        force: Annotated[bool, typer.Option('--force', help='Download again even if cached.')] = False,
        debug: DebugOpt = False,
) -> None:
    """Prefetch a model's weights (then HF_HUB_OFFLINE=1 works), or export it as a folder."""
    with errors(debug):
        from ema_hub.hub import download as hub_download

        path = hub_download(model, to=to, force=force)
        typer.echo(str(path))


@app.command()
def publish(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        repo_id: Annotated[str, typer.Argument(metavar='REPO_ID', help='The Hub repository, owner/name.')],
        dry_run: Annotated[Optional[str], typer.Option(
            '--dry-run', metavar='DIR', show_default=False,
            help='Write the files that would be uploaded into DIR and stop.')] = None,
        weights: WeightsOpt = None,
        use_ema: UseEmaOpt = False,
        token: Annotated[Optional[str], typer.Option(
            '--token', envvar='HF_TOKEN', show_default=False, show_envvar=True,
            help='Hub token (default: the logged-in one).')] = None,
        private: Annotated[bool, typer.Option('--private', help='Create the repository as private.')] = False,
        debug: DebugOpt = False,
) -> None:
    """Publish a model in timm's Hub layout (config.json, model.safetensors, model card)."""
    with errors(debug):
        from ema_hub.hub import publish as hub_publish

        target = model
        if weights is not None:
            from ema_hub.engine.inference import load_model
            target = load_model(model, weights, use_ema=use_ema)
        result = hub_publish(target, repo_id, dry_run_dir=dry_run, token=token, private=private)
        typer.echo(str(result))


@app.command()
def convert(
        checkpoint: Annotated[str, typer.Argument(
            metavar='CKPT', help='A checkpoint of the paper\'s code or of timm\'s train.py (.pth/.pt/.bin/.pth.tar, '
                                 'read weights-only) or a .safetensors file.')],
        variant: Annotated[str, typer.Argument(metavar='VARIANT', help='The variant it belongs to.')],
        out: Annotated[str, typer.Argument(metavar='OUT.safetensors', help='Where to write.')],
        use_ema: UseEmaOpt = False,
        debug: DebugOpt = False,
) -> None:
    """Convert a checkpoint of the paper's code or of timm's train.py to safetensors for a variant (keys renamed and
    checked)."""
    with errors(debug):
        from ema_hub.hub import convert_checkpoint

        summary = convert_checkpoint(checkpoint, variant, out, use_ema)
        typer.echo(f"wrote {summary['out']}: {summary['tensors']} tensors ({summary['renamed']} attention keys "
                   f"renamed) for {summary['variant']} with {summary['num_classes']} classes")


class BenchDevice(str, Enum):
    cpu = 'cpu'
    cuda = 'cuda'


@app.command()
def benchmark(
        device: Annotated[BenchDevice, typer.Option(
            '--device', help='cpu: fp32, the layer and the networks; cuda: bf16 channels_last throughput.')
        ] = BenchDevice.cpu,
        modes: Annotated[Optional[str], typer.Option(
            '--modes', metavar='MODES', show_default=False,
            help='Comma-separated modes the networks run in: eager, compiled (torch.compile), onnxruntime (cpu '
                 'only) \\[default: all].')] = None,
        threads: Annotated[int, typer.Option('--threads', min=1, help='CPU threads (the targets are set for 2).')] = 2,
        batch: Annotated[Optional[int], typer.Option(
            '--batch', min=1, show_default=False, help='Batch size \\[default: 8 on cpu (2 with --quick), 256 on '
                                                       'cuda].')] = None,
        repeats: Annotated[Optional[int], typer.Option(
            '--repeats', min=1, show_default=False, help='Timed rounds per measurement \\[default: 7, 1 with '
                                                         '--quick].')] = None,
        quick: Annotated[bool, typer.Option(
            '--quick', help='Small shapes, one round: checks that it runs; the numbers mean nothing.')] = False,
        paper_form: Annotated[bool, typer.Option(
            '--paper-form/--no-paper-form', help='Time the networks with the paper form too (the layer table always '
                                                 'does): compiling its training step takes about an hour on two CPU '
                                                 'cores.')] = True,
        amp: Annotated[bool, typer.Option(
            '--amp', help='On the cpu, the networks under bf16 autocast (on cuda they always are).')] = False,
        markdown: Annotated[bool, typer.Option(
            '--markdown', help='The tables in Markdown, under a heading with the date, the machine and the versions '
                               '(as docs/performance.md holds them).')] = False,
        debug: DebugOpt = False,
) -> None:
    """Time EMA against the paper's straightforward form, alone and in ResNet-50, in every mode, and print the
    targets.

    Each candidate runs interleaved with its baseline in one process; a ratio is the median of per-round ratios.
    All modes take more than an hour on two CPU cores (compiling and exporting the networks included);
    --modes picks some.
    """
    with errors(debug):
        from ema_hub_benchmarks import speed

        speed.run(device.value, threads, batch, repeats, quick, modes.split(',') if modes else None, paper_form, amp,
                  markdown)


train.register(app)
export.register(app)
explain.register(app)


def main() -> None:
    """Entry point of ``ema-hub``."""
    app(prog_name='ema-hub')


def classify_main() -> None:
    """Entry point of ``ema-classify``."""
    classify_app(prog_name='ema-classify')


if __name__ == '__main__':
    main()
