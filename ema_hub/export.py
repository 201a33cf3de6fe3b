"""Export a model for deployment: an ONNX graph for onnxruntime (and any ONNX runtime), or a torch.export program.

``export_model(spec, 'model.onnx')`` traces the model with ``torch.onnx.export`` (EMA becomes standard ONNX
operators: ``ema_hub.layers.onnx_graph``), checks the file with onnx's checker and runs it in
onnxruntime against the PyTorch model; ``'model.pt2'`` saves a ``torch.export`` ExportedProgram (EMA stays
the ``ema_hub::ema`` operator, so running it needs ``import ema_hub``) and runs it back. The batch
dimension is always dynamic; ``dynamic_size`` makes height and width dynamic too, and the check then runs at a
second, non-square size as well.
"""
import contextlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .errors import MissingDependencyError, UsageError
from .layers.onnx_graph import translating, translations
from .specs import PathLike

__all__ = ['FORMATS', 'ExportReport', 'export_model', 'export_module', 'onnx_session']

FORMATS = ('.onnx', '.pt2')
_EXPORT_EXTRA = "pip install 'ema-hub[export]'"


@dataclass
class ExportReport:
    """What was written and how closely it reproduces the PyTorch model."""
    path: Path
    format: str
    input_shape: Tuple[int, ...]
    dynamic: List[str]                    # the input's dynamic dimensions, by name
    export_s: float                       # seconds to export (and, for ONNX, check the file)
    max_abs_diff: Dict[str, float] = field(default_factory=dict)   # per checked input shape
    max_rel_diff: Dict[str, float] = field(default_factory=dict)   # max |diff| / max |PyTorch output|


def _check_output(output: PathLike) -> str:
    """The format the output's suffix picks, once its packages are known to be there (before any slow work)."""
    suffix = Path(output).suffix.lower()
    if suffix not in FORMATS:
        raise UsageError(f'{Path(output).name}: the output suffix picks the format, one of {", ".join(FORMATS)}')
    if suffix == '.onnx':
        _require_onnx()
    return suffix


def _require_onnx() -> None:
    """The export extra's packages, or a one-line error naming the install command."""
    missing = []
    for name in ('onnx', 'onnxscript', 'onnxruntime'):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingDependencyError(f'ONNX export needs {", ".join(missing)}; install them with {_EXPORT_EXTRA}')


def export_model(model: str, output: PathLike, *, weights: Optional[str] = None, use_ema: bool = False,
                 batch_size: int = 2, img_size: Optional[Sequence[int]] = None,
                 dynamic_size: bool = False) -> ExportReport:
    """Export the model a spec names (``name``, ``name.tag``, ``hf-hub:``, ``local-dir:``; ``weights``: a local
    weights file instead, ``use_ema`` its averaged weights, as ``hub.create_model``) to ``output``; the suffix
    (.onnx, .pt2) picks the format.

    ``batch_size`` is the example batch the model is traced and checked with (the exported batch is dynamic);
    ``img_size`` (H, or H and W) defaults to the model's input size.
    """
    _check_output(output)  # before loading the model
    from .engine.inference import load_model
    from timm.data import resolve_data_config

    net = load_model(model, weights, torch.device('cpu'), use_ema=use_ema)
    if img_size:
        size = (int(img_size[0]), int(img_size[-1]))
    else:
        size = tuple(resolve_data_config({}, model=net)['input_size'][1:])
    return export_module(net, output, (batch_size, 3) + tuple(size), dynamic_size=dynamic_size)


def export_module(module: nn.Module, output: PathLike, input_shape: Sequence[int],
                  dynamic_size: bool = False) -> ExportReport:
    """``export_model`` for a module in eval mode and an example input shape (B, C, H, W)."""
    output = Path(output)
    suffix = _check_output(output)
    if input_shape[0] < 2 or (dynamic_size and min(input_shape[2:]) < 2):
        # torch.export specialises sizes of 1: a dynamic dimension needs an example of at least 2
        raise UsageError('a dynamic dimension needs an example size of at least 2: use --batch-size 2 or more'
                         + (' and an image size of at least 2' if dynamic_size else ''))
    module = module.eval()
    torch.manual_seed(0)
    x = torch.randn(*input_shape)
    dims = {0: torch.export.Dim('batch', min=1)}
    if dynamic_size:
        low = _smallest_size(module)
        dims.update({2: torch.export.Dim('height', min=low), 3: torch.export.Dim('width', min=low)})
    output.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with torch.no_grad():
        if suffix == '.onnx':
            _export_onnx(module, x, dims, output)
        else:
            torch.export.save(torch.export.export(module, (x,), dynamic_shapes=(dims,)), str(output))
    report = ExportReport(output, suffix[1:], tuple(input_shape), [d.__name__ for d in dims.values()],
                          time.perf_counter() - start)
    run = _onnx_runner(output) if suffix == '.onnx' else _pt2_runner(output)
    shapes = [tuple(input_shape)]
    if dynamic_size:  # a second size, non-square and not the traced one
        h, w = input_shape[2:]
        shapes.append((input_shape[0] + 1, input_shape[1], h + 32, max(2, w - 32) if w > 64 else w + 48))
    for shape in shapes:
        xs = torch.randn(*shape)
        with torch.no_grad():
            want = module(xs).float()
        got = torch.as_tensor(run(xs)).float()
        diff = (got - want).abs().max().item()
        key = 'x'.join(map(str, shape))
        report.max_abs_diff[key] = diff
        report.max_rel_diff[key] = diff / max(want.abs().max().item(), 1e-12)
    return report


def _smallest_size(module: nn.Module) -> int:
    """The smallest input side a dynamic export covers: one that leaves the last feature map at least 2 wide
    (timm's EMA networks and the traced graph treat a 1-wide map differently)."""
    info = getattr(module, 'feature_info', None)
    reductions = [f['reduction'] for f in info] if isinstance(info, list) else []
    return max(reductions, default=1) + 1


def _export_onnx(module: nn.Module, x: torch.Tensor, dims, output: Path) -> None:
    import onnx

    with contextlib.redirect_stdout(io.StringIO()), translating():  # the exporter reports its progress on stdout
        program = torch.onnx.export(module, (x,), dynamo=True, dynamic_shapes=(dims,), input_names=['input'],
                                    output_names=['output'], external_data=False,
                                    custom_translation_table=translations(), optimize=False)
    _fold_constants(program.model)
    program.save(str(output), external_data=False)
    onnx.checker.check_model(str(output), full_check=True)


def _fold_constants(model) -> None:
    """The graph with what depends on weights alone folded into initializers (BatchNorm's training-form
    arithmetic, EMA's parameter-only algebra), unused nodes dropped and repeats merged.

    Instead of the exporter's ``optimize=True``: its pattern rewrites cost minutes on a graph with EMA layers
    and gain nothing in onnxruntime, which fuses operators itself when it loads the file.
    """
    import onnx_ir as ir
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    fold_constants(model, onnx_shape_inference=True, input_size_limit=1 << 24)  # EMA's 3x3 weights included
    ir.passes.Sequential(common.RemoveUnusedNodesPass(),
                         common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
                         common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass())(model)


def onnx_session(path: PathLike, threads: Optional[int] = None):
    """An onnxruntime CPU session for an exported file (``threads``: intra-op threads, default onnxruntime's)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=['CPUExecutionProvider'])


def _onnx_runner(path: Path):
    session = onnx_session(path)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.numpy()})[0]


def _pt2_runner(path: Path):
    program = torch.export.load(str(path)).module()

    def run(x):
        with torch.no_grad():
            return program(x)
    return run
