"""EMA's CPU forward and backward as compiled kernels (``ema_forward.c``, ``ema_backward.c``), built on first use
with the system's C compiler.

The eager layer is memory bound: as PyTorch ops its forward makes about a dozen passes over the input, its
backward more. The kernels make one per group (c channels of one sample, held in a core's cache from the
first step to the last; docs/performance.md has what that bought). They compute the
same as ``eager.forward`` and ``eager.backward_full_size``, which stay the path for other devices and dtypes
and wherever the kernels cannot be built.

Building: ``$CC`` (else the compiler Python was built with, else ``cc``), with OpenMP, once per machine and
source version, into ``$XDG_CACHE_HOME/ema_hub/native`` (``~/.cache/ema_hub/native``), in about a second;
later processes load the cached library once its checksum (``.sha256`` beside it, written after a successful
build) matches, and build it again when it does not: a cut-off library would kill every process that loads it.
No compiler, a failed build, a compiler call over ``$EMA_HUB_CC_TIMEOUT`` seconds (120) or a library that does
not load (reported once as a warning): the PyTorch ops run instead. ``EMA_HUB_NATIVE=0`` turns the kernels off.
The kernels' OpenMP threads are PyTorch's own (the library links the libgomp PyTorch has loaded), as many as
``torch.get_num_threads()``.
"""
import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..files import atomic_path
from .algebra import Coefficients, Edge, Params, edge_taps

__all__ = ['available', 'supports', 'forward', 'backward']

_SOURCES = [Path(__file__).with_name(name) for name in ('ema_forward.c', 'ema_backward.c')]
_HEADER = Path(__file__).with_name('ema_kernels.h')  # what both include: part of the cache key
# -march=native: the kernel is built on the machine that runs it (the cache key names the CPU); the second
# set is for compilers that do not know the flag.
_FLAG_SETS = (
    ['-O3', '-march=native', '-fopenmp', '-fno-math-errno', '-shared', '-fPIC'],
    ['-O3', '-fopenmp', '-fno-math-errno', '-shared', '-fPIC'],
)
# The edge sums' positions, from their one definition.
_DEFINES = [f'-DEDGE_{edge.name}={edge.value}' for edge in Edge]
_TIMEOUT_S = 120.0  # the default limit of a compiler call; a build takes about a second


class _Args(ctypes.Structure):
    """The kernel's ``Args`` (ema_forward.c), field for field."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        'x', 'out', 'gate', 'pooled', 'edges', 'sums', 'w1', 'b1', 'gamma', 'beta', 'w3', 'b3', 'taps_e')] + [
        ('eps', ctypes.c_float), ('n', ctypes.c_long), ('c', ctypes.c_long), ('h', ctypes.c_long),
        ('w', ctypes.c_long), ('threads', ctypes.c_int), ('channels_last', ctypes.c_int), ('groups', ctypes.c_long)]


class _BackArgs(ctypes.Structure):
    """The kernel's ``BackArgs`` (ema_backward.c), field for field."""
    _fields_ = [(name, ctypes.c_void_p) for name in (
        'x', 'dy', 'gate', 'gates', 'shift', 'k', 'mu', 'var', 'rstd', 's2', 'gamma', 'beta', 'w1', 'taps_e',
        'taps_mix', 'dx', 'dk', 'dlogit', 'dbias', 'du', 'dtaps')] + [
        ('n', ctypes.c_long), ('c', ctypes.c_long), ('h', ctypes.c_long), ('w', ctypes.c_long),
        ('threads', ctypes.c_int)]


def available() -> bool:
    """Whether the kernel is built (or can be, now) and loaded: False without a C compiler with OpenMP."""
    return _library() is not None


def supports(x: torch.Tensor, params: List[torch.Tensor], dtype: Optional[torch.dtype] = None) -> bool:
    """Whether ``forward`` takes this input once it is in ``dtype`` (default: its own): fp32 on the CPU, parameters
    likewise, kernel available."""
    return (x.device.type == 'cpu' and (dtype or x.dtype) == torch.float32
            and all(p.device.type == 'cpu' and p.dtype == torch.float32 for p in params) and available())


