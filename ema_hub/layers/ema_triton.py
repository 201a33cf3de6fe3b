"""EMA's GPU forward as two Triton kernels, one program per group (c channels of one sample).

As PyTorch ops, or as what torch.compile makes of them, the layer is many passes over the input with
batched matrix products of tiny inner sizes in between, several times resnet50's own compiled time on an
H200 (docs/performance.md has the figures). Here:

* ``pool``: row and column means and the nine edge sums per channel, one read of the input;
* PyTorch between them (``ops.forward_triton``): the gates, the shift and s2, small batched matrix products;
* ``apply``: the sums of a - shift and a^2, then k, the bias, the one-output 3x3 term and the output, per
  group, so the second read of the group comes from cache: one more read of the input and one write.

Any strides (channels_last included: nothing is copied into grouped layout), any float dtype in and out,
fp32 inside. Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors, which is how the tests check them
on machines without a GPU.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .algebra import Edge

__all__ = ['pool', 'apply']

# The edge sums' positions (algebra.Edge), as constants the kernels can read.
_TOTAL, _FIRST_ROW, _LAST_ROW, _FIRST_COL, _LAST_COL, _X00, _X0L, _XL0, _XLL = (tl.constexpr(int(e)) for e in Edge)

# Elements per tile (channels x rows x columns, each a power of two): a few rows of a group at a time.
_TILE = 1024


def _blocks(c: int, h: int, w: int) -> Tuple[int, int, int]:
    bc, bw = triton.next_power_of_2(c), triton.next_power_of_2(w)
    bh = max(1, min(triton.next_power_of_2(h), _TILE // (bc * bw)))
    return bc, bh, bw


@triton.jit
def _pool_kernel(x_ptr, pooled_ptr, edges_ptr, groups, c, H, W, sb, sc, sh, sw,
                 BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    pid = tl.program_id(0)
    base = x_ptr + (pid // groups).to(tl.int64) * sb + ((pid % groups) * c).to(tl.int64) * sc
    ci = tl.arange(0, BC)[:, None, None]
    hi = tl.arange(0, BH)[None, :, None]
    wi = tl.arange(0, BW)[None, None, :]
    c2 = tl.arange(0, BC)[:, None]
    h2 = tl.arange(0, BH)[None, :]
    w2 = tl.arange(0, BW)[None, :]
    c1 = tl.arange(0, BC)
    pooled = pooled_ptr + pid.to(tl.int64) * c * (H + W) + c2 * (H + W)
    cols = tl.zeros([BC, BW], tl.float32)
    first_row = tl.zeros([BC], tl.float32)
    last_row = tl.zeros([BC], tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + hi
        xt = tl.load(base + ci * sc + hh * sh + wi * sw, mask=(ci < c) & (hh < H) & (wi < W), other=0.)
        xt = xt.to(tl.float32)
        rows = tl.sum(xt, 2)
        tl.store(pooled + h0 + h2, rows / W, mask=(c2 < c) & (h0 + h2 < H))
        first_row += tl.sum(tl.where(h0 + h2 == 0, rows, 0.), 1)
        last_row += tl.sum(tl.where(h0 + h2 == H - 1, rows, 0.), 1)
        cols += tl.sum(xt, 1)
    tl.store(pooled + H + w2, cols / H, mask=(c2 < c) & (w2 < W))
    # The nine edge sums, at algebra.Edge's positions.
    cm = c1 < c
    edges = edges_ptr + pid.to(tl.int64) * c * 9 + c1 * 9
    tl.store(edges + _TOTAL, tl.sum(cols, 1), mask=cm)
    tl.store(edges + _FIRST_ROW, first_row, mask=cm)
    tl.store(edges + _LAST_ROW, last_row, mask=cm)
    tl.store(edges + _FIRST_COL, tl.sum(tl.where(w2 == 0, cols, 0.), 1), mask=cm)
    tl.store(edges + _LAST_COL, tl.sum(tl.where(w2 == W - 1, cols, 0.), 1), mask=cm)
    corner = base + c1 * sc
    tl.store(edges + _X00, tl.load(corner, mask=cm, other=0.).to(tl.float32), mask=cm)
    tl.store(edges + _X0L, tl.load(corner + (W - 1) * sw, mask=cm, other=0.).to(tl.float32), mask=cm)
    tl.store(edges + _XL0, tl.load(corner + (H - 1) * sh, mask=cm, other=0.).to(tl.float32), mask=cm)
    tl.store(edges + _XLL, tl.load(corner + (H - 1) * sh + (W - 1) * sw, mask=cm, other=0.).to(tl.float32), mask=cm)


@triton.jit
def _apply_kernel(x_ptr, out_ptr, gate_ptr, sums_ptr, gates_ptr, shift_ptr, s2_ptr, gamma_ptr, beta_ptr,
                  taps_ptr, const_ptr, eps, groups, c, H, W, sb, sc, sh, sw, ob, oc, oh, ow,
                  BC: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr, WRITE_GATE: tl.constexpr):
    pid = tl.program_id(0)
    b, g = pid // groups, pid % groups
    base = x_ptr + b.to(tl.int64) * sb + (g * c).to(tl.int64) * sc
    obase = out_ptr + b.to(tl.int64) * ob + (g * c).to(tl.int64) * oc
    ci = tl.arange(0, BC)[:, None, None]
    hi = tl.arange(0, BH)[None, :, None]
    wi = tl.arange(0, BW)[None, None, :]
    c1 = tl.arange(0, BC)
    cm = c1 < c
    gates = gates_ptr + pid.to(tl.int64) * c * (H + W) + ci * (H + W)
    gate_w = tl.load(gates + H + wi, mask=(ci < c) & (wi < W), other=0.)
    shift = tl.load(shift_ptr + pid.to(tl.int64) * c + ci, mask=ci < c, other=0.)

    # Sums of a - shift and of its square per channel (a = x * gate_h * gate_w).
    s_acc = tl.zeros([BC, BH, BW], tl.float32)
    q_acc = tl.zeros([BC, BH, BW], tl.float32)
    for h0 in range(0, H, BH):
        hh = h0 + hi
        m = (ci < c) & (hh < H) & (wi < W)
        xt = tl.load(base + ci * sc + hh * sh + wi * sw, mask=m, other=0.).to(tl.float32)
        gate_h = tl.load(gates + hh, mask=(ci < c) & (hh < H), other=0.)
        a = tl.where(m, xt * gate_h * gate_w - shift, 0.)
        s_acc += a
        q_acc += a * a
    s = tl.sum(tl.sum(s_acc, 2), 1)
    q = tl.sum(tl.sum(q_acc, 2), 1)
    sums = sums_ptr + pid.to(tl.int64) * c + c1
    tl.store(sums, s, mask=cm)
    tl.store(sums + tl.num_programs(0) * c, q, mask=cm)

    # s2 . gn(a) = k . (a - shift) + sum_o s2 (beta - gamma mu rstd), as algebra.coefficients.
    pixels = H * W
    mu = s / pixels
    rstd = tl.rsqrt(tl.maximum(q / pixels - mu * mu, 0.) + eps)
    s2 = tl.load(s2_ptr + pid.to(tl.int64) * c + c1, mask=cm, other=0.)
    gamma = tl.load(gamma_ptr + c1, mask=cm, other=0.)
    beta = tl.load(beta_ptr + c1, mask=cm, other=0.)
    k = (s2 * gamma * rstd)[:, None, None]
    bias = tl.sum(s2 * (beta - gamma * mu * rstd), 0) + tl.load(const_ptr)

    # cross = k . (a - shift) + bias + the one-output 3x3 correlation of x with taps (9, c); out = x * sigmoid(cross).
    for h0 in range(0, H, BH):
        hh = h0 + hi
        m = (ci < c) & (hh < H) & (wi < W)
        xt = tl.load(base + ci * sc + hh * sh + wi * sw, mask=m, other=0.).to(tl.float32)
        gate_h = tl.load(gates + hh, mask=(ci < c) & (hh < H), other=0.)
        cross = tl.sum(k * (xt * gate_h * gate_w - shift), 0) + bias
        for t in tl.static_range(9):
            taps = tl.load(taps_ptr + t * c + ci, mask=ci < c, other=0.)
            if t == 4:
                cross += tl.sum(taps * xt, 0)
            else:
                hs = hh + (t // 3 - 1)
                ws = wi + (t % 3 - 1)
                xs = tl.load(base + ci * sc + hs * sh + ws * sw,
                             mask=(ci < c) & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W), other=0.)
                cross += tl.sum(taps * xs.to(tl.float32), 0)
        gate = tl.sigmoid(cross)
        tl.store(obase + ci * oc + hh * oh + wi * ow, (xt * gate[None, :, :]).to(out_ptr.dtype.element_ty), mask=m)
        if WRITE_GATE:
            h2 = h0 + tl.arange(0, BH)[:, None]
            w2 = tl.arange(0, BW)[None, :]
            tl.store(gate_ptr + pid.to(tl.int64) * pixels + h2 * W + w2, gate, mask=(h2 < H) & (w2 < W))


def pool(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column means (n, c, H + W) and the edge sums (n, c, 9) of each group of x (B, C, H, W), fp32."""
    b, ch, h, w = x.shape
    n, c = b * groups, ch // groups
    pooled = torch.empty(n, c, h + w, device=x.device, dtype=torch.float32)
    edges = torch.empty(n, c, 9, device=x.device, dtype=torch.float32)
    bc, bh, bw = _blocks(c, h, w)
    _pool_kernel[(n,)](x, pooled, edges, groups, c, h, w, *x.stride(), BC=bc, BH=bh, BW=bw, num_warps=4)
    return pooled, edges


def apply(x: torch.Tensor, groups: int, gates: torch.Tensor, shift: torch.Tensor, s2: torch.Tensor,
          gamma: torch.Tensor, beta: torch.Tensor, taps: torch.Tensor, const: torch.Tensor, eps: float,
          out: torch.Tensor, gate: Optional[torch.Tensor]) -> torch.Tensor:
    """Writes EMA's output into ``out`` (x's shape, any strides) and, if given, sigmoid(cross) into ``gate``
    (n, H, W); returns the sums of a - shift and of its square (2, n, c).

    gates (n, c, H + W), shift and s2 (n, c), gamma and beta (c), taps (9, c) and const (one element) are
    contiguous fp32.
    """
    b, ch, h, w = x.shape
    n, c = b * groups, ch // groups
    sums = torch.empty(2, n, c, device=x.device, dtype=torch.float32)
    bc, bh, bw = _blocks(c, h, w)
    _apply_kernel[(n,)](x, out, gate if gate is not None else sums, sums, gates, shift, s2, gamma, beta, taps, const,
                        eps, groups, c, h, w, *x.stride(), *out.stride(),
                        BC=bc, BH=bh, BW=bw, WRITE_GATE=gate is not None, num_warps=4)
    return sums
