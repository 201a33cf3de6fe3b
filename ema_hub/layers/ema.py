""" EMA: Efficient Multi-Scale Attention with cross-spatial learning

Paper: `Efficient Multi-Scale Attention Module with Cross-Spatial Learning` - https://arxiv.org/abs/2305.13563
(Ouyang et al., ICASSP 2023).

This computes exactly the paper's function with far less work than its reference code. Per group
(channels folded into the batch, c = C/G channels each, P = H*W pixels):

* x1 = gn(a) with a = x * sigmoid(h-gate) * sigmoid(w-gate): the 1x1 branch, as in the paper.
* mean_HW(x1) is exactly gn.bias (a normalised channel has zero spatial mean), so s1 = softmax(gn.bias)
  does not depend on the input, and s1 . conv3x3(x) is one 3x3 convolution with a single output
  channel (weights sum_o s1[o] W[o]): the c-wide 3x3 convolution is never computed.
* mean_HW(conv3x3(x)) with zero padding only needs nine edge sums per channel (the total, the first and
  last rows and columns, the four corners): s2 comes from those, again without the convolution.
* s2 . gn(a) folds into one coefficient per channel on a plus a constant.

So the layer is a few memory-bound passes over x. Two forms of the same algebra:

* Eager (``_EMAFunction``): on the CPU in fp32 the forward is a compiled kernel that makes one pass per
  group (``native``, ema_forward.c); on CUDA two Triton kernels (``ema_triton``); elsewhere (and without a
  C compiler or Triton) PyTorch ops write a and then the output into one buffer. A hand-written backward
  (on the CPU in fp32 also compiled, ema_backward.c; else PyTorch ops)
  keeps only x and per-channel / per-pixel vectors (no full-size activation besides the input, where
  autograd would hold several) and computes every gradient in one full-size buffer, which becomes the input
  gradient, plus chunk-sized temporaries (and, for maps of at most 256 pixels, the gate product).
* Traceable (``ema_traceable``): plain differentiable ops, for TorchScript, FX, torch.compile/export,
  autocast and double backward. On CUDA, inference under autocast or torch.compile takes the Triton kernels
  instead (``_gpu_inference``): compiled, the traceable form is several times slower there.

Cost model (CPU): the layer is memory bound, a fresh full-size buffer costs page faults on first touch,
and some kernels are slow at these shapes (a one-output-channel conv2d through oneDNN, var_mean over H, W,
broadcasts along a short innermost axis, indexing backward that zero-fills a full-size gradient); each
choice below says which of these it avoids (the measurements are in the README, "Speed"). The straightforward form lives in ema_hub/reference.py (test oracle,
benchmark baseline); ``ema-hub benchmark`` times them side by side.
"""
import functools
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from . import native

# The GPU kernels need Triton (which PyTorch's CUDA builds bring); imported only where a GPU is present, and
# not with EMA_HUB_NATIVE=0 (read once, here).
ema_triton = None
if torch.cuda.is_available() and os.environ.get('EMA_HUB_NATIVE', '1') != '0':
    try:
        from . import ema_triton
    except ImportError:
        pass

__all__ = ['EMA', 'ema_groups', 'implementation']


def implementation(device: str) -> str:
    """Which kernels compute the eager fp32 forward (and backward) on ``device`` here, in words."""
    if device == 'cuda':
        return ('Triton kernels (ema_hub/layers/ema_triton.py)' if ema_triton is not None
                else 'PyTorch ops (Triton is missing or EMA_HUB_NATIVE=0)')
    return ('compiled kernels (ema_hub/layers/ema_forward.c, ema_backward.c)' if native.available()
            else 'PyTorch ops (the compiled kernels are off or did not build)')


def ema_groups(channels: int, factor: int) -> int:
    """Number of groups EMA splits ``channels`` into: the largest divisor of ``channels`` not above ``factor``.

    The paper uses G = factor and assumes it divides C. For channel counts it does not divide (MobileNetV2's
    144, say) this keeps groups as many and as small as the factor allows: 144 with factor 32 gives 24
    groups of 6 channels. Fewer channels than the factor gives one channel per group.
    """
    if channels < 1 or factor < 1:
        raise ValueError(f'EMA needs channels >= 1 and factor >= 1, got channels={channels}, factor={factor}')
    return max(g for g in range(1, min(channels, factor) + 1) if channels % g == 0)


