"""EMA's exact algebra per group, and the layer as plain differentiable ops (``ema_portable``).

Per group (channels folded into the batch, c = C/G channels each, P = H*W pixels):

* x1 = gn(a) with a = x * sigmoid(h-gate) * sigmoid(w-gate): the 1x1 branch, as in the paper.
* mean_HW(x1) is exactly gn.bias (a normalised channel has zero spatial mean), so s1 = softmax(gn.bias)
  does not depend on the input, and s1 . conv3x3(x) is one 3x3 convolution with a single output
  channel (weights sum_o s1[o] W[o]): the c-wide 3x3 convolution is never computed.
* mean_HW(conv3x3(x)) with zero padding only needs nine edge sums per channel (the total, the first and
  last rows and columns, the four corners): s2 comes from those, again without the convolution.
* s2 . gn(a) folds into one coefficient per channel on a plus a constant: cross = k . a + bias + the
  one-output convolution, and out = x * sigmoid(cross).

Every form of the layer (the CPU and CUDA kernels, the PyTorch-ops fallback, ``ema_portable``) shares the
small per-channel algebra below.
"""
from enum import IntEnum
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

__all__ = ['Edge', 'Params', 'TapWeights', 'Coefficients', 'Stats', 'tap_edges', 'edge_taps', 'grouped', 'edge_sums',
           'gates', 'shift', 'tap_weights', 'softmax2', 'coefficients', 'ema_portable']


class Edge(IntEnum):
    """The nine edge sums of a channel, in the order every form of the layer stores them: ``edge_sums`` writes
    them so, and the C and Triton kernels get these positions from here (``native`` passes them to the compiler
    as ``EDGE_<NAME>``; ``ema_triton`` reads them as constants)."""
    TOTAL = 0
    FIRST_ROW = 1
    LAST_ROW = 2
    FIRST_COL = 3
    LAST_COL = 4
    X00 = 5  # the corners: first row's first and last pixel, last row's first and last
    X0L = 6
    XL0 = 7
    XLL = 8


class Params(NamedTuple):
    """The layer's parameters: conv1x1 (w1, b1), gn (gamma, beta), conv3x3 (w3, b3)."""
    w1: torch.Tensor
    b1: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    w3: torch.Tensor
    b3: torch.Tensor


class TapWeights(NamedTuple):
    """What the 3x3 branch needs from the parameters alone."""
    taps_e: torch.Tensor    # (out, in, edge): the 3x3 weights against the nine edge sums
    s1: torch.Tensor        # (c,): softmax(gn.bias)
    taps_mix: torch.Tensor  # (tap, in): the weights of s1 . conv3x3, a one-output 3x3 convolution
    const: torch.Tensor     # (): s1 . conv3x3.bias


class Coefficients(NamedTuple):
    """cross = conv(x, taps_mix) + k . a + bias, and what the backward needs besides (per group and channel)."""
    k: torch.Tensor         # (n, c)
    bias: torch.Tensor      # (n,)
    mu: torch.Tensor        # (n, c): mean of a - shift
    var: torch.Tensor       # (n, c)
    rstd: torch.Tensor      # (n, c)
    s2: torch.Tensor        # (n, c): softmax of mean_HW(conv3x3(x))
    taps: TapWeights


class Stats(NamedTuple):
    """What a forward pass keeps for the backward, besides the input (float32 for half-precision input)."""
    gate: torch.Tensor      # (n, H, W): sigmoid(cross)
    pooled: torch.Tensor    # (n, c, H + W): row means, then column means
    edges: torch.Tensor     # (n, c, 9): the nine edge sums (``edge_sums``)
    sums: torch.Tensor      # (2, n, c): the sums of a - shift and of its square


def tap_edges() -> torch.Tensor:
    """(9, 9) map from 3x3 kernel taps to the nine edge sums (``Edge``): sum_p conv3x3(x)[p] = sum_e E[e] (W @ this)[e].

    With zero padding, tap (i, j) sees the whole map minus the last row (i = 0) or the first (i = 2),
    minus the last column (j = 0) or the first (j = 2), plus the corner both removed.
    """
    m = torch.zeros(3, 3, len(Edge))
    m[:, :, Edge.TOTAL] = 1
    m[2, :, Edge.FIRST_ROW] = m[0, :, Edge.LAST_ROW] = m[:, 2, Edge.FIRST_COL] = m[:, 0, Edge.LAST_COL] = -1
    m[2, 2, Edge.X00] = m[2, 0, Edge.X0L] = m[0, 2, Edge.XL0] = m[0, 0, Edge.XLL] = 1
    return m.reshape(9, len(Edge))


def edge_taps(w3: torch.Tensor, edges_of_taps: torch.Tensor) -> torch.Tensor:
    """conv3x3's weights (out, in, 3, 3) against the nine edge sums (out, in, edge), through ``tap_edges``."""
    c = w3.shape[0]
    return torch.matmul(w3.reshape(c, c, 9), edges_of_taps)


def grouped(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * G, C / G, H, W): the groups folded into the batch."""
    return x.reshape(x.shape[0] * groups, x.shape[1] // groups, x.shape[2], x.shape[3])


def edge_sums(rows: torch.Tensor, cols: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(n, c, 9) edge sums in ``Edge``'s order from row sums (n, c, H), column sums (n, c, W), corners x00, x0l,
    xl0, xll (n, c, 4). TorchScript compiles this (``ema_portable``), so the order is written out."""
    h, w = rows.shape[2], cols.shape[2]
    return torch.cat([  # (narrow, not [-1:]: with a symbolic size, export could not prove a negative slice valid)
        rows.sum(2, keepdim=True),
        rows.narrow(2, 0, 1), rows.narrow(2, h - 1, 1),  # first and last row (the same one when H = 1)
        cols.narrow(2, 0, 1), cols.narrow(2, w - 1, 1),
        corners,
    ], 2)


