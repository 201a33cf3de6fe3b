""" EMA: Efficient Multi-Scale Attention with cross-spatial learning

Paper: `Efficient Multi-Scale Attention Module with Cross-Spatial Learning` - https://arxiv.org/abs/2305.13563
(Ouyang et al., ICASSP 2023).

This computes exactly the paper's function with far less work than its reference code (``algebra`` has the
identities): a few memory-bound passes over the input. Which implementation runs:

================================  ========================================  ======================================
mode                              forward                                   backward
================================  ========================================  ======================================
eager, torch.compile,             operator ``ema_hub::ema`` (no gradient    operator ``ema_hub::ema_backward``:
torch.export, autocast,           wanted) or ``ema_hub::ema_forward``       CPU float32: compiled C kernel
meta device                       (training): CPU float32: compiled C       (``native``) for the full-size part;
                                  kernel (``native``); CUDA float32/bf16/   elsewhere PyTorch ops (``eager``)
                                  fp16: Triton kernels (``ema_triton``);
                                  elsewhere PyTorch ops (``eager``);
                                  meta and FakeTensor: shapes only
double backward                   the operator                              ``algebra.ema_portable`` differentiated
TorchScript (script and trace),   ``algebra.ema_portable``: plain ops       autograd through those ops
torch.func (vmap, grad)
ONNX (``ema_hub.export``)         ``ema_hub::ema`` in standard ONNX         (inference only)
                                  operators (``onnx_graph``)
other ONNX exports (a plain       ``algebra.ema_portable``: plain ops       (inference only)
``torch.onnx.export``, either
exporter, grad or not)
timm's FX tracing                 EMA is a leaf: the graph calls the        as eager
                                  module, so as eager
================================  ========================================  ======================================

Half-precision input (autocast's included: ``ops`` has the policy) computes in float32 and is cast back; the
scripted form runs without a backward graph where grad is off (train, then validate under inference_mode).
``ema_hub/reference.py`` holds the paper's
straightforward form (test oracle, benchmark baseline); ``ema-hub benchmark`` times them side by side.
"""
from typing import Optional

import torch
from timm.layers import register_notrace_module
from torch import nn

from . import native, onnx_graph, ops
from .algebra import Params, ema_portable, tap_edges

__all__ = ['EMA', 'ema_groups', 'implementation']


def implementation(device: str) -> str:
    """Which kernels compute the float32 forward (and backward) on ``device`` here, in words."""
    if device == 'cuda':
        return ('Triton kernels (ema_hub/layers/ema_triton.py)' if ops.ema_triton is not None
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


# An FX leaf in timm's tracing (feature extraction, timm's FX tests): the traced graph then calls this module
# and so runs the same operator as eager, bit for bit, in inference and training.
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
        self.register_buffer('tap_edges', torch.empty(9, 9, **dd), persistent=False)
        self.init_non_persistent_buffers()

    def init_non_persistent_buffers(self) -> None:
        """Fill ``tap_edges`` (timm's hook: a model built on the meta device gets it after ``to_empty``)."""
        if self.tap_edges.device.type != 'meta':
            with torch.no_grad():
                self.tap_edges.copy_(tap_edges())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting() and not _recorded():
            return self._forward_op(x)
        params = self.params()
        if torch.jit.is_scripting() and not torch.is_grad_enabled():
            # Else the profiling executor, having seen parameters that require grad in training, runs a graph that
            # saves its inputs for backward, which inference_mode's tensors refuse.
            params = Params(params.w1.detach(), params.b1.detach(), params.gamma.detach(), params.beta.detach(),
                            params.w3.detach(), params.b3.detach())
        return ema_portable(x, self.groups, params, self.tap_edges, self.gn.eps)[0]

    @torch.jit.unused
    def spatial_gate(self, x: torch.Tensor) -> torch.Tensor:
        """The gate sigmoid(cross) this layer multiplies ``x`` (B, C, H, W) by, per group: (B, groups, H, W), float32.
        Every gate is 0.5 while gn and conv3x3 are zero (a warm start before fine-tuning)."""
        with torch.no_grad():
            gate = ops.ema_forward(x, *self.params(), self.tap_edges, self.groups, self.gn.eps)[1]
        return gate.reshape(x.shape[0], self.groups, x.shape[2], x.shape[3])

    def params(self) -> Params:
        return Params(self.conv1x1.weight, _bias(self.conv1x1.bias), self.gn.weight, self.gn.bias,
                      self.conv3x3.weight, _bias(self.conv3x3.bias))

    @torch.jit.unused
    def _forward_op(self, x: torch.Tensor) -> torch.Tensor:
        params = self.params()
        training = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))
        if training and not torch.onnx.is_in_onnx_export():  # an ONNX graph is for inference, grad or not
            return ops.ema_forward(x, *params, self.tap_edges, self.groups, self.gn.eps)[0]
        return ops.ema(x, *params, self.tap_edges, self.groups, self.gn.eps)


@torch.jit.unused
def _recorded() -> bool:
    """Whether this call is recorded as plain ops: by a TorchScript trace (the TorchScript-based ONNX exporter
    too), a torch.func transform (vmap, grad: per-sample gradients), or an ONNX export that has no translation of
    the operator (a plain ``torch.onnx.export``; ``ema_hub.export`` brings ``onnx_graph``'s); the operator has
    neither a TorchScript form nor a vmap rule. Never inside torch.compile, which calls the operator."""
    if torch.onnx.is_in_onnx_export():
        return not onnx_graph.translated()
    if torch.compiler.is_compiling():
        return False
    return torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()


def _bias(bias: Optional[torch.Tensor]) -> torch.Tensor:
    assert bias is not None  # both convolutions are built with bias=True; TorchScript needs the refinement
    return bias