def _tap_edges() -> torch.Tensor:
    """(9, 9) map from 3x3 kernel taps to the nine edge sums: sum_p conv3x3(x)[p] = sum_e E[e] (W @ this)[e].

    With zero padding, tap (i, j) sees the whole map minus the last row (i = 0) or the first (i = 2),
    minus the last column (j = 0) or the first (j = 2), plus the corner both removed. Edge sums are ordered
    [total, first row, last row, first column, last column, x00, x0l, xl0, xll] (``_edge_sums``).
    """
    m = torch.zeros(3, 3, 9)
    m[:, :, 0] = 1
    m[2, :, 1] = m[0, :, 2] = m[:, 2, 3] = m[:, 0, 4] = -1
    m[2, 2, 5] = m[2, 0, 6] = m[0, 2, 7] = m[0, 0, 8] = 1
    return m.reshape(9, 9)


# An FX leaf in timm's tracing (feature extraction, timm's FX tests): the traced graph then calls this module
# and so runs the same fast path as eager, bit for bit, in inference and training.
@register_notrace_module
class EMA(nn.Module):
    """ Efficient Multi-Scale Attention (Ouyang et al., ICASSP 2023, https://arxiv.org/abs/2305.13563)

    Args:
        channels: input (and output) channels.
        factor: the paper's group count G; see ``ema_groups`` for channel counts it does not divide.
    """

    def __init__(self, channels: int, factor: int = 32, device=None, dtype=None):
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.groups = ema_groups(channels, factor)
        c = channels // self.groups
        # Submodule names match the paper's code, so its checkpoints load one to one.
        self.gn = nn.GroupNorm(c, c, **dd)
        self.conv1x1 = nn.Conv2d(c, c, kernel_size=1, **dd)
        self.conv3x3 = nn.Conv2d(c, c, kernel_size=3, padding=1, **dd)
        # A constant, not state: follows .to() but stays out of the state dict.
        self.register_buffer('tap_edges', _tap_edges().to(**dd), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return self._forward_python(x)
        return ema_traceable(x, self.groups, self._params(), self.tap_edges, self.gn.eps)

    def _params(self) -> List[torch.Tensor]:
        return [self.conv1x1.weight, _bias(self.conv1x1.bias), self.gn.weight, self.gn.bias,
                self.conv3x3.weight, _bias(self.conv3x3.bias)]

    @torch.jit.unused
    def _forward_python(self, x: torch.Tensor) -> torch.Tensor:
        """Every form but TorchScript's: eager (hand-written backward), the GPU kernels for compiled or autocast
        inference on CUDA, else the traceable form."""
        params = self._params()
        if _runs_eagerly(x):
            if _needs_grad(x, params):
                return _EMAFunction.apply(x, self.groups, self.gn.eps, self.tap_edges, *params)
            return _forward_fast(x, self.groups, params, self.tap_edges, self.gn.eps, for_backward=False)[0]
        if _gpu_inference(x, params):
            return _forward_gpu(x, self.groups, params, self.tap_edges, self.gn.eps, False)[0]
        return ema_traceable(x, self.groups, params, self.tap_edges, self.gn.eps)


def _needs_grad(x: torch.Tensor, params: List[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))


def _runs_eagerly(x) -> bool:
    """Whether the hand-written path may run: a real tensor, no tracer, compiler or torch.func transform
    (vmap, grad: per-sample gradients) watching, no autocast."""
    if not isinstance(x, torch.Tensor):  # an FX proxy
        return False
    return not torch.compiler.is_compiling() and _unrecorded() and not torch.is_autocast_enabled(x.device.type)


def _gpu_inference(x, params: List[torch.Tensor]) -> bool:
    """Whether the Triton kernels take a forward that ``_runs_eagerly`` leaves to the traceable form (under
    torch.compile or autocast): no gradient wanted (the traceable form differentiates there), and outside
    torch.compile nothing that records PyTorch ops (``_unrecorded``)."""
    if not isinstance(x, torch.Tensor) or not _gpu_kernels(x) or _needs_grad(x, params):
        return False
    return torch.compiler.is_compiling() or _unrecorded()


def _unrecorded() -> bool:
    """No TorchScript trace, torch.export or torch.func transform records this call. Asked only outside
    torch.compile: inside it, PyTorch 2.11's is_exporting() reads True."""
    return not (torch.jit.is_tracing() or torch.compiler.is_exporting()
                or torch._C._are_functorch_transforms_active())  # what torch.autograd.Function itself consults


def _grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x.reshape(x.shape[0] * groups, x.shape[1] // groups, x.shape[2], x.shape[3])


# ---- the small per-group algebra, shared by both paths -------------------------------------------------

def _edge_sums(rows: torch.Tensor, cols: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(n, c, 9) edge sums from row sums (n, c, H), column sums (n, c, W), corners x00, x0l, xl0, xll (n, c, 4)."""
    h, w = rows.shape[2], cols.shape[2]
    return torch.cat([
        rows.sum(2, keepdim=True),
        rows[:, :, 0:1], rows[:, :, h - 1:h],  # first and last row (the same one when H = 1)
        cols[:, :, 0:1], cols[:, :, w - 1:w],
        corners,
    ], 2)


def _gates(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """sigmoid(conv1x1) of the pooled means (n, c, H + W): the h-gate then the w-gate along the last axis."""
    c = w1.shape[0]
    return torch.sigmoid(torch.matmul(w1.reshape(c, c), pooled) + b1.unsqueeze(1))


def _shift(pooled: torch.Tensor, gates: torch.Tensor, h: int) -> torch.Tensor:
    """A per-channel constant close to mean(a), subtracted from a (n, c, 1, 1).

    gn(a) does not change when a per-channel constant is subtracted from a, but the variance computed as
    E[a^2] - E[a]^2 cancels catastrophically in fp32 when |mean| >> std (and torch.var_mean, which does not,
    is many times slower here). mean_h(gate_h * row mean of x) * mean_w(gate_w)
    is within about a standard deviation of mean(a), which removes the cancellation at no extra pass.
    Detached: the function does not depend on it, so neither does its exact gradient.
    """
    shift = (gates[:, :, :h] * pooled[:, :, :h]).mean(2) * gates[:, :, h:].mean(2)
    return shift.detach().unsqueeze(2).unsqueeze(3)


def _coefficients(edges: torch.Tensor, s: torch.Tensor, q: torch.Tensor, params: List[torch.Tensor],
                  tap_edges: torch.Tensor, eps: float, pixels: int):
    """From the edge sums and the sums of a and a^2 per channel: cross = conv(x, taps_mix) + k . a + bias.

    Returns (k, bias, taps_mix) and what the hand-written backward needs (mu, var, rstd, taps_e, s2, s1).
    """
    gamma, beta = params[2], params[3]
    mu = s / pixels
    var = q / pixels - mu * mu
    rstd = torch.rsqrt(var.clamp_min(0.) + eps)
    taps_e, s1, taps_mix, const = _tap_weights(params, tap_edges)
    s2 = _softmax2(edges, taps_e, params[5], pixels)
    k = s2 * gamma * rstd
    bias = (s2 * (beta - gamma * mu * rstd)).sum(1) + const
    return k, bias, taps_mix, mu, var, rstd, taps_e, s2, s1


def _tap_weights(params: List[torch.Tensor], tap_edges: torch.Tensor):
    """What the 3x3 branch needs from the parameters alone: taps_e (out, in, edge), the 3x3 weights against
    the edge sums; s1 = softmax(gn.bias); taps_mix (tap, in), the weights of s1 . conv3x3; const = s1 . b3."""
    beta, w3, b3 = params[3], params[4], params[5]
    c = w3.shape[0]
    taps_e = torch.matmul(w3.reshape(c, c, 9), tap_edges)
    s1 = torch.softmax(beta, dim=0)
    taps_mix = torch.matmul(s1, w3.reshape(c, c * 9)).reshape(c, 9).t()
    return taps_e, s1, taps_mix, (s1 * b3).sum()


def _softmax2(edges: torch.Tensor, taps_e: torch.Tensor, b3: torch.Tensor, pixels: int) -> torch.Tensor:
    """s2 (n, c): the softmax of mean_HW(conv3x3(x)), from the edge sums (n, c, 9)."""
    n, c = edges.shape[0], edges.shape[1]
    return torch.softmax(torch.matmul(edges.reshape(n, c * 9), taps_e.reshape(c, c * 9).t()) / pixels + b3, dim=1)


def _cross(gx: torch.Tensor, a: torch.Tensor, k: torch.Tensor, bias: torch.Tensor,
           taps_mix: torch.Tensor) -> torch.Tensor:
    """The attention logits per pixel (n, H, W): s2 . gn(a) + s1 . conv3x3(x), folded."""
    n, c, h, w = a.shape[0], a.shape[1], a.shape[2], a.shape[3]
    cross = _gn_term(a, k, bias)
    _add_shifted_taps(cross, torch.matmul(taps_mix, gx.reshape(n, c, h * w)).reshape(n, 3, 3, h, w))
    return cross


def _gn_term(a: torch.Tensor, k: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """s2 . gn(a) = k . a + bias (n, H, W): one matmul that adds the constant, into which the conv is added."""
    n, c, h, w = a.shape[0], a.shape[1], a.shape[2], a.shape[3]
    return torch.baddbmm(bias.reshape(n, 1, 1), k.unsqueeze(1), a.reshape(n, c, h * w)).reshape(n, h, w)


def _add_shifted_taps(out: torch.Tensor, z: torch.Tensor) -> None:
    """Adds a zero-padded 3x3 correlation from its per-tap maps: out[p, q] += sum_ij z[i, j, p + i - 1, q + j - 1].

    z is (n, 3, 3, H, W), out (n, H, W); each tap map is added in place where it lands inside the map, which
    is s1 . conv3x3(x) with s1 folded into the taps (a (9, c) matmul makes z): a one-output-channel conv2d is
    several times slower through oneDNN on CPU.
    """
    h, w = z.shape[3], z.shape[4]
    rows = z.unbind(1)
    for i in range(3):
        taps = rows[i].unbind(1)
        r0, r1 = max(0, 1 - i), h - max(0, i - 1)  # rows p with p + i - 1 inside the map
        for j in range(3):
            c0, c1 = max(0, 1 - j), w - max(0, j - 1)
            out[:, r0:r1, c0:c1].add_(taps[j][:, r0 + i - 1:r1 + i - 1, c0 + j - 1:c1 + j - 1])


# ---- the differentiable form: TorchScript, FX, compile/export, autocast, double backward ------------------

def ema_traceable(x: torch.Tensor, groups: int, params: List[torch.Tensor], tap_edges: torch.Tensor,
                  eps: float) -> torch.Tensor:
    """EMA as plain differentiable tensor ops (what tracers and compilers see)."""
    gx = _grouped(x, groups)
    n, c, h, w = gx.shape[0], gx.shape[1], gx.shape[2], gx.shape[3]
    # Row sums plus the first and last column in one matmul against [1, e_0, e_{W-1}]: its backward is one
    # dense matmul, whereas indexing gx directly makes autograd zero-fill and scatter a full-size tensor per
    # index. (Built from ones_like/pad so that FX and export trace it with a symbolic W.)
    first = F.pad(torch.ones_like(gx[0, 0, 0, :1]), (0, w - 1))
    rs = torch.matmul(gx, torch.stack([torch.ones_like(gx[0, 0, 0]), first, first.flip(0)], 1))
    rows, cols = rs[:, :, :, 0], gx.sum(2)
    corners = torch.cat([rs[:, :, :1, 1:], rs[:, :, h - 1:h, 1:]], 2).reshape(n, c, 4)
    pooled = torch.cat([rows / w, cols / h], 2)
    gates = _gates(pooled, params[0], params[1])
    # a - shift = x * gate_h * gate_w - shift as a product and a fused multiply-add (one full-size buffer).
    a = torch.addcmul(-_shift(pooled, gates, h), gx * gates[:, :, :h].unsqueeze(3), gates[:, :, h:].unsqueeze(2))
    # sum a^2 as a squared vector_norm (torch.var_mean over a spatial axis is much slower on CPU).
    s, q = a.sum((2, 3)), torch.linalg.vector_norm(a, dim=(2, 3)).square()
    k, bias, taps_mix = _coefficients(_edge_sums(rows, cols, corners), s, q, params, tap_edges, eps, h * w)[:3]
    return (gx * torch.sigmoid(_cross(gx, a, k, bias, taps_mix)).unsqueeze(1)).reshape(x.shape)


# ---- the eager fast path: forward into one buffer, hand-written backward ----------------------------------

def _forward_fast(x: torch.Tensor, groups: int, params: List[torch.Tensor], tap_edges: torch.Tensor, eps: float,
                  for_backward: bool = True):
    """Forward without autograd: the output and the small tensors the backward needs (the last, the
    coefficients, is None without ``for_backward``: the compiled kernel makes its own).

    On the CPU in fp32 the compiled kernel runs it (``native``), on CUDA the Triton kernels
    (``_forward_gpu``); otherwise PyTorch ops, where the output buffer first holds a, then the output: one
    full-size allocation.
    """
    if _gpu_kernels(x):
        out, gate, pooled, edges, s, q = _forward_gpu(x, groups, params, tap_edges, eps, for_backward)
        if not for_backward:
            return out, gate, pooled, edges, None
        # The backward runs in x's dtype, as it does after the PyTorch ops.
        gate, pooled, edges, s, q = (t.to(x.dtype) for t in (gate, pooled, edges, s, q))
        return out, gate, pooled, edges, _coefficients(edges, s, q, params, tap_edges, eps, x.shape[2] * x.shape[3])
    gx = _grouped(x, groups).contiguous()
    n, c, h, w = gx.shape
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if native.supports(gx, params):
        gate, pooled, edges, s, q = native.forward(gx, params, eps, out)
        coef = _coefficients(edges, s, q, params, tap_edges, eps, h * w) if for_backward else None
        return out, gate, pooled, edges, coef
    pooled, edges = _pool(gx)
    gates = _gates(pooled, params[0], params[1])
    a = _gated(gx, gates, _shift(pooled, gates, h), out.view(n, c, h, w))  # a - shift
    s, q = a.sum((2, 3)), torch.linalg.vector_norm(a, dim=(2, 3)).square()
    coef = _coefficients(edges, s, q, params, tap_edges, eps, h * w)
    k, bias, taps_mix = coef[:3]
    cross = _gn_term(a, k, bias)
    _add_conv_chunked(cross, gx, taps_mix)
    gate = torch.sigmoid_(cross)
    torch.mul(gx, gate.unsqueeze(1), out=a)
    return out, gate, pooled, edges, coef


def _gpu_kernels(x: torch.Tensor) -> bool:
    """Whether ``_forward_gpu`` runs: a CUDA tensor, the Triton kernels imported."""
    return x.is_cuda and ema_triton is not None


def _forward_gpu(x: torch.Tensor, groups: int, params: List[torch.Tensor], tap_edges: torch.Tensor, eps: float,
                 for_backward: bool):
    """``_forward_fast`` as two Triton kernels (``ema_triton``) around the small per-group algebra, in fp32
    whatever x's dtype (autocast included). x keeps its strides: channels_last input is read in place.

    Returns the output, the gate (n, H, W; None without ``for_backward``), the pooled means, the edge sums and
    the sums of a - shift and of its square (n, c each).
    """
    b, _, h, w = x.shape
    with torch.autocast(x.device.type, enabled=False):
        w1, b1, gamma, beta, w3, b3 = (p.detach().float() for p in params)
        pooled, edges = ema_triton.pool(x, groups)
        gates = _gates(pooled, w1, b1)
        taps_e, _, taps_mix, const = _tap_weights([w1, b1, gamma, beta, w3, b3], tap_edges.float())
        s2 = _softmax2(edges, taps_e, b3, h * w)
        out = torch.empty_like(x)
        gate = x.new_empty((b * groups, h, w), dtype=torch.float32) if for_backward else None
        sums = ema_triton.apply(x, groups, gates, _shift(pooled, gates, h), s2, gamma, beta, taps_mix.contiguous(),
                                const.reshape(1), eps, out, gate)
    return out, gate, pooled, edges, sums[0], sums[1]


# The largest temporaries (the (n, 9, P) tap maps, 9/c times x's size, and e = da * x) are made a chunk of
# the batch at a time, at most this many bytes, in one reused buffer: a fresh buffer of x's size costs page
# faults on first touch, and smaller chunks were slower, larger ones no faster.
_CHUNK_BYTES = 1 << 23


def _chunks(n: int, item_bytes: int) -> List[Tuple[int, int]]:
    """(start, stop) ranges over n items of ``item_bytes`` each, at most _CHUNK_BYTES per range."""
    step = max(1, _CHUNK_BYTES // max(item_bytes, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _add_conv_chunked(cross: torch.Tensor, gx: torch.Tensor, taps_mix: torch.Tensor) -> None:
    """``_cross``'s convolution term with the (n, 9, P) tap maps made a chunk at a time in one reused buffer."""
    n, c, h, w = gx.shape
    chunks = _chunks(n, 9 * h * w * gx.element_size())
    z = gx.new_empty(chunks[0][1], 9, h * w)
    for i, j in chunks:
        zc = torch.bmm(taps_mix.expand(j - i, 9, c), gx[i:j].view(j - i, c, h * w), out=z[:j - i])
        _add_shifted_taps(cross[i:j], zc.view(j - i, 3, 3, h, w))


def _gated(gx: torch.Tensor, gates: torch.Tensor, shift: torch.Tensor, out: torch.Tensor,
           product: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a - shift = gx * gate_h * gate_w - shift, written into ``out`` (n, c, H, W).

    Products with a gate broadcast along a short innermost axis are slow (a multiply by gate_h at 7x7 takes
    as long as three contiguous passes), so small maps use the gate product gate_h x gate_w (``_gate_product``,
    one such broadcast instead of two; the backward passes the one it keeps) and one contiguous pass for the
    rest.
    """
    h = gx.shape[2]
    if _small(gx):
        # One fused pass instead of a multiply and a subtraction.
        return torch.addcmul(-shift, _gate_product(gates, h, out) if product is None else product, gx, out=out)
    return torch.addcmul(-shift, torch.mul(gx, gates[:, :, :h].unsqueeze(3), out=out), gates[:, :, h:].unsqueeze(2),
                         out=out)


def _gate_product(gates: torch.Tensor, h: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """gate_h x gate_w (n, c, H, W) from the gates (n, c, H + W)."""
    return torch.mul(gates[:, :, :h].unsqueeze(3), gates[:, :, h:].unsqueeze(2), out=out)


# Maps of up to this many pixels are "small": pooling and edge sums are one matmul against a constant
# (P, H+W+9) matrix (faster than separate reductions on small maps; above it the matrix grows as P^1.5 and
# the reductions win), and the gating goes through the gate product (``_gated``), as do the backward's
# gate gradients.
_SMALL_MAP_PIXELS = 256


def _small(gx: torch.Tensor) -> bool:
    return gx.shape[2] * gx.shape[3] <= _SMALL_MAP_PIXELS


@functools.lru_cache(maxsize=64)
def _row_col_matrix(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H*W, H+W) indicator: x (., H*W) @ this = [row sums, column sums]."""
    p = torch.arange(h * w)
    m = torch.zeros(h * w, h + w, dtype=torch.float64)
    m[p, p // w] = 1
    m[p, h + p % w] = 1
    return m.to(dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _pool_matrix(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(H*W, H+W+9): x (., H*W) @ this = [row means, column means, the nine edge sums of ``_edge_sums``]."""
    p = torch.arange(h * w)
    row, col = p // w, p % w
    m = torch.zeros(h * w, h + w + 9, dtype=torch.float64)
    e = h + w
    m[:, :e] = _row_col_matrix(h, w, torch.float64, torch.device('cpu'))
    m[:, :h] /= w
    m[:, h:e] /= h
    m[:, e] = 1
    m[:, e + 1] = (row == 0).double()
    m[:, e + 2] = (row == h - 1).double()
    m[:, e + 3] = (col == 0).double()
    m[:, e + 4] = (col == w - 1).double()
    for i, (r, k) in enumerate(((0, 0), (0, w - 1), (h - 1, 0), (h - 1, w - 1))):
        m[r * w + k, e + 5 + i] = 1
    return m.to(dtype=dtype, device=device)


def _pool(gx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column means (n, c, H + W) for the gates and the edge sums (n, c, 9) for s2."""
    n, c, h, w = gx.shape
    if _small(gx):
        red = torch.mm(gx.reshape(n * c, h * w), _pool_matrix(h, w, gx.dtype, gx.device)).view(n, c, h + w + 9)
        return red[:, :, :h + w], red[:, :, h + w:]
    rows = torch.matmul(gx, gx.new_ones(w))  # a matrix-vector product: faster than sum(3) for short rows
    cols = gx.sum(2)
    corners = torch.index_select(gx.view(n * c, h * w), 1, _corner_index(h, w, gx.device)).view(n, c, 4)
    return torch.cat([rows / w, cols / h], 2), _edge_sums(rows, cols, corners)


@functools.lru_cache(maxsize=64)
def _corner_index(h: int, w: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([0, w - 1, (h - 1) * w, h * w - 1], device=device)


def _input_grad_small(da_gated: torch.Tensor, dy: torch.Tensor, gate: torch.Tensor, dpooled: torch.Tensor,
                      dedges: torch.Tensor) -> torch.Tensor:
    """``_input_grad`` for small maps, from da * gate_h * gate_w, in its buffer: the pooling is one matmul."""
    n, c, h, w = da_gated.shape
    dx = da_gated.addcmul_(dy, gate)
    d = torch.cat([dpooled, dedges], 2).view(n * c, h + w + 9)
    return dx.view(n * c, h * w).addmm_(d, _pool_matrix(h, w, dx.dtype, dx.device).t()).view(n, c, h, w)


def _input_grad(da: torch.Tensor, gh: torch.Tensor, gw: torch.Tensor, dy: torch.Tensor, gate: torch.Tensor,
                dpooled: torch.Tensor, dedges: torch.Tensor) -> torch.Tensor:
    """da * gate_h * gate_w + dy * gate plus the gradient through ``_pool``, in da's buffer (n, c, H, W), for
    maps above 256 pixels (``_input_grad_small`` takes the others)."""
    n, c, h, w = da.shape
    # Row and column sums reach every pixel of their row / column; edges add to their row, column, corner.
    drows = dpooled[:, :, :h] / w + dedges[:, :, :1]
    dcols = dpooled[:, :, h:] / h
    drows[:, :, 0].add_(dedges[:, :, 1])
    drows[:, :, h - 1].add_(dedges[:, :, 2])
    dcols[:, :, 0].add_(dedges[:, :, 3])
    dcols[:, :, w - 1].add_(dedges[:, :, 4])
    # The column term rides on the multiply by gate_h (addcmul's broadcast input): one pass fewer.
    dx = torch.addcmul(dcols.unsqueeze(2), da.mul_(gw), gh, out=da).addcmul_(dy, gate).add_(drows.unsqueeze(3))
    dcorner = dedges[:, :, 5:].view(n, c, 2, 2)
    for i, r in enumerate((0, h - 1)):
        for j, col in enumerate((0, w - 1)):
            dx[:, :, r, col].add_(dcorner[:, :, i, j])
    return dx


class _EMAFunction(torch.autograd.Function):
    """EMA with a hand-written backward: saves x and small tensors only, recomputes a."""

    @staticmethod
    def forward(ctx, x, groups, eps, tap_edges, *params):
        out, gate, pooled, edges, coef = _forward_fast(x, groups, list(params), tap_edges, eps)
        ctx.save_for_backward(x, gate, pooled, edges, tap_edges, *coef, *params)
        ctx.groups, ctx.eps = groups, eps
        return out

    @staticmethod
    def backward(ctx, dy):  # the algebra of _forward_fast and _coefficients, differentiated by hand
        x, gate, pooled, edges, tap_edges, k, bias, taps_mix, mu, var, rstd, taps_e, s2, s1, *params = \
            ctx.saved_tensors
        w1, b1, _, _, w3, b3 = params
        if torch.is_grad_enabled():  # create_graph=True: differentiate the traceable form instead
            needs = ctx.needs_input_grad
            wrt = [t for t, need in zip([x, *params], needs[:1] + needs[4:]) if need]
            grads = iter(torch.autograd.grad(ema_traceable(x, ctx.groups, params, tap_edges, ctx.eps), wrt, dy,
                                             create_graph=True, allow_unused=True))
            return tuple(next(grads) if need else None for need in needs)
        gx, dy = _grouped(x, ctx.groups).contiguous(), _grouped(dy, ctx.groups)
        n, c, h, w = gx.shape
        pixels = h * w
        gates = _gates(pooled, w1, b1)  # recomputed: cheaper than keeping (n, c, H + W) per layer
        shift = _shift(pooled, gates, h)
        # The compiled backward on maps of every size: no slower than the PyTorch ops even on the smallest.
        if native.supports(gx, params) and dy.dtype == torch.float32:
            dx, dk, dlogit, dbias, du, d_taps_mix = native.backward(
                gx, dy.contiguous(), gate, gates, shift.view(n, c), [k, mu, var, rstd, s2], params, taps_e, taps_mix)
        else:
            dx, dk, dlogit, dbias, du, d_taps_mix = _backward_full_size(
                gx, dy, gate, gates, shift, pooled, edges, k, taps_mix, mu, var, rstd, taps_e, s2, params)

        # The parameters' gradients: sums over the batch of per-group terms, and the parameter-only algebra.
        dbias_c = dbias.unsqueeze(1)
        dgamma = (s2 * rstd * (dk - dbias_c * mu)).sum(0)
        total = dbias.sum()
        db3 = dlogit.sum(0) + s1 * total
        dtaps_e = torch.matmul(dlogit.t(), edges.reshape(n, c * 9)).view(c, c, 9) / pixels
        dw1 = torch.matmul(du, pooled.transpose(1, 2)).sum(0).view(w1.shape)
        db1 = du.sum((0, 2))
        ds1 = b3 * total + torch.matmul(w3.reshape(c, c * 9), d_taps_mix.t().reshape(c * 9))
        dbeta = (dbias_c * s2).sum(0) + s1 * (ds1 - (s1 * ds1).sum())
        dw3 = (torch.matmul(dtaps_e, tap_edges.t()) + s1.view(c, 1, 1) * d_taps_mix.t().unsqueeze(0)).view(w3.shape)
        return dx.view(x.shape), None, None, None, dw1, db1, dgamma, dbeta, dw3, db3


def _backward_full_size(gx, dy, gate, gates, shift, pooled, edges, k, taps_mix, mu, var, rstd, taps_e, s2, params):
    """The backward's full-size part as PyTorch ops (native.backward is the same in one pass per group): the
    input gradient and, per group, dk, dlogit (n, c), dbias (n), the gates' gradient du (n, c, H + W) and
    taps_mix's gradient summed over the batch (9, c)."""
    w1, gamma, beta = params[0], params[2], params[3]
    n, c, h, w = gx.shape
    pixels = h * w
    gh, gw = gates[:, :, :h].unsqueeze(3), gates[:, :, h:].unsqueeze(2)

    # d cross = sum_c dy * x * sigmoid'(cross); then a - shift is recomputed into the same buffer, which
    # later holds da and finally the input gradient: the one full-size allocation of the backward (besides,
    # for small maps, the gate product).
    buf = torch.mul(dy, gx)
    # The channel sum as a matmul with ones: faster than sum(1).
    g = torch.bmm(buf.new_ones(1, 1, c).expand(n, 1, c), buf.view(n, c, pixels)).view(n, h, w)
    g.mul_(gate * (1 - gate))
    small = _small(gx)
    product = _gate_product(gates, h) if small else None  # small maps keep it: da and e are multiplied by it
    a = _gated(gx, gates, shift, buf, product)
    # As g^T a^T: faster than the matrix-vector product a g at these shapes.
    dk = torch.bmm(g.view(n, 1, pixels), a.view(n, c, pixels).transpose(1, 2)).view(n, c)
    dbias = g.sum((1, 2))

    # The per-channel algebra of _coefficients, backwards (for each group).
    dbias_c = dbias.unsqueeze(1)
    ds2 = dk * gamma * rstd + dbias_c * (beta - gamma * mu * rstd)
    drstd = s2 * gamma * (dk - dbias_c * mu)
    dmu = -dbias_c * s2 * gamma * rstd
    dlogit = s2 * (ds2 - (s2 * ds2).sum(1, keepdim=True))
    dedges = torch.matmul(dlogit, taps_e.reshape(c, c * 9)).view(n, c, 9) / pixels
    dvar = (-0.5 * drstd * rstd ** 3) * (var >= 0)
    dq = dvar / pixels
    ds = (dmu - 2 * mu * dvar) / pixels

    # da = 2 dq a + k g + ds, in place: three in-place passes are faster than one out-of-place addcmul with
    # two per-channel broadcasts. The gates' gradients are sums of e = da * x along
    # rows (weighted by gate_w) and columns (by gate_h).
    da = a.mul_((2 * dq).view(n, c, 1, 1)).addcmul_(k.view(n, c, 1, 1), g.view(n, 1, h, w))
    da.add_(ds.view(n, c, 1, 1))
    if small:
        # Through the gate product: du = (row and column sums of e * gate_h * gate_w) * (1 - gates), one
        # matmul, with no broadcast along a short row; da * the product is the input gradient's main term.
        da = da.mul_(product)
        e = torch.mul(da, gx, out=product)
        du = torch.mm(e.view(n * c, pixels), _row_col_matrix(h, w, e.dtype, e.device)).view(n, c, h + w)
        du.mul_(1 - gates)
    else:  # e is needed only for those sums, so it is made a chunk at a time.
        dgh, dgw = gx.new_empty(n, c, 1, h), gx.new_empty(n, c, 1, w)
        chunks = _chunks(n, c * pixels * gx.element_size())
        e = gx.new_empty((chunks[0][1],) + gx.shape[1:])
        for i, j in chunks:  # (matmul's out= must be contiguous: a strided one falls back to a slow loop)
            ec = torch.mul(da[i:j], gx[i:j], out=e[:j - i])
            # Both as a row vector times a matrix: for the row sums, gw^T e^T is faster than e gw.
            torch.matmul(gw[i:j], ec.transpose(2, 3), out=dgh[i:j])
            torch.matmul(gh[i:j].transpose(2, 3), ec, out=dgw[i:j])
        du = torch.cat([dgh.view(n, c, h), dgw.view(n, c, w)], 2).mul_(gates * (1 - gates))

    # The input gradient, in da's buffer: da * gate_h * gate_w + dy * sigmoid(cross), the pooling, and the
    # one-output conv's transpose (each tap map's gradient is g shifted back, made a chunk at a time).
    dpooled = torch.matmul(w1.reshape(c, c).t(), du)
    if small:
        dx = _input_grad_small(da, dy, gate.unsqueeze(1), dpooled, dedges)
    else:
        dx = _input_grad(da, gh, gw, dy, gate.unsqueeze(1), dpooled, dedges)
    gp = F.pad(g, (1, 1, 1, 1))
    chunks = _chunks(n, 9 * pixels * gx.element_size())
    dz = gx.new_empty(chunks[0][1], 9, pixels)
    d_taps_mix = gx.new_zeros(9, c)
    for i, j in chunks:
        # (Stacked as (m, 9, H, W) views: reshaping each shifted window first would copy it twice.)
        dzc = torch.stack([gp[i:j, 2 - r:2 - r + h, 2 - q:2 - q + w] for r in range(3) for q in range(3)], 1,
                          out=dz[:j - i].view(j - i, 9, h, w)).view(j - i, 9, pixels)
        d_taps_mix += torch.matmul(dzc, gx[i:j].view(j - i, c, pixels).transpose(1, 2)).sum(0)
        dx[i:j].view(j - i, c, pixels).baddbmm_(taps_mix.t().expand(j - i, c, 9), dzc)
    return dx, dk, dlogit, dbias, du, d_taps_mix


def _bias(bias: Optional[torch.Tensor]) -> torch.Tensor:
    assert bias is not None  # both convolutions are built with bias=True; TorchScript needs the refinement
    return bias