def gates(pooled: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor) -> torch.Tensor:
    """sigmoid(conv1x1) of the pooled means (n, c, H + W): the h-gate then the w-gate along the last axis."""
    c = w1.shape[0]
    return torch.sigmoid(torch.matmul(w1.reshape(c, c), pooled) + b1.unsqueeze(1))


def shift(pooled: torch.Tensor, gates_: torch.Tensor, h: int) -> torch.Tensor:
    """A per-channel constant close to mean(a), subtracted from a (n, c, 1, 1).

    gn(a) does not change when a per-channel constant is subtracted from a, but the variance computed as
    E[a^2] - E[a]^2 cancels catastrophically in fp32 when |mean| >> std (and torch.var_mean, which does not,
    is many times slower here). mean_h(gate_h * row mean of x) * mean_w(gate_w) is within about a standard
    deviation of mean(a), which removes the cancellation at no extra pass. Detached: the function does not
    depend on it, so neither does its exact gradient.
    """
    value = (gates_[:, :, :h] * pooled[:, :, :h]).mean(2) * gates_[:, :, h:].mean(2)
    return value.detach().unsqueeze(2).unsqueeze(3)


def tap_weights(p: Params, edges_of_taps: torch.Tensor) -> TapWeights:
    """The 3x3 branch's weights from the parameters alone (``TapWeights``)."""
    c = p.w3.shape[0]
    s1 = torch.softmax(p.beta, dim=0)
    return TapWeights(
        taps_e=edge_taps(p.w3, edges_of_taps),
        s1=s1,
        taps_mix=torch.matmul(s1, p.w3.reshape(c, c * 9)).reshape(c, 9).t(),
        const=(s1 * p.b3).sum(),
    )


def softmax2(edges: torch.Tensor, taps_e: torch.Tensor, b3: torch.Tensor, pixels: int) -> torch.Tensor:
    """s2 (n, c): the softmax of mean_HW(conv3x3(x)), from the edge sums (n, c, 9)."""
    n, c = edges.shape[0], edges.shape[1]
    return torch.softmax(torch.matmul(edges.reshape(n, c * 9), taps_e.reshape(c, c * 9).t()) / pixels + b3, dim=1)


def coefficients(edges: torch.Tensor, s: torch.Tensor, q: torch.Tensor, p: Params, edges_of_taps: torch.Tensor,
                 eps: float, pixels: int) -> Coefficients:
    """From the edge sums and the sums of a - shift and its square per channel: the ``Coefficients``."""
    mu = s / pixels
    var = q / pixels - mu * mu
    rstd = torch.rsqrt(var.clamp_min(0.) + eps)
    taps = tap_weights(p, edges_of_taps)
    s2 = softmax2(edges, taps.taps_e, p.b3, pixels)
    return Coefficients(k=s2 * p.gamma * rstd, bias=(s2 * (p.beta - p.gamma * mu * rstd)).sum(1) + taps.const,
                        mu=mu, var=var, rstd=rstd, s2=s2, taps=taps)


def ema_portable(x: torch.Tensor, groups: int, p: Params, edges_of_taps: torch.Tensor,
                 eps: float) -> Tuple[torch.Tensor, Stats]:
    """The layer as plain differentiable tensor ops: TorchScript, jit.trace, torch.func transforms, double
    backward, and the ONNX graph (in standard ONNX operators, with any batch and map size).

    Written for onnxruntime: reductions, matmuls, one convolution and elementwise ops, no indexing or
    in-place writes (which export as Gather, ScatterND and full transposes). Returns the output and the
    ``Stats`` a forward keeps (the operator's outputs).
    """
    b, ch, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
    c = ch // groups
    n = b * groups
    pixels = h * w
    gx = x.reshape(n, c, h, w)
    rows, cols = gx.sum(3), gx.sum(2)
    top, bottom = gx.narrow(2, 0, 1), gx.narrow(2, h - 1, 1)
    corners = torch.cat([top.narrow(3, 0, 1), top.narrow(3, w - 1, 1), bottom.narrow(3, 0, 1),
                         bottom.narrow(3, w - 1, 1)], 3)
    edges = edge_sums(rows, cols, corners.reshape(n, c, 4))
    pooled = torch.cat([rows / w, cols / h], 2)
    g = gates(pooled, p.w1, p.b1)
    gh, gw = torch.split(g, [h, w], 2)
    a = gx * gh.unsqueeze(3) * gw.unsqueeze(2) - shift(pooled, g, h)
    s, q = a.sum((2, 3)), torch.linalg.vector_norm(a, dim=(2, 3)).square()
    co = coefficients(edges, s, q, p, edges_of_taps, eps, pixels)
    cross = torch.matmul(co.k.unsqueeze(1), a.reshape(n, c, pixels)).reshape(n, 1, h, w) + co.bias.reshape(n, 1, 1, 1)
    # The one-output 3x3 term as a depthwise convolution summed over channels: onnxruntime runs that several
    # times faster than a convolution with one output channel. Its weight (s1-weighted taps) is made by ops whose
    # result shape follows from the parameters' alone: the TorchScript-based ONNX exporter needs a known kernel
    # shape, and sizes read in a trace are not constants.
    taps = (co.taps.s1.reshape(-1, 1, 1, 1) * p.w3).sum(0).unsqueeze(1)  # (c, 1, 3, 3)
    conv = F.conv2d(gx, taps, padding=1, groups=c)
    cross = cross + conv.sum(1, keepdim=True)
    gate = torch.sigmoid(cross)
    return (gx * gate).reshape(b, ch, h, w), Stats(gate.squeeze(1), pooled, edges, torch.stack([s, q]))
