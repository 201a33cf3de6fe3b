"""The paper's EMA, written straight from its equations: the test oracle and the benchmark baseline.

Not for use in models (``ema_hub.EMA`` computes the same function much faster); it exists so the fast
layer has an independent check (tests/test_ema_layer.py) and a baseline to be timed against
(``ema-hub benchmark``).

Ouyang et al., "Efficient Multi-Scale Attention Module with Cross-Spatial Learning", ICASSP 2023,
arXiv 2305.13563, section 3 and its released code. Every branch is computed in full (the C/G-wide
3x3 convolution, both softmaxes from spatial means, both matrix products), with no algebraic shortcut,
so that it stays an independent check of ``ema_hub.EMA``. It shares parameter names with it
(``gn``, ``conv1x1``, ``conv3x3``) so one state dict loads into both.
"""
import torch
from torch import nn


__all__ = ['ReferenceEMA']


class ReferenceEMA(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.groups = groups
        c = channels // groups
        self.gn = nn.GroupNorm(c, c)
        self.conv1x1 = nn.Conv2d(c, c, kernel_size=1)
        self.conv3x3 = nn.Conv2d(c, c, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, ch, h, w = x.shape
        g = self.groups
        gx = x.reshape(b * g, ch // g, h, w)
        x_h = gx.mean(dim=3, keepdim=True)                       # pool over W -> (n, c, h, 1)
        x_w = gx.mean(dim=2, keepdim=True).permute(0, 1, 3, 2)   # pool over H -> (n, c, w, 1)
        hw = self.conv1x1(torch.cat([x_h, x_w], dim=2))
        x_h, x_w = torch.split(hw, [h, w], dim=2)
        x1 = self.gn(gx * x_h.sigmoid() * x_w.permute(0, 1, 3, 2).sigmoid())
        x2 = self.conv3x3(gx)
        n = b * g
        s1 = torch.softmax(x1.mean(dim=(2, 3)).reshape(n, 1, -1), dim=-1)
        s2 = torch.softmax(x2.mean(dim=(2, 3)).reshape(n, 1, -1), dim=-1)
        weights = torch.matmul(s1, x2.reshape(n, ch // g, -1)) + torch.matmul(s2, x1.reshape(n, ch // g, -1))
        return (gx * weights.reshape(n, 1, h, w).sigmoid()).reshape(b, ch, h, w)


def with_reference_layers(model: nn.Module) -> nn.Module:
    """``model`` with every ``ema_hub.EMA`` replaced, in place, by a ReferenceEMA holding the same parameters.

    Used to count the paper's multiply-accumulates (the figures in the registry and the cards), which do not
    depend on how fast a particular implementation computes them.
    """
    from .layers import EMA

    for name, module in list(model.named_modules()):
        if isinstance(module, EMA):
            ref = ReferenceEMA(module.gn.num_channels * module.groups, module.groups)
            ref.load_state_dict(module.state_dict(), assign=True)  # its tensors (meta ones too)
            model.set_submodule(name, ref)
    return model
