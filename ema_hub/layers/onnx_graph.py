"""EMA in standard ONNX operators: how ``torch.onnx.export`` writes the inference operator ``ema_hub::ema``.

``translations()`` is the ``custom_translation_table`` ``ema_hub.export`` passes to ``torch.onnx.export``: each
EMA layer becomes a few dozen nodes of the default ONNX domain, so the file runs in onnxruntime (or any ONNX
runtime) without this package. The function is the paper's, with ``algebra``'s identities for the 3x3 branch,
written for onnxruntime, which runs each node as a pass over memory:

* gn(a) as LayerNormalization over each (H, W) map without its affine part, which folds into s2's MatMul:
  onnxruntime runs it on all threads (InstanceNormalization on one), with a variance that does not cancel in
  float32;
* a = x * gate_h * gate_w, two broadcasting Muls: making the outer product first costs a pass more;
* s2 from the nine edge sums: the total and the first and last row and column sums are the pooled means times
  a constant selection, the corners one Gather;
* on small maps (H * W <= ``SMALL_MAP``, a static size) the row and column means, the edge sums and the gates'
  expansion over the map are MatMuls with constant matrices instead: onnxruntime's reductions over the last
  axis and its broadcasting Muls pay per row of W values, which dominates on 14x14 and 7x7 maps;
* s1 . conv3x3(x) as a depthwise convolution with the s1-weighted taps, summed over each group's channels
  (onnxruntime runs it several times faster than a convolution with one output channel); on x's own layout
  with the taps repeated for every group, so that onnxruntime feeds it the previous convolution's blocked
  (NCHWc) output without reordering it;
* no in-place writes (they export as ScatterND and transposes of the whole map);
* a static H and W are constants, so the exporter folds all that is computed from them; the parameter-only
  algebra (softmax(gn.bias), the tap weights) depends on initializers alone, so runtimes fold it when the
  session is created.

The export runs inside ``translating()``, where the EMA module records the operator for this table; in any
other ONNX export (a plain ``torch.onnx.export``, either exporter, timm's ``onnx_export``) it records
``algebra.ema_portable`` instead: the same function in more nodes.
"""
import contextlib
import contextvars
from typing import Callable, Dict, Iterator

import numpy as np
import torch

__all__ = ['translations', 'translating', 'translated', 'ema_onnx', 'SMALL_MAP']

SMALL_MAP = 256  # H * W up to which pooling and gating are MatMuls with constant matrices (14x14 and 7x7 maps)


_TRANSLATED = contextvars.ContextVar('ema_hub_onnx_translated', default=False)


