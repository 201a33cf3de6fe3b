"""EMA as PyTorch custom operators, so that eager mode, torch.compile and torch.export all call the same kernels
(``torch.library.custom_op``):

* ``ema_hub::ema``: inference, the output alone.
* ``ema_hub::ema_forward``: training, the output and the ``Stats`` its backward needs (a few per-channel and
  per-pixel tensors: the input is the only full-size tensor kept); its autograd formula calls
  ``ema_hub::ema_backward``, or differentiates ``algebra.ema_portable`` when a graph of the backward is wanted
  (double backward).

Their fake implementations give shapes without computing, so FakeTensor tracing (compile, export) and the meta
device work; the operators are opaque to the compiler, which calls the kernels below. Implementations: on the
CPU, the compiled kernels for float32 (half precision converted to it in one pass), else PyTorch ops
(``eager``); on CUDA, the forward's two Triton kernels (``ema_triton``) for float32, bfloat16 and float16, the
backward as PyTorch ops. They compute in float32 and return x's dtype, under autocast too
(``_autocast_passes_inputs``). ONNX: ``onnx_graph`` writes ``ema`` in standard operators; ``torch.export`` keeps
the operators (a .pt2 file runs them where ema_hub is imported).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import eager, native
from .algebra import Coefficients, Params, coefficients, ema_portable, gates, grouped, shift

__all__ = ['ema', 'ema_forward', 'ema_backward', 'forward_triton', 'triton_kernels']

# The CUDA forward needs Triton (PyTorch's CUDA builds bring it); imported only where a GPU is present, and not
# with EMA_HUB_NATIVE=0.
ema_triton = None
if torch.cuda.is_available():
    import os
    if os.environ.get('EMA_HUB_NATIVE', '1') != '0':
        try:
            from . import ema_triton
        except ImportError:
            pass

_HALF = (torch.float16, torch.bfloat16)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes and keeps its ``Stats`` in: float32 for half precision, else x's."""
    return torch.float32 if x.dtype in _HALF else x.dtype


def _output_format(x: Tensor, keep_layout: bool) -> torch.memory_format:
    """The output's layout, which the CPU kernel also reads x in: x's where kept (the inference operator, and
    everything on CUDA, where the kernels read and write channels_last in place), else contiguous (the training
    operator on the CPU, whose backward works on the grouped contiguous layout). x's layout is channels_last or
    contiguous, decided the same way for real and fake (symbolic) tensors, which ``empty_like``'s
    preserve-format is not."""
    keep = _channels_last(x) and (keep_layout or x.device.type == 'cuda')
    return torch.channels_last if keep else torch.contiguous_format


def _new_output(x: Tensor, keep_layout: bool, dtype: Optional[torch.dtype] = None) -> Tensor:
    return torch.empty_like(x, dtype=dtype, memory_format=_output_format(x, keep_layout))


def _channels_last(x: Tensor) -> bool:
    """Whether x's channels are its innermost dimension (channels_last), read from the strides alone: with
    symbolic sizes (torch.compile's dynamic shapes) contiguity checks cannot decide, and an unknown counts as
    no."""
    from torch.fx.experimental.symbolic_shapes import guard_or_false
    return x.dim() == 4 and guard_or_false(x.stride(1) == 1) and not guard_or_false(x.stride(3) == 1)


def triton_kernels(x: Tensor) -> bool:
    """Whether the CUDA forward runs the Triton kernels for ``x``."""
    return ema_triton is not None and x.device.type == 'cuda' and x.dtype in (torch.float32,) + _HALF


