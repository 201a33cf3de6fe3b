"""EMA in standard ONNX operators: how ``torch.onnx.export`` writes the inference operator ``ema_hub::ema``.

``translations()`` is the ``custom_translation_table`` ``ema_hub.export`` passes to ``torch.onnx.export``: each
EMA layer becomes a few dozen nodes of the default ONNX domain, so the file runs in onnxruntime (or any ONNX
runtime) without this package. The function is the paper's, with ``algebra``'s identities for the 3x3 branch,
written for onnxruntime, which runs each node as a pass over memory:

* gn(a) as InstanceNormalization (one node, a two-pass variance that does not cancel in float32), weighted by
  s2 in one MatMul; a = x * (gate_h outer gate_w), the product made once: two broadcasting Muls on the
  whole map cost more;
* s2 from the nine edge sums, the corners gathered (four Slices of rows and corners cost more);
* s1 . conv3x3(x) as a depthwise convolution with the s1-weighted taps, summed over each group's channels
  (onnxruntime runs it several times faster than a convolution with one output channel); on x's own layout
  with the taps repeated for every group, so that onnxruntime feeds it the previous convolution's blocked
  (NCHWc) output without reordering it;
* no in-place writes (they export as ScatterND and transposes of the whole map);
* the parameter-only algebra (softmax(gn.bias), the tap weights) depends on initializers alone, so runtimes
  fold it when the session is created.

Without the table (a plain ``torch.onnx.export``), the exporter decomposes the operator into
``algebra.ema_portable`` instead: the same function in more nodes.
"""
from typing import Callable, Dict

import torch

__all__ = ['translations', 'ema_onnx']

_END = 2 ** 62  # Slice's "to the end"


def translations() -> Dict[object, Callable]:
    """``{operator: ONNX translation}`` for ``torch.onnx.export(..., custom_translation_table=...)``."""
    return {torch.ops.ema_hub.ema.default: ema_onnx}


def ema_onnx(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups: int, eps: float):
    """The translation of ``ema_hub::ema``, called by the exporter with ONNX values for the tensors and Python
    numbers for ``groups`` and ``eps``."""
    from onnxscript import opset18 as op

    def ints(*values):  # an int64 constant (the exporter cannot type a bare list beside a tensor)
        return op.Constant(value_ints=list(values))

    def part(t, start, end, axis):  # t[start:end] along one axis
        return op.Slice(t, start if not isinstance(start, int) else ints(start),
                        end if not isinstance(end, int) else ints(end), ints(axis))

    c = w1.shape[0]
    shape = op.Shape(x)                                             # [B, C, H, W]
    hw, h_i, w_i = op.Slice(shape, ints(2), ints(4)), op.Slice(shape, ints(2), ints(3)), op.Slice(shape, ints(3), ints(4))
    h, w = op.CastLike(h_i, x), op.CastLike(w_i, x)
    gx = op.Reshape(x, op.Concat(ints(-1, c), hw, axis=0))         # (n, c, H, W)

    # The pooled means, their gates and the 1x1 branch: x1 = gn(x * gate_h * gate_w).
    rows, cols = op.ReduceSum(gx, ints(3), keepdims=0), op.ReduceSum(gx, ints(2), keepdims=0)
    pooled = op.Concat(op.Div(rows, w), op.Div(cols, h), axis=2)
    gates = op.Sigmoid(op.Add(op.MatMul(op.Reshape(w1, ints(c, c)), pooled), op.Unsqueeze(b1, ints(1))))
    gate_h, gate_w = part(gates, 0, h_i, 2), part(gates, h_i, _END, 2)
    gate_hw = op.Mul(op.Unsqueeze(gate_h, ints(3)), op.Unsqueeze(gate_w, ints(2)))
    x1 = op.InstanceNormalization(op.Mul(gx, gate_hw), gamma, beta, epsilon=eps)

    # s2 = softmax(mean_HW(conv3x3(x))) from the nine edge sums (algebra.edge_sums, algebra.tap_edges).
    first_last_row = op.Concat(ints(0), op.Sub(h_i, ints(1)), axis=0)  # [0, H - 1]: one row twice when H = 1
    first_last_col = op.Concat(ints(0), op.Sub(w_i, ints(1)), axis=0)
    corners = op.Gather(op.Gather(gx, first_last_row, axis=2), first_last_col, axis=3)  # (n, c, 2, 2)
    edges = op.Concat(op.ReduceSum(rows, ints(2), keepdims=1), op.Gather(rows, first_last_row, axis=2),
                      op.Gather(cols, first_last_col, axis=2), op.Reshape(corners, ints(0, 0, 4)), axis=2)
    taps_e = op.Reshape(op.MatMul(op.Reshape(w3, ints(c * c, 9)), tap_edges), ints(c, c * 9))
    mean_x2 = op.Div(op.MatMul(op.Reshape(edges, ints(-1, c * 9)), op.Transpose(taps_e)), op.Mul(h, w))
    s2 = op.Softmax(op.Add(mean_x2, b3), axis=1)

    # cross = s2 . x1 + s1 . conv3x3(x), s1 = softmax(gn.bias): the 3x3 term with s1-weighted taps.
    flat = op.Concat(ints(-1, c), op.Mul(h_i, w_i), axis=0)
    cross = op.Reshape(op.MatMul(op.Unsqueeze(s2, ints(1)), op.Reshape(x1, flat)), op.Concat(ints(-1, 1), hw, axis=0))
    s1 = op.Softmax(beta, axis=0)
    taps = op.Reshape(op.MatMul(op.Unsqueeze(s1, ints(0)), op.Reshape(w3, ints(c, c * 9))), ints(c, 1, 3, 3))
    taps = op.Tile(taps, ints(groups, 1, 1, 1))  # (C, 1, 3, 3): every group's channels
    conv = op.Conv(x, taps, pads=[1, 1, 1, 1], group=c * groups)
    conv = op.ReduceSum(op.Reshape(conv, op.Concat(ints(-1, c), hw, axis=0)), ints(1), keepdims=1)
    cross = op.Add(op.Add(cross, conv), op.ReduceSum(op.Mul(s1, b3), keepdims=1))
    return op.Reshape(op.Mul(gx, op.Sigmoid(cross)), shape)
