"""EMA as PyTorch ops: the forward and the backward's full-size part wherever no compiled kernel runs (other
devices and dtypes, no C compiler, ``EMA_HUB_NATIVE=0``), and the reference the kernels are tested against.

The forward writes a - shift and then the output into one buffer; the backward keeps only x and per-channel
/ per-pixel vectors (``Stats``) and computes every gradient in one full-size buffer, which becomes the input
gradient, plus chunk-sized temporaries (and, for maps of at most 256 pixels, the gate product).

Cost model (CPU): the layer is memory bound, a fresh full-size buffer costs page faults on first touch,
and some kernels are slow at these shapes (a one-output-channel conv2d through oneDNN, var_mean over H, W,
broadcasts along a short innermost axis, indexing backward that zero-fills a full-size gradient); each
choice below says which of these it avoids (the measurements are in docs/layer.md).
"""
import functools
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .algebra import Coefficients, Edge, Params, edge_sums, gates as gates_of, shift as shift_of

__all__ = ['forward', 'backward_full_size', 'pool']


def forward(gx: torch.Tensor, p: Params, out: torch.Tensor, coefficients_of) -> Tuple[torch.Tensor, ...]:
    """The forward on grouped ``gx`` (n, c, H, W), contiguous, into ``out`` (as many elements): returns the gate
    (n, H, W), the pooled means, the edge sums and the sums of a - shift and its square (2, n, c), as the
    compiled kernel does. ``coefficients_of(edges, sums)`` gives the ``Coefficients``."""
    n, c, h, w = gx.shape
    pooled, edges = pool(gx)
    g = gates_of(pooled, p.w1, p.b1)
    a = _gated(gx, g, shift_of(pooled, g, h), out.view(n, c, h, w))  # a - shift
    sums = torch.stack([a.sum((2, 3)), torch.linalg.vector_norm(a, dim=(2, 3)).square()])
    co: Coefficients = coefficients_of(edges, sums)
    cross = _gn_term(a, co.k, co.bias)
    _add_conv_chunked(cross, gx, co.taps.taps_mix)
    gate = torch.sigmoid_(cross)
    torch.mul(gx, gate.unsqueeze(1), out=a)
    return gate, pooled, edges, sums


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


# The largest temporaries (the (n, 9, P) tap maps, 9/c times x's size, and e = da * x) are made a chunk of
# the batch at a time, at most this many bytes, in one reused buffer: a fresh buffer of x's size costs page
# faults on first touch, and smaller chunks were slower, larger ones no faster.
_CHUNK_BYTES = 1 << 23


def _chunks(n: int, item_bytes: int) -> List[Tuple[int, int]]:
    """(start, stop) ranges over n items of ``item_bytes`` each, at most _CHUNK_BYTES per range."""
    step = max(1, _CHUNK_BYTES // max(item_bytes, 1))
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def _add_conv_chunked(cross: torch.Tensor, gx: torch.Tensor, taps_mix: torch.Tensor) -> None:
    """The cross logit's convolution term with the (n, 9, P) tap maps made a chunk at a time in one reused buffer."""
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
    """(H*W, H+W+9): x (., H*W) @ this = [row means, column means, the nine edge sums of ``algebra.edge_sums``]."""
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


def pool(gx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column means (n, c, H + W) for the gates and the edge sums (n, c, 9) for s2."""
    n, c, h, w = gx.shape
    if _small(gx):
        red = torch.mm(gx.reshape(n * c, h * w), _pool_matrix(h, w, gx.dtype, gx.device)).view(n, c, h + w + 9)
        return red[:, :, :h + w].contiguous(), red[:, :, h + w:].contiguous()  # two tensors, not views of one
    rows = torch.matmul(gx, gx.new_ones(w))  # a matrix-vector product: faster than sum(3) for short rows
    cols = gx.sum(2)
    corners = torch.index_select(gx.view(n * c, h * w), 1, _corner_index(h, w, gx.device)).view(n, c, 4)
    return torch.cat([rows / w, cols / h], 2), edge_sums(rows, cols, corners)


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
    """da * gate_h * gate_w + dy * gate plus the gradient through ``pool``, in da's buffer (n, c, H, W), for
    maps above 256 pixels (``_input_grad_small`` takes the others)."""
    n, c, h, w = da.shape
    # Row and column sums reach every pixel of their row / column; edges add to their row, column, corner.
    drows = dpooled[:, :, :h] / w + dedges[:, :, Edge.TOTAL:Edge.TOTAL + 1]
    dcols = dpooled[:, :, h:] / h
    drows[:, :, 0].add_(dedges[:, :, Edge.FIRST_ROW])
    drows[:, :, h - 1].add_(dedges[:, :, Edge.LAST_ROW])
    dcols[:, :, 0].add_(dedges[:, :, Edge.FIRST_COL])
    dcols[:, :, w - 1].add_(dedges[:, :, Edge.LAST_COL])
    # The column term rides on the multiply by gate_h (addcmul's broadcast input): one pass fewer.
    dx = torch.addcmul(dcols.unsqueeze(2), da.mul_(gw), gh, out=da).addcmul_(dy, gate).add_(drows.unsqueeze(3))
    for edge, r, col in ((Edge.X00, 0, 0), (Edge.X0L, 0, w - 1), (Edge.XL0, h - 1, 0), (Edge.XLL, h - 1, w - 1)):
        dx[:, :, r, col].add_(dedges[:, :, edge])
    return dx


def backward_full_size(gx, dy, gate, gates, shift, pooled, edges, co: Coefficients, p: Params):
    """The backward's full-size part as PyTorch ops (native.backward is the same in one pass per group): the
    input gradient and, per group, dk, dlogit (n, c), dbias (n), the gates' gradient du (n, c, H + W) and
    taps_mix's gradient summed over the batch (9, c)."""
    w1, gamma, beta = p.w1, p.gamma, p.beta
    k, taps_mix, mu, var, rstd, taps_e, s2 = co.k, co.taps.taps_mix, co.mu, co.var, co.rstd, co.taps.taps_e, co.s2
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

    # The per-channel algebra of algebra.coefficients, backwards (for each group).
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