def translations() -> Dict[object, Callable]:
    """``{operator: ONNX translation}`` for ``torch.onnx.export(..., custom_translation_table=...)``, which must
    run inside ``translated()``."""
    return {torch.ops.ema_hub.ema.default: ema_onnx}


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Within it, an ONNX export records the EMA module as the operator that ``translations()`` writes."""
    token = _TRANSLATED.set(True)
    try:
        yield
    finally:
        _TRANSLATED.reset(token)


def translated() -> bool:
    """Whether the ONNX export under way has ``translations()`` (inside ``translating()``)."""
    return _TRANSLATED.get()


def ema_onnx(x, w1, b1, gamma, beta, w3, b3, tap_edges, groups: int, eps: float):
    """The translation of ``ema_hub::ema``, called by the exporter with ONNX values for the tensors and Python
    numbers for ``groups`` and ``eps``."""
    from onnx import numpy_helper
    from onnxscript import opset18 as op

    def ints(*values):  # an int64 constant (the exporter cannot type a bare list beside a tensor)
        return op.Constant(value_ints=list(values))

    def matrix(a):  # a float32 constant
        return op.Constant(value=numpy_helper.from_array(a.astype(np.float32)))

    def ones(shape):  # LayerNormalization's scale of 1 (broadcasting a scalar scale is slow in onnxruntime)
        return op.Expand(op.CastLike(op.Constant(value_float=1.0), x), shape)

    c = w1.shape[0]
    static = x.shape[2], x.shape[3]
    fixed = all(isinstance(d, int) for d in static)  # an export with a static size: constants that fold
    if fixed:
        size, h_i, w_i = ints(*static), ints(static[0]), ints(static[1])
    else:
        size = op.Slice(op.Shape(x), ints(2), ints(4))
        h_i, w_i = op.Slice(size, ints(0), ints(1)), op.Slice(size, ints(1), ints(2))
    pixels = op.Mul(h_i, w_i)
    gx = op.Reshape(x, op.Concat(ints(-1, c), size, axis=0))           # (n, c, H, W)
    flat = op.Concat(ints(-1, c), pixels, axis=0)

    def gates_of(pooled):  # sigmoid(conv1x1(pooled)), split into gate_h and gate_w
        g = op.Sigmoid(op.Add(op.MatMul(op.Reshape(w1, ints(c, c)), pooled), op.Unsqueeze(b1, ints(1))))
        return op.Slice(g, ints(0), h_i, ints(2)), op.Slice(g, h_i, op.Add(h_i, w_i), ints(2))

    # The pooled means, their gates, a = x * gate_h * gate_w normalized (gn without its affine part), and the
    # nine edge sums (algebra.edge_sums).
    if fixed and static[0] * static[1] <= SMALL_MAP:
        pool, expand_h, expand_w = _small_map_matrices(*static)
        fx = op.Reshape(gx, flat)
        pooled_edges = op.MatMul(fx, matrix(pool))                      # (n, c, H + W + 9)
        end = sum(static)
        pooled = op.Slice(pooled_edges, ints(0), ints(end), ints(2))
        edges = op.Slice(pooled_edges, ints(end), ints(end + 9), ints(2))
        gate_h, gate_w = gates_of(pooled)
        a = op.Mul(op.Mul(fx, op.MatMul(gate_h, matrix(expand_h))), op.MatMul(gate_w, matrix(expand_w)))
        a = op.LayerNormalization(a, ones(pixels), axis=2, epsilon=eps)[0]
    else:
        pooled = op.Concat(op.ReduceMean(gx, ints(3), keepdims=0), op.ReduceMean(gx, ints(2), keepdims=0), axis=2)
        gate_h, gate_w = gates_of(pooled)
        a = op.Mul(op.Mul(gx, op.Unsqueeze(gate_h, ints(3))), op.Unsqueeze(gate_w, ints(2)))
        a = op.LayerNormalization(a, ones(size), axis=2, epsilon=eps)[0]
        corner_at = op.Concat(ints(0), op.Sub(w_i, ints(1)), op.Mul(op.Sub(h_i, ints(1)), w_i), op.Sub(pixels, ints(1)),
                              axis=0)
        corners = op.Gather(op.Reshape(gx, flat), corner_at, axis=2)    # (n, c, 4)
        edges = op.Concat(op.MatMul(pooled, _edge_selection(op, h_i, w_i, x)), corners, axis=2)

    # s2 = softmax(mean_HW(conv3x3(x))) from the edge sums (algebra.tap_edges).
    taps_e = op.Reshape(op.MatMul(op.Reshape(w3, ints(c * c, 9)), tap_edges), ints(c, c * 9))
    taps_e = op.Div(op.Transpose(taps_e), op.CastLike(pixels, x))
    s2 = op.Softmax(op.Add(op.MatMul(op.Reshape(edges, ints(-1, c * 9)), taps_e), b3), axis=1)

    # cross = s2 . gn(a) + s1 . conv3x3(x), s1 = softmax(gn.bias): gn's affine part and the 3x3 bias folded into
    # s2's weights and one constant per group, the 3x3 term with s1-weighted taps.
    cross = op.MatMul(op.Unsqueeze(op.Mul(s2, gamma), ints(1)), op.Reshape(a, flat))
    cross = op.Reshape(cross, op.Concat(ints(-1, 1), size, axis=0))
    s1 = op.Softmax(beta, axis=0)
    taps = op.Reshape(op.MatMul(op.Unsqueeze(s1, ints(0)), op.Reshape(w3, ints(c, c * 9))), ints(c, 1, 3, 3))
    taps = op.Tile(taps, ints(groups, 1, 1, 1))  # (C, 1, 3, 3): every group's channels
    conv = op.Conv(x, taps, pads=[1, 1, 1, 1], group=c * groups)
    conv = op.ReduceSum(op.Reshape(conv, op.Concat(ints(-1, c), size, axis=0)), ints(1), keepdims=1)
    bias = op.Add(op.ReduceSum(op.Mul(s2, beta), ints(1), keepdims=1), op.ReduceSum(op.Mul(s1, b3), keepdims=1))
    cross = op.Add(op.Add(cross, conv), op.Reshape(bias, ints(-1, 1, 1, 1)))
    return op.Reshape(op.Mul(gx, op.Sigmoid(cross)), op.Concat(ints(-1, c * groups), size, axis=0))


def _edge_selection(op, h_i, w_i, like):
    """(H + W, 5): the pooled means (rows, then columns) to the total and the first and last row and column sums
    (``algebra.edge_sums``' first five). In nodes, for a dynamic size; a static one folds to a constant."""
    h, w = op.Squeeze(h_i), op.Squeeze(w_i)
    at = op.Range(op.Constant(value_int=0), op.Add(h, w), op.Constant(value_int=1))
    one = op.Constant(value_int=1)
    picks = [op.Less(at, h), op.Equal(at, op.Constant(value_int=0)), op.Equal(at, op.Sub(h, one)),
             op.Equal(at, h), op.Equal(at, op.Sub(op.Add(h, w), one))]
    select = op.Concat(*[op.Unsqueeze(p, op.Constant(value_ints=[1])) for p in picks], axis=1)
    h_f, w_f = op.CastLike(h_i, like), op.CastLike(w_i, like)
    return op.Mul(op.CastLike(select, like), op.Concat(w_f, w_f, w_f, h_f, h_f, axis=0))  # means to sums


def _small_map_matrices(h: int, w: int):
    """For a static H x W map flattened: ``pool`` (H * W, H + W + 9) to the row and column means and the nine
    edge sums (``algebra.edge_sums`` of each pixel's unit map); ``expand_h`` (H, H * W) and ``expand_w``
    (W, H * W) to spread per-row and per-column gates over the map."""
    from .algebra import edge_sums

    unit = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)  # a map per pixel, 1 there
    rows, cols = unit.sum(3), unit.sum(2)                                # (H * W, 1, H), (H * W, 1, W)
    corners = unit[:, :, [0, 0, h - 1, h - 1], [0, w - 1, 0, w - 1]]
    pool = torch.cat([rows / w, cols / h, edge_sums(rows, cols, corners)], 2).reshape(h * w, h + w + 9)
    return pool.numpy(), rows.reshape(h * w, h).t().numpy(), cols.reshape(h * w, w).t().numpy()
