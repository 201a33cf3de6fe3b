"""The Typer apps behind ``ema-classify`` (``classify_main``) and ``ema-hub`` (``main``).

Only typer is imported at module level: torch, timm and ema_hub load inside the commands, so ``--help``
answers at once. Exit codes: 0 success; 1 when any input failed or a weights/Hub fault stopped the run (printed as one
``error:`` line, no traceback unless ``--debug``); 2 for usage errors (bad options, an unknown model or
tag, no images found in the given paths, a features output that is neither .npz nor .safetensors).
"""
import contextlib
import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Dict, Iterator, List, Optional

import typer

__all__ = ['app', 'classify_app', 'main', 'classify_main']

_CONTEXT = {'help_option_names': ['-h', '--help']}

app = typer.Typer(
    name='ema-hub',
    help='EMA (Efficient Multi-Scale Attention) timm backbones: classify images, extract features, and manage '
         'pretrained weights on the Hugging Face Hub.',
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode='rich',
    context_settings=_CONTEXT,
)
classify_app = typer.Typer(
    name='ema-classify',
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode='rich',
    context_settings=_CONTEXT,
)


class Format(str, Enum):
    table = 'table'
    json = 'json'
    jsonl = 'jsonl'
    csv = 'csv'


class ListFormat(str, Enum):
    table = 'table'
    json = 'json'


class UsageFailure(Exception):
    """A usage error found after parsing (no images found, bad output suffix): exit 2."""


_DEVICES = ('auto', 'cpu', 'cuda', 'mps')


def _check_device(value: str) -> str:
    if value in _DEVICES or (value.startswith('cuda:') and value[5:].isdigit()):
        return value
    raise typer.BadParameter(f'{value!r} is not one of auto, cpu, cuda, cuda:N, mps')


# Options shared by classify and features.
PathsArg = Annotated[List[str], typer.Argument(
    metavar='PATH', show_default=False,
    help='Image files, folders (searched recursively for image extensions), glob patterns, or - to read '
         'paths from stdin.')]
ModelOpt = Annotated[str, typer.Option(
    '--model', '-m',
    help='A variant (its default tag), variant.tag, hf-hub:<repo_id> or local-dir:<folder>. '
         'See `ema-hub list`.')]
WeightsOpt = Annotated[Optional[str], typer.Option(
    '--weights', metavar='FILE', show_default=False,
    help='A local .safetensors file to load instead of the pretrained weights (num_classes follows its head).')]
BatchOpt = Annotated[Optional[int], typer.Option(
    '--batch-size', '-b', min=1, show_default=False, help='Images per model batch \\[default: 64 on cuda, else 16].')]
WorkersOpt = Annotated[Optional[int], typer.Option(
    '--workers', '-j', min=0, show_default=False,
    help='Decoding processes (0 decodes in the main process) \\[default: min(4, CPU count)].')]