def _run(x: Tensor, w1: Tensor, b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor, tap_edges: Tensor,
         groups: int, eps: float, keep_layout: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """EMA's forward: the output (x's dtype; x's layout with ``keep_layout``, else contiguous) and the gate
    (n, H, W), pooled means (n, c, H + W), edge sums (n, c, 9) and the sums of a - shift and of its square
    (2, n, c) that the backward needs. The compiled CPU kernel for float32 (contiguous or channels_last, in
    place), else PyTorch ops on the grouped contiguous layout."""
    dtype = _compute_dtype(x)
    p = Params(*(t.detach().to(dtype) for t in (w1, b1, gamma, beta, w3, b3)))
    # Not a view of a grouped buffer: an operator's output that is a view cannot be modified in place by
    # autograd's rules (a residual `+=` after the layer)
    layout = _output_format(x, keep_layout)
    out = torch.empty_like(x, dtype=dtype, memory_format=layout)
    if native.supports(x, list(p), dtype):  # half precision: widened in one pass for the float32 kernel
        gate, pooled, edges, sums = native.forward(x.to(dtype, memory_format=layout), groups, p, tap_edges.to(dtype),
                                                   eps, out)
    else:
        gx = grouped(x, groups).to(dtype).contiguous()
        buf = out if out.is_contiguous() else torch.empty(x.shape, dtype=dtype, device=x.device)
        h, w = gx.shape[2:]
        gate, pooled, edges, sums = eager.forward(
            gx, p, buf.view(gx.shape), lambda e, s: coefficients(e, s[0], s[1], p, tap_edges.to(dtype), eps, h * w))
        if buf is not out:
            out.copy_(buf)
    return out.to(x.dtype), gate, pooled, edges, sums


def _forward(x: Tensor, w1: Tensor, b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor,
             tap_edges: Tensor, groups: int, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _run(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps, keep_layout=False)


ema_forward = torch.library.custom_op('ema_hub::ema_forward', _forward, mutates_args=())


@ema_forward.register_kernel('cuda')
def _forward_cuda(x: Tensor, w1: Tensor, b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor,
                  tap_edges: Tensor, groups: int, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if triton_kernels(x):
        return forward_triton(x, Params(w1, b1, gamma, beta, w3, b3), tap_edges, groups, eps)
    return _forward(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps)


# flexible_layout: inductor hands over x in the layout it chose (channels_last between its convolutions), which
# the kernel reads in place, instead of copying it into the layout the graph was traced with.
@torch.library.custom_op('ema_hub::ema', mutates_args=(), tags=(torch.Tag.flexible_layout,))
def ema(x: Tensor, w1: Tensor, b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor, tap_edges: Tensor,
        groups: int, eps: float) -> Tensor:
    """EMA for inference: ``ema_forward``'s output alone, in x's layout (torch.compile hands channels_last
    maps between convolutions)."""
    return _run(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps, keep_layout=True)[0]


@ema.register_kernel('cuda')
def _ema_cuda(x: Tensor, w1: Tensor, b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor,
              tap_edges: Tensor, groups: int, eps: float) -> Tensor:
    if triton_kernels(x):  # without the gate, which only a backward reads
        return forward_triton(x, Params(w1, b1, gamma, beta, w3, b3), tap_edges, groups, eps, for_backward=False)[0]
    return _run(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps, keep_layout=True)[0]


@ema.register_fake
def _ema_fake(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps):
    return _new_output(x, keep_layout=True)


def forward_triton(x: Tensor, params: Params, tap_edges: Tensor, groups: int, eps: float,
                   for_backward: bool = True) -> Tuple[Tensor, Optional[Tensor], Tensor, Tensor, Tensor]:
    """The CUDA forward: two Triton kernels around the small per-group algebra, in float32 whatever x's dtype;
    x keeps its strides (channels_last input is read in place). Returns what ``ema_forward`` returns (the gate
    None without ``for_backward``)."""
    b, _, h, w = x.shape
    p = Params(*(t.detach().float() for t in params))
    pooled, edges = ema_triton.pool(x, groups)
    g = gates(pooled, p.w1, p.b1)
    co = coefficients(edges, edges.new_zeros(edges.shape[:2]), edges.new_zeros(edges.shape[:2]), p,
                      tap_edges.float(), eps, h * w)  # only s2 and the taps are read before the statistics
    out = _new_output(x, keep_layout=True)
    gate = x.new_empty((b * groups, h, w), dtype=torch.float32) if for_backward else None
    sums = ema_triton.apply(x, groups, g, shift(pooled, g, h), co.s2, p.gamma, p.beta,
                            co.taps.taps_mix.contiguous(), co.taps.const.reshape(1), eps, out, gate)
    return out, gate, pooled, edges, torch.stack([sums[0], sums[1]])


@ema_forward.register_fake
def _forward_fake(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps):
    b, ch, h, w = x.shape
    n, c = b * groups, ch // groups
    dtype = _compute_dtype(x)
    new = x.new_empty
    return (_new_output(x, keep_layout=False), new((n, h, w), dtype=dtype), new((n, c, h + w), dtype=dtype), new((n, c, 9), dtype=dtype),
            new((2, n, c), dtype=dtype))


@torch.library.custom_op('ema_hub::ema_backward', mutates_args=())
def ema_backward(dy: Tensor, x: Tensor, gate: Tensor, pooled: Tensor, edges: Tensor, sums: Tensor, w1: Tensor,
                 b1: Tensor, gamma: Tensor, beta: Tensor, w3: Tensor, b3: Tensor, tap_edges: Tensor, groups: int,
                 eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``ema_forward``'s output with respect to x and the six parameters, by hand: the
    full-size part in one pass per group (compiled, on the CPU in float32) or as PyTorch ops, then the
    parameter-only algebra."""
    dtype = gate.dtype
    p = Params(*(t.detach().to(dtype) for t in (w1, b1, gamma, beta, w3, b3)))
    edges_of_taps = tap_edges.to(dtype)
    gx = grouped(x, groups).to(dtype).contiguous()
    gdy = grouped(dy, groups).to(dtype).contiguous()
    n, c, h, w = gx.shape
    pixels = h * w
    co = coefficients(edges, sums[0], sums[1], p, edges_of_taps, eps, pixels)
    g = gates(pooled, p.w1, p.b1)  # recomputed: cheaper than keeping (n, c, H + W) per layer
    sh = shift(pooled, g, h)
    # The compiled backward on maps of every size: no slower than the PyTorch ops even on the smallest.
    if native.supports(gx, list(p)):
        dx, dk, dlogit, dbias, du, d_taps_mix = native.backward(gx, gdy, gate, g, sh.view(n, c), co, p)
    else:
        dx, dk, dlogit, dbias, du, d_taps_mix = eager.backward_full_size(gx, gdy, gate, g, sh, pooled, edges, co, p)
    grads = _parameter_grads(p, co, edges, pooled, edges_of_taps, pixels, dk, dlogit, dbias, du, d_taps_mix)
    return (dx.view(x.shape).to(x.dtype),) + tuple(d.to(t.dtype) for d, t in zip(grads, (w1, b1, gamma, beta, w3, b3)))


def _parameter_grads(p: Params, co: Coefficients, edges: Tensor, pooled: Tensor, edges_of_taps: Tensor, pixels: int,
                     dk: Tensor, dlogit: Tensor, dbias: Tensor, du: Tensor, d_taps_mix: Tensor) -> Params:
    """The parameters' gradients from the per-group ones: sums over the batch, and the parameter-only algebra."""
    n, c = dk.shape
    s1 = co.taps.s1
    dbias_c = dbias.unsqueeze(1)
    total = dbias.sum()
    ds1 = p.b3 * total + torch.matmul(p.w3.reshape(c, c * 9), d_taps_mix.t().reshape(c * 9))
    dtaps_e = torch.matmul(dlogit.t(), edges.reshape(n, c * 9)).view(c, c, 9) / pixels
    return Params(
        w1=torch.matmul(du, pooled.transpose(1, 2)).sum(0).view(p.w1.shape),
        b1=du.sum((0, 2)),
        gamma=(co.s2 * co.rstd * (dk - dbias_c * co.mu)).sum(0),
        beta=(dbias_c * co.s2).sum(0) + s1 * (ds1 - (s1 * ds1).sum()),
        w3=(torch.matmul(dtaps_e, edges_of_taps.t()) + s1.view(c, 1, 1) * d_taps_mix.t().unsqueeze(0)).view(p.w3.shape),
        b3=dlogit.sum(0) + s1 * total,
    )


@ema_backward.register_fake
def _backward_fake(dy, x, gate, pooled, edges, sums, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps):
    # Contiguous, whatever the inputs' layouts (a channels_last x under compile, a channels_last model's conv3x3
    # weight): the kernels compute every gradient on contiguous buffers.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (x, w1, b1, gamma, beta, w3, b3))


def _setup_context(ctx, inputs, output) -> None:
    x, w1, b1, gamma, beta, w3, b3, tap_edges, groups, eps = inputs
    ctx.mark_non_differentiable(*output[1:])
    ctx.save_for_backward(x, *output[1:], w1, b1, gamma, beta, w3, b3, tap_edges)
    ctx.groups, ctx.eps = groups, eps


def _backward(ctx, dout: Tensor, *_unused: Optional[Tensor]):
    x, gate, pooled, edges, sums, w1, b1, gamma, beta, w3, b3, tap_edges = ctx.saved_tensors
    params = [w1, b1, gamma, beta, w3, b3]
    needs = ctx.needs_input_grad
    if torch.is_grad_enabled():  # create_graph=True: differentiate the plain-ops form, which autograd can
        wrt = [t for t, need in zip([x] + params, needs[:7]) if need]
        out, _ = ema_portable(x, ctx.groups, Params(*params), tap_edges, ctx.eps)
        grads = iter(torch.autograd.grad(out, wrt, dout, create_graph=True, allow_unused=True))
        return tuple(next(grads) if need else None for need in needs[:7]) + (None, None, None)
    grads = ema_backward(dout, x, gate, pooled, edges, sums, *params, tap_edges, ctx.groups, ctx.eps)
    return tuple(g if need else None for g, need in zip(grads, needs[:7])) + (None, None, None)


ema_forward.register_autograd(_backward, setup_context=_setup_context)


_LIB = torch.library.Library('ema_hub', 'FRAGMENT')  # custom_op's own autocast rule can only cast the inputs


def _autocast_passes_inputs(op) -> None:
    """The operators' autocast policy, the same on the CPU and CUDA and in eager, compiled and exported modes: they
    compute in float32 whatever their inputs' dtypes and return x's dtype (the gradients their inputs' dtypes), so
    autocast hands them their inputs as they are (casting x to float32 would add passes over it) and is off inside
    them (it would retype the float32 products of the PyTorch-ops path)."""
    for device in ('cpu', 'cuda'):
        key = getattr(torch._C.DispatchKey, 'Autocast' + torch._C._dispatch_key_for_device(device))

        def kernel(_keyset, *args, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op._opoverload(*args)
        _LIB.impl(op._name, kernel, key.name, with_keyset=True)


for _op in (ema, ema_forward, ema_backward):
    _autocast_passes_inputs(_op)