def forward(x: torch.Tensor, groups: int, p: Params, edges_of_taps: torch.Tensor, eps: float,
            out: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """EMA's forward on ``x`` (B, C, H, W), contiguous or channels_last, into ``out`` (the same shape and layout);
    ``edges_of_taps`` is ``algebra.tap_edges()``.

    Returns the gate sigmoid(cross) (n, H, W), the pooled means (n, c, H + W), the edge sums (n, c, 9), and the
    sum and sum of squares of a - shift (2, n, c), n = B * groups and c = C / groups: ``algebra.Stats``, as
    ``eager.forward`` returns them.
    """
    b, ch, h, w = x.shape
    n, c = b * groups, ch // groups
    channels_last = not x.is_contiguous()
    assert out.shape == x.shape and all(
        t.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for t in (x, out))
    gate, pooled = x.new_empty(n, h, w), x.new_empty(n, c, h + w)
    edges, sums = x.new_empty(n, c, 9), x.new_empty(2, n, c)
    params = [t.contiguous() for t in (*p, edge_taps(p.w3, edges_of_taps))]  # kept alive until the kernel returns
    args = _Args(*(t.data_ptr() for t in (x, out, gate, pooled, edges, sums, *params)), eps, n, c, h, w,
                 torch.get_num_threads(), channels_last, groups)
    if _library().ema_forward(ctypes.byref(args)):
        raise MemoryError('EMA: the native forward could not allocate its scratch memory')
    return gate, pooled, edges, sums


def backward(gx: torch.Tensor, dy: torch.Tensor, gate: torch.Tensor, gates: torch.Tensor, shift: torch.Tensor,
             co: Coefficients, p: Params) -> Tuple[torch.Tensor, ...]:
    """The full-size part of the backward on grouped ``gx`` and ``dy`` (n, c, H, W), contiguous fp32.

    Takes the gate (n, H, W), the gates (n, c, H + W), the shift (n, c) and the ``Coefficients``. Returns what
    ``eager.backward_full_size`` returns: the input gradient (n, c, H, W), per group dk and dlogit (n, c), dbias
    (n) and the gates' gradient du (n, c, H + W), and taps_mix's gradient summed over the batch (9, c).
    """
    n, c, h, w = gx.shape
    assert gx.is_contiguous() and dy.is_contiguous() and dy.shape == gx.shape
    tensors = [t.detach().contiguous() for t in (gate, gates, shift, co.k, co.mu, co.var, co.rstd, co.s2)]
    w1 = torch.nn.functional.pad(p.w1.detach().reshape(c, c), (0, -c % 16))  # rows of whole v16 vectors
    shared = [t.detach().contiguous() for t in (p.gamma, p.beta, w1, co.taps.taps_e, co.taps.taps_mix)]
    dx, du = torch.empty_like(gx), gx.new_empty(n, c, h + w)
    dk, dlogit, dbias, dtaps = gx.new_empty(n, c), gx.new_empty(n, c), gx.new_empty(n), gx.new_empty(n, 9, c)
    args = _BackArgs(*(t.data_ptr() for t in (gx, dy, *tensors, *shared, dx, dk, dlogit, dbias, du, dtaps)),
                     n, c, h, w, torch.get_num_threads())
    if _library().ema_backward(ctypes.byref(args)):
        raise MemoryError('EMA: the native backward could not allocate its scratch memory')
    return dx, dk, dlogit, dbias, du, dtaps.sum(0)  # the kernel writes it per group: no sum across threads


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    if os.environ.get('EMA_HUB_NATIVE', '1') == '0':
        return None
    try:
        lib = ctypes.CDLL(str(_built()))
    except (_Unavailable, OSError) as e:  # no compiler, a failed or hung build, an unwritable cache, a bad library
        warnings.warn(f'EMA: native kernel unavailable: {e}; using PyTorch ops (slower). Set EMA_HUB_NATIVE=0 to '
                      'skip the attempt.', RuntimeWarning, stacklevel=2)
        return None
    lib.ema_forward.argtypes = [ctypes.POINTER(_Args)]
    lib.ema_forward.restype = ctypes.c_int
    lib.ema_backward.argtypes = [ctypes.POINTER(_BackArgs)]
    lib.ema_backward.restype = ctypes.c_int
    return lib


class _Unavailable(Exception):
    """Why the kernels cannot be built here, in a clause."""


def _built() -> Path:
    """The compiled library in the cache, built now if missing or damaged; _Unavailable when it cannot be."""
    compiler = _compiler()
    version = _run([*compiler, '--version']).stdout
    cache = Path(os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache') / 'ema_hub' / 'native'
    source = [path.read_bytes() for path in (*_SOURCES, _HEADER)]
    error = ''
    for flags in _FLAG_SETS:
        key = hashlib.sha256(repr((source, compiler, flags, _DEFINES, version, platform.machine(), _cpu())).encode())
        target = cache / f'ema_kernels-{key.hexdigest()[:16]}.so'
        if _verified(target):
            return target
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:  # built aside, then renamed: atomic for other processes
            built = Path(tmp) / target.name
            run = _run([*compiler, *flags, *_DEFINES, *map(str, _SOURCES), '-o', str(built), '-lm'])
            if run.returncode == 0:
                _install(built, target)
                return target
            error = (run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[-1]
    raise _Unavailable(f'could not build the native kernel with {compiler[0]}: {error}')


def _checksum(library: Path) -> Path:
    return library.with_name(library.name + '.sha256')


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _verified(library: Path) -> bool:
    """Whether ``library`` is whole: what its checksum, written once the build succeeded, says (a cut-off library
    kills the process that loads it with a bus error)."""
    try:
        return _checksum(library).read_text(encoding='ascii').strip() == _digest(library)
    except (OSError, UnicodeDecodeError):  # missing, unreadable or garbled: build it again
        return False


def _install(built: Path, library: Path) -> None:
    """Move a finished build into the cache, then its checksum: each appears whole or not at all."""
    digest = _digest(built)
    os.replace(built, library)  # the build folder is in the cache: the same file system
    with atomic_path(_checksum(library)) as tmp:
        tmp.write_text(digest + '\n', encoding='ascii')


def _run(command: List[str]) -> subprocess.CompletedProcess:
    """Run a compiler command, for at most ``$EMA_HUB_CC_TIMEOUT`` seconds: a hung compiler must not hang the layer."""
    value = os.environ.get('EMA_HUB_CC_TIMEOUT') or str(_TIMEOUT_S)
    try:
        timeout = float(value)
    except ValueError:
        raise _Unavailable(f'EMA_HUB_CC_TIMEOUT={value!r} is not a number of seconds') from None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise _Unavailable(f'{command[0]} did not finish within {timeout:g} s (EMA_HUB_CC_TIMEOUT)') from None


def _compiler() -> List[str]:
    """$CC if set, else the compiler Python was built with if it is here (conda's often is not), else cc."""
    candidates = [os.environ['CC']] if os.environ.get('CC') else [sysconfig.get_config_var('CC') or '', 'cc']
    for candidate in candidates:
        command = shlex.split(candidate)
        if command and shutil.which(command[0]):
            return command
    raise _Unavailable(f'no C compiler found (tried {", ".join(c for c in candidates if c)}); install one with '
                       'OpenMP or point CC at it')


def _cpu() -> str:
    """The CPU's model and features, for the cache key (a library built with -march=native is CPU-specific)."""
    try:
        info = Path('/proc/cpuinfo').read_text().splitlines()
    except OSError:
        return platform.processor()
    return '\n'.join(sorted({line for line in info if line.startswith(('model name', 'flags', 'Features'))}))