DeviceOpt = Annotated[str, typer.Option(
    '--device', callback=_check_device, help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.')]
AmpOpt = Annotated[bool, typer.Option(
    '--amp', help='Mixed precision: float16 autocast on cuda/mps, bfloat16 on cpu.')]
ChannelsLastOpt = Annotated[bool, typer.Option('--channels-last', help='Run the model in channels_last layout.')]
DebugOpt = Annotated[bool, typer.Option('--debug', help='Show tracebacks of unexpected errors.')]


def _is_ema_hub_error(error: BaseException) -> bool:
    return any(cls.__name__ == 'EmaHubError' for cls in type(error).__mro__)


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _die(message: str, code: int) -> None:
    typer.echo(f'error: {_one_line(message)}', err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors(debug: bool = False) -> Iterator[None]:
    """Expected failures as one ``error:`` line on stderr (exit 1, usage errors 2); tracebacks only with --debug."""
    debug = debug or bool(os.environ.get('EMA_HUB_DEBUG'))
    if not debug:
        import warnings
        warnings.filterwarnings('ignore', category=UserWarning)
        warnings.filterwarnings('ignore', category=FutureWarning)
        # huggingface_hub logs every retry of an unreachable Hub; the one-line error below says it all.
        # It sets its own level from HF_HUB_VERBOSITY when imported, which happens later, inside the command.
        os.environ.setdefault('HF_HUB_VERBOSITY', 'error')
    try:
        yield
    except (typer.Exit, typer.Abort):
        raise
    except UsageFailure as e:
        _die(str(e), 2)
    except KeyboardInterrupt:
        typer.echo('interrupted', err=True)
        raise typer.Exit(130)
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, and keep Python from complaining at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1)
    except Exception as e:  # anything else: one line, never a traceback unless asked
        import click
        if isinstance(e, click.exceptions.ClickException):
            raise
        if debug:
            import traceback
            traceback.print_exc()
        if _is_ema_hub_error(e):
            # an unknown model or tag is a bad option value: a usage error, like click's own
            code = 2 if type(e).__name__ == 'UnknownModelError' else 1
            _die(str(e).splitlines()[0] if str(e) else type(e).__name__, code)
        if isinstance(e, OSError) and e.filename:
            _die(f'{e.filename}: {e.strerror or e}', 1)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        hint = '' if debug else ' (run with --debug for the traceback)'
        _die(f'{type(e).__name__}: {first[:300]}{hint}' if first else f'{type(e).__name__}{hint}', 1)


def _entries(paths: List[str]):
    from ema_hub.engine.images import IMAGE_EXTENSIONS, list_inputs

    entries = list_inputs(paths)
    if not entries:
        where = ', '.join(paths)
        raise UsageFailure(f'no images found in {where} (image extensions: '
                           f'{", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))})')
    return entries


def _device(name: str):
    from ema_hub.engine.inference import select_device

    try:
        return select_device(name)
    except (ValueError, RuntimeError) as e:
        raise UsageFailure(str(e)) from None


@contextlib.contextmanager
def _text_output(output: Optional[str]) -> Iterator:
    if output is None:
        yield sys.stdout
        return
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, 'w', encoding='utf-8', newline='') as stream:
        yield stream


def classify(
        paths: PathsArg,
        model: ModelOpt = 'resnet50_ema',
        weights: WeightsOpt = None,
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

    Unreadable, truncated or non-image files get an error record and the run goes on.
    Exit code: 0 if every image was classified, 1 if any failed (or the weights could not be loaded),
    2 for usage errors (including an unknown model and no images found).
    """
    with _errors(debug):
        entries = _entries(paths)
        from ema_hub.engine import inference
        from ema_hub.engine.output import RecordWriter, format_for_output, progress_bar

        dev = _device(device)
        net = inference.load_model(model, weights, dev, channels_last)
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
        batch_size: BatchOpt = None,
        workers: WorkersOpt = None,
        device: DeviceOpt = 'auto',
        amp: AmpOpt = False,
        channels_last: ChannelsLastOpt = False,
        debug: DebugOpt = False,
) -> None:
    """Pooled embeddings (forward_head(..., pre_logits=True)) of every readable image, streamed to a file.

    Images that cannot be read are left out of the file and reported on stderr; the exit code is then 1.
    Under torchrun each process embeds its share and rank 0 writes the file, rows in input order.
    """
    with _errors(debug):
        if Path(output).suffix.lower() not in ('.npz', '.safetensors'):
            raise UsageFailure(f'--output must end in .npz or .safetensors, not {Path(output).name!r}')
        entries = _entries(paths)
        from ema_hub.engine import inference
        from ema_hub.engine.output import FeatureWriter, progress_bar

        from ema_hub.engine import distributed as dist

        distributed = dist.launch_world_size() > 1
        if distributed:  # under torchrun: every rank embeds its shard, rank 0 gathers and writes once
            place = dist.init(None if device == 'auto' else device)
            dev, is_main = place.device, place.is_main
        else:
            dev, is_main = _device(device), True
        net = inference.load_model(model, weights, dev, channels_last)
        options = dict(batch_size=batch_size, workers=workers, device=dev, amp=amp, channels_last=channels_last)
        failed = 0
        share = len(dist.shard_indices(len(entries), place.rank, place.world_size)) if distributed else len(entries)
        progress = progress_bar(share, enabled=None if is_main else False)
        try:
            if distributed:
                batches = dist.gather_features(entries, net, progress=progress.update, **options)
            else:
                batches = inference.iter_features(entries, net, progress=progress.update, set_threads=True, **options)
            if not is_main:
                for _ in batches:  # take part in the gathers; rank 0 writes
                    pass
                raise typer.Exit(0)
            with FeatureWriter(output, metadata={'model': model}) as writer:
                for batch in batches:
                    writer.add(batch.paths, batch.features)
                    for path, reason in batch.errors:
                        progress.clear()
                        typer.echo(f'error: {path}: {reason}', err=True)
                        failed += 1
        finally:
            progress.close()
            if distributed:
                dist.cleanup()
        typer.echo(f'wrote {len(writer.paths)} x {writer.dim or 0} features to {output}'
                   + (f'; {failed} image(s) failed' if failed else ''), err=True)
        raise typer.Exit(1 if failed else 0)


@app.command('list')
def list_models(
        fmt: Annotated[ListFormat, typer.Option('--format', '-f', help='table or json.')] = ListFormat.table,
        debug: DebugOpt = False,
) -> None:
    """The registered variants and their pretrained tags: params, GMACs, base accuracy, cached or not."""
    with _errors(debug):
        from ema_hub.hub import is_cached, pretrained_tags
        from ema_hub.registry import VARIANTS

        rows = []
        for name, variant in VARIANTS.items():
            for i, tag in enumerate(pretrained_tags(name) or ['']):
                spec = f'{name}.{tag}' if tag else name
                rows.append({
                    'model': spec, 'default': i == 0, 'base': variant.base, 'params_m': variant.params_m,
                    'gmacs': variant.gmacs, 'base_top1': variant.base_top1,
                    'cached': bool(tag) and _safe_cached(is_cached, spec),
                })
        if fmt == ListFormat.json:
            typer.echo(json.dumps(rows, indent=2))
            return
        header = ['MODEL', 'BASE', 'PARAMS (M)', 'GMACS', 'BASE TOP-1', 'CACHED']
        table = [[r['model'] + (' (default)' if r['default'] else ''), r['base'], f"{r['params_m']:.2f}",
                  f"{r['gmacs']:.2f}", f"{r['base_top1']:.2f}", 'yes' if r['cached'] else 'no'] for r in rows]
        widths = [max(len(str(c)) for c in col) for col in zip(header, *table)]
        right = {2, 3, 4}
        for line in [header] + table:
            typer.echo('  '.join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(line, widths))).rstrip())


def _safe_cached(is_cached, spec: str) -> bool:
    try:
        return bool(is_cached(spec))
    except Exception:  # an odd cache layout must not break the listing
        return False


def _card_summary(text: str) -> str:
    """The first paragraph of a model card's body (front matter, comments and headings skipped)."""
    if text.startswith('---'):
        end = text.find('\n---', 3)
        text = text[end + 4:] if end >= 0 else text
    paragraph: List[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            if paragraph:
                break
            continue
        if stripped.startswith(('#', '<!--', '|')) and not paragraph:
            continue
        paragraph.append(stripped)
    return ' '.join(paragraph)


def _summarize_cfg(cfg: Dict[str, object]) -> Dict[str, object]:
    cfg = {k: v for k, v in cfg.items() if v is not None}
    names = cfg.pop('label_names', None)
    cfg.pop('label_descriptions', None)
    if names:
        preview = list(names)[:3]
        cfg['label_names'] = f'{len(names)} names ({", ".join(map(str, preview))}, ...)'
    return cfg


@app.command()
def info(
        model: Annotated[str, typer.Argument(metavar='MODEL', help='A model spec, as for --model.')],
        as_json: Annotated[bool, typer.Option('--json', help='Print one JSON object.')] = False,
        debug: DebugOpt = False,
) -> None:
    """A model's pretrained cfg, its resolved data config (the eval preprocessing) and its card summary."""
    with _errors(debug):
        from timm.data import resolve_data_config

        from ema_hub.hub import create_model, is_cached
        from ema_hub.registry import VARIANTS

        net = create_model(model, pretrained=False)
        cfg = dict(net.pretrained_cfg)
        data = resolve_data_config({}, model=net)
        variant = str(cfg.get('architecture', '')).split('.', 1)[0]
        summary = ''
        if model.startswith('local-dir:') and (Path(model[len('local-dir:'):]) / 'README.md').is_file():
            summary = _card_summary((Path(model[len('local-dir:'):]) / 'README.md').read_text(encoding='utf-8'))
        elif variant in VARIANTS:
            from ema_hub.cards import render_card
            tag = str(cfg.get('tag') or '')
            weights = 'warm' if tag.startswith('warm_') or not model.startswith(('hf-hub:', 'local-dir:')) \
                else 'trained'
            repo_id = model[len('hf-hub:'):] if model.startswith('hf-hub:') else None
            summary = _card_summary(render_card(variant, repo_id=repo_id, weights=weights))
        cached = None if model.startswith('local-dir:') else _safe_cached(is_cached, model)
        params = sum(p.numel() for p in net.parameters())
        result = {'model': model, 'architecture': cfg.get('architecture'), 'num_classes': net.num_classes,
                  'num_features': net.num_features, 'params_m': round(params / 1e6, 2), 'cached': cached,
                  'pretrained_cfg': _summarize_cfg(cfg), 'data_config': data, 'card_summary': summary}
        if as_json:
            typer.echo(json.dumps(result, indent=2, default=str))
            return
        cached_text = '' if cached is None else f", cached: {'yes' if cached else 'no'}"
        typer.echo(f"{model}: {cfg.get('architecture')}, {net.num_classes} classes, {net.num_features} features, "
                   f"{result['params_m']} M params{cached_text}")
        typer.echo('\npretrained cfg:')
        typer.echo(json.dumps(result['pretrained_cfg'], indent=2, default=str))
        typer.echo('\ndata config (eval transform):')
        typer.echo(json.dumps(data, indent=2, default=str))
        if summary:
            typer.echo('\ncard:')
            typer.echo(summary)


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
    with _errors(debug):
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
        token: Annotated[Optional[str], typer.Option(
            '--token', envvar='HF_TOKEN', show_default=False, show_envvar=True,
            help='Hub token (default: the logged-in one).')] = None,
        private: Annotated[bool, typer.Option('--private', help='Create the repository as private.')] = False,
        debug: DebugOpt = False,
) -> None:
    """Publish a model in timm's Hub layout (config.json, model.safetensors, model card)."""
    with _errors(debug):
        from ema_hub.hub import publish as hub_publish

        target = model
        if weights is not None:
            from ema_hub.engine.inference import load_model
            target = load_model(model, weights)
        result = hub_publish(target, repo_id, dry_run_dir=dry_run, token=token, private=private)
        typer.echo(str(result))


@app.command()
def convert(
        checkpoint: Annotated[str, typer.Argument(metavar='CKPT', help='A checkpoint of the paper\'s code '
                                                  '(.pth/.pt/.bin, read weights-only) or a .safetensors file.')],
        variant: Annotated[str, typer.Argument(metavar='VARIANT', help='The variant it belongs to.')],
        out: Annotated[str, typer.Argument(metavar='OUT.safetensors', help='Where to write.')],
        debug: DebugOpt = False,
) -> None:
    """Convert a checkpoint of the paper's code to safetensors for a variant (keys renamed and checked)."""
    with _errors(debug):
        from ema_hub.hub import convert_checkpoint

        summary = convert_checkpoint(checkpoint, variant, out)
        typer.echo(f"wrote {summary['out']}: {summary['tensors']} tensors ({summary['renamed']} attention keys "
                   f"renamed) for {summary['variant']} with {summary['num_classes']} classes")


class BenchDevice(str, Enum):
    cpu = 'cpu'
    cuda = 'cuda'


@app.command()
def benchmark(
        device: Annotated[BenchDevice, typer.Option(
            '--device', help='cpu: fp32 eager, the layer and the networks; cuda: bf16 channels_last throughput, '
                             'eager and torch.compile.')] = BenchDevice.cpu,
        threads: Annotated[int, typer.Option('--threads', min=1, help='CPU threads (the targets are set for 2).')] = 2,
        batch: Annotated[Optional[int], typer.Option(
            '--batch', min=1, show_default=False, help='Batch size \[default: 8 on cpu (2 with --quick), 256 on '
                                                       'cuda].')] = None,
        repeats: Annotated[Optional[int], typer.Option(
            '--repeats', min=1, show_default=False, help='Timed rounds per measurement \[default: 7, 1 with '
                                                         '--quick].')] = None,
        quick: Annotated[bool, typer.Option(
            '--quick', help='Small shapes, one round: checks that it runs; the numbers mean nothing.')] = False,
        debug: DebugOpt = False,
) -> None:
    """Time EMA against the paper's straightforward form, alone and in ResNet-50, and print the targets.

    Each candidate runs interleaved with its baseline in one process; a ratio is the median of per-round ratios.
    About a minute and a half on two CPU cores.
    """
    with _errors(debug):
        from ema_hub import benchmark as bench

        try:
            bench.run(device.value, threads, batch, repeats, quick)
        except ValueError as e:
            raise UsageFailure(str(e)) from None


def _register_training() -> None:
    from . import train
    train.register(app)


_register_training()


def main() -> None:
    """Entry point of ``ema-hub``."""
    app(prog_name='ema-hub')


def classify_main() -> None:
    """Entry point of ``ema-classify``."""
    classify_app(prog_name='ema-classify')


if __name__ == '__main__':
    main()
