""" EMA: Efficient Multi-Scale Attention with cross-spatial learning

Paper: `Efficient Multi-Scale Attention Module with Cross-Spatial Learning` - https://arxiv.org/abs/2305.13563
(Ouyang et al., ICASSP 2023).

This computes exactly the paper's function with far less work than its reference code. Per group
(channels folded into the batch, c = C/G channels each):

* x1 = gn(a) with a = x * sigmoid(h-gate) * sigmoid(w-gate): the 1x1 branch, as in the paper.
* mean_HW(x1) is exactly gn.bias (a normalised channel has zero spatial mean), so s1 = softmax(gn.bias)
  does not depend on the input, and s1 . conv3x3(x) is one 3x3 convolution with a single output
  channel (weights sum_o s1[o] W[o]): the c-wide 3x3 convolution is never computed.
* mean_HW(conv3x3(x)) with zero padding only needs, per channel, the total, the first and last rows and
  columns and the four corners: s2 comes from those nine sums, again without the convolution.
* s2 . gn(a) folds into one coefficient per channel on a plus a constant.

The straightforward form lives in ema_hub/reference.py (test oracle and benchmark baseline).

Cost model (CPU, measured with torch.profiler, profile_memory=True): the layer is memory bound, and on
the target machines a fresh full-size (n, c, H, W) buffer costs more in page faults than the pass that
fills it, so formulations are picked by how many full-size buffers forward AND autograd's backward
allocate, and by avoiding ops whose backward scatters into a zero-filled full-size tensor (indexing,
slicing). Inference allocates the product a, the nine tap maps (9/c of the input) and the output;
``python -m ema_hub.benchmark`` measures speed and memory against the paper's form and plain ResNet-50.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['EMA', 'ema_groups']


def ema_groups(channels: int, factor: int) -> int:
    """Number of groups EMA splits ``channels`` into: the largest divisor of ``channels`` not above ``factor``.

    The paper uses G = factor and assumes it divides C. For channel counts it does not divide (MobileNetV2's
    144, say) this keeps groups as many and as small as the factor allows: 144 with factor 32 gives 24
    groups of 6 channels. Fewer channels than the factor gives one channel per group.
    """
    if channels < 1 or factor < 1:
        raise ValueError(f'EMA needs channels >= 1 and factor >= 1, got channels={channels}, factor={factor}')
    return max(g for g in range(1, min(channels, factor) + 1) if channels % g == 0)


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
        n = b * self.groups
        c = ch // self.groups
        gx = x.reshape(n, c, h, w)

        # Row sums plus the first and last column in one matmul against a (w, 3) matrix [1, e_0, e_{w-1}]:
        # its backward is one dense matmul, whereas gx[..., 0]-style indexing (the corners s2 needs) makes
        # autograd fill and scatter into a zero full-size tensor per index (the top backward cost before).
        # Column sums by sum(): its backward is a broadcast view, free.
        # (Built from ones_like/pad so that FX and export trace it with symbolic w.)
        first = F.pad(torch.ones_like(gx[0, 0, 0, :1]), (0, w - 1))
        edge = torch.stack([torch.ones_like(gx[0, 0, 0]), first, first.flip(0)], 1)
        rs = torch.matmul(gx, edge)  # (n, c, h, 3)
        rows = rs[:, :, :, 0]
        cols = gx.sum(2)
        w1 = self.conv1x1.weight.reshape(c, c)
        gates = torch.sigmoid(torch.matmul(w1, torch.cat([rows / w, cols / h], 2)) + _bias(self.conv1x1.bias).unsqueeze(1))
        # a = x * gate_h * gate_w as a product and an in-place product: in inference one full-size buffer
        # (a batched-matmul outer product of the gates was 3x slower than the multiplies at stage 1); under
        # autograd the in-place step keeps what its backward needs, so it stays exact and differentiable.
        a = (gx * gates[:, :, :h].unsqueeze(3)).mul_(gates[:, :, h:].unsqueeze(2)).reshape(n, c, h * w)
        # GroupNorm statistics from two reductions (torch.var_mean over a spatial axis is ~10x slower on CPU).
        # sum a^2 as a squared vector_norm: no full-size temporary in forward and one in backward (vecdot
        # allocates a*a in forward and two products in backward; it also timed faster here).
        mu = a.sum(2) / (h * w)
        var = (torch.linalg.vector_norm(a, dim=2).square() / (h * w) - mu * mu).clamp_min(0.)
        rstd = torch.rsqrt(var + self.gn.eps)
        gamma, beta = self.gn.weight, self.gn.bias

        # s2 = softmax(mean_HW(conv3x3(x))) from per-channel window sums: with zero padding, kernel tap
        # (i, j) sees the whole map minus one edge row (i != 1), minus one edge column (j != 1), plus the
        # corner both exclude. Corners come from the edge columns of the matmul above.
        w3, b3 = self.conv3x3.weight, _bias(self.conv3x3.bias)
        sums = torch.stack([
            rows.sum(2),
            -rows[:, :, h - 1], -rows[:, :, 0],
            -cols[:, :, w - 1], -cols[:, :, 0],
            rs[:, :, h - 1, 2], rs[:, :, h - 1, 1], rs[:, :, 0, 2], rs[:, :, 0, 1],
        ], 2)
        taps = torch.stack([
            w3.sum((2, 3)),
            w3[:, :, 0].sum(2), w3[:, :, 2].sum(2),
            w3[:, :, :, 0].sum(2), w3[:, :, :, 2].sum(2),
            w3[:, :, 0, 0], w3[:, :, 0, 2], w3[:, :, 2, 0], w3[:, :, 2, 2],
        ], 2)
        s2 = torch.softmax(torch.matmul(sums.reshape(n, c * 9), taps.reshape(c, c * 9).t()) / (h * w) + b3, dim=1)

        # s2 . gn(a) = sum_c k_c a_c + const, per group.
        k = s2 * gamma * rstd
        const = (s2 * (beta - gamma * mu * rstd)).sum(1)
        # s1 . conv3x3(x): one output channel, weights mixed by s1 = softmax(gn.bias). It runs as a (9, c)
        # matmul and a sum of shifted tap maps: a one-output-channel convolution is several times slower
        # through oneDNN on CPU (stage 1, fwd+bwd: conv2d 40 ms, matmul + in-place shifted adds 300 ms
        # because slice backward zero-fills per tap, matmul + F.pad shifts 25 ms).
        s1 = torch.softmax(beta, dim=0)
        taps_mix = torch.matmul(s1, w3.reshape(c, c * 9)).reshape(c, 9).t()
        z = torch.matmul(taps_mix, gx.reshape(n, c, h * w)).reshape(n, 3, 3, h, w)
        cross = _sum_shifted_taps(z)
        cross = cross + torch.matmul(k.unsqueeze(1), a).reshape(n, h, w)
        cross = cross + (const + (s1 * b3).sum()).reshape(n, 1, 1)
        return (gx * torch.sigmoid(cross).unsqueeze(1)).reshape(b, ch, h, w)


def _sum_shifted_taps(z: torch.Tensor) -> torch.Tensor:
    """Zero-padded 3x3 correlation from per-tap maps: out[p, q] = sum_ij z[i, j, p + i - 1, q + j - 1].

    z is (n, 3, 3, H, W). Each tap map is added in place into a zero border-padded (n, H+2, W+2) buffer at
    its offset, then the border is cropped: one small buffer and nine reads, where shifting each map with
    F.pad allocates, zero-fills and copies per shift (1.3x slower for the layer in inference at stage 1).
    The taps come from unbind, not slicing, so the backward does not zero-fill a full buffer per tap.
    """
    n, h, w = z.shape[0], z.shape[3], z.shape[4]
    out = z.new_zeros(n, h + 2, w + 2)
    rows = z.unbind(1)
    for i in range(3):
        taps = rows[i].unbind(1)
        for j in range(3):
            out[:, 2 - i:2 - i + h, 2 - j:2 - j + w].add_(taps[j])  # add_ on a view: FX-traceable
    return out[:, 1:h + 1, 1:w + 1]


def _bias(bias: Optional[torch.Tensor]) -> torch.Tensor:
    assert bias is not None  # both convolutions are built with bias=True; TorchScript needs the refinement
    return bias
