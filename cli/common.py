"""What every command shares: the options, and one way to turn failures into an ``error:`` line and an exit code.

Exit codes: see ``ema_hub.errors`` (an ``EmaHubError``'s ``exit_code``). Only typer is imported here, so
``--help`` answers at once.
"""
import contextlib
import logging
import os
import sys
from typing import Annotated, Iterator, List, Optional

import typer

__all__ = ['CONTEXT', 'errors', 'PathsArg', 'ModelOpt', 'WeightsOpt', 'UseEmaOpt', 'BatchOpt', 'WorkersOpt',
           'DeviceOpt', 'AmpOpt', 'ChannelsLastOpt', 'DebugOpt', 'device_or_none']

CONTEXT = {'help_option_names': ['-h', '--help']}

_DEVICES = ('auto', 'cpu', 'cuda', 'mps')


def _check_device(value: str) -> str:
    if value in _DEVICES or (value.startswith('cuda:') and value[5:].isdigit()):
        return value
    raise typer.BadParameter(f'{value!r} is not one of auto, cpu, cuda, cuda:N, mps')


def device_or_none(device: str) -> Optional[str]:
    """The engine's device argument: None for ``auto`` (CUDA when available)."""
    return None if device == 'auto' else device


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
    help='A local weights file to load instead of the pretrained weights (num_classes follows its head): '
         '.safetensors, or a PyTorch state dict or timm training checkpoint (model_best.pth.tar; read weights-only).')]
UseEmaOpt = Annotated[bool, typer.Option(
    '--use-ema', help="Take the timm training checkpoint's state_dict_ema (the weights file's, convert's CKPT): its "
                      "averaged copy of the weights, as timm's scripts' --use-ema do; nothing to do with the EMA "
                      "attention layer.")]
BatchOpt = Annotated[Optional[int], typer.Option(
    '--batch-size', '-b', min=1, show_default=False, help='Images per model batch \\[default: 64 on cuda, else 16].')]
WorkersOpt = Annotated[Optional[int], typer.Option(
    '--workers', '-j', min=0, show_default=False,
    help='Decoding processes; 0 decodes in the main process, a thread per core \\[default: 0 with the model on '
         'the CPU, min(4, CPU count) beside a GPU].')]
DeviceOpt = Annotated[str, typer.Option(
    '--device', callback=_check_device, help='auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.')]
AmpOpt = Annotated[bool, typer.Option(
    '--amp', help='Mixed precision: bfloat16 autocast on the cpu and on GPUs that have it, else float16.')]
ChannelsLastOpt = Annotated[bool, typer.Option('--channels-last', help='Run the model in channels_last layout.')]
DebugOpt = Annotated[bool, typer.Option('--debug', help='Show tracebacks of unexpected errors.')]


class _Notes(logging.Handler):
    """The package's log records (which entry of a checkpoint was loaded) as lines on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def _show_notes() -> None:
    logger = logging.getLogger('ema_hub')
    if not any(isinstance(h, _Notes) for h in logger.handlers):  # once, however many commands a process runs
        logger.addHandler(_Notes())
        logger.setLevel(logging.INFO)


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


def _die(message: str, code: int) -> None:
    typer.echo(f'error: {_one_line(message)}', err=True)
    raise typer.Exit(code)


def _exit_code(error: BaseException) -> Optional[int]:
    """An ema-hub error's exit code; None for anything else (the package is not even loaded before a command runs)."""
    module = sys.modules.get('ema_hub.errors')
    return error.exit_code if module is not None and isinstance(error, module.EmaHubError) else None


@contextlib.contextmanager
def errors(debug: bool = False) -> Iterator[None]:
    """Expected failures as one ``error:`` line on stderr (exit 1, usage errors 2); tracebacks only with --debug."""
    debug = debug or bool(os.environ.get('EMA_HUB_DEBUG'))
    _show_notes()
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
        code = _exit_code(e)
        if code is not None:
            _die(str(e).splitlines()[0] if str(e) else type(e).__name__, code)
        if isinstance(e, OSError) and e.filename:
            _die(f'{e.filename}: {e.strerror or e}', 1)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ''
        hint = '' if debug else ' (run with --debug for the traceback)'
        _die(f'{type(e).__name__}: {first[:300]}{hint}' if first else f'{type(e).__name__}{hint}', 1)
