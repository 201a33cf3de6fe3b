"""EMA's ONNX graph (ema_hub/layers/onnx_graph.py) computes the layer: onnxruntime against PyTorch on small maps
(the constant-matrix form) and larger ones, square and not, a one-row map, static and dynamic sizes, groups of
4 to 32 channels, and channels whose mean dominates their spread (where a one-pass variance would cancel)."""
import pytest
import torch
from torch import nn

from ema_hub.export import export_module
from ema_hub.layers.onnx_graph import SMALL_MAP
from support.models import acting_layer

onnx = pytest.importorskip('onnx')
pytest.importorskip('onnxruntime')


def _net(channels: int, factor: int) -> nn.Module:
    """conv, BatchNorm, an EMA whose every part acts (``acting_layer``); the first channels offset far from zero
    with a small spread."""
    ema = acting_layer(channels, factor, seed=channels + factor)
    net = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), ema)
    with torch.no_grad():
        bn = net[1]
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.5), bn.running_var.uniform_(0.5, 2)
        bn.weight[:4], bn.bias[:4] = 0.02, 3.0
    return net.eval()


@pytest.mark.parametrize('channels,factor,shape,dynamic', [
    (64, 8, (2, 3, 7, 9), False),      # 8 channels a group, a small map (H * W <= SMALL_MAP)
    (128, 4, (2, 3, 12, 16), False),   # 32 channels a group, a small map at the limit's side
    (48, 8, (2, 3, 20, 18), False),    # 6 channels a group, a larger map
    (32, 8, (2, 3, 1, 300), False),    # one row, larger than a small map
    (64, 16, (2, 3, 24, 20), True),    # dynamic: checked at the traced size and a non-square one
    (32, 8, (2, 3, 6, 10), True),      # dynamic, traced on a small map: the dynamic form all the same
])
def test_graph_equals_the_layer(channels, factor, shape, dynamic, tmp_path):
    net = _net(channels, factor)
    report = export_module(net, tmp_path / 'ema.onnx', shape, dynamic_size=dynamic)
    assert len(report.max_rel_diff) == (2 if dynamic else 1)
    assert max(report.max_rel_diff.values()) < 1e-4, report.max_rel_diff
    ops = {n.op_type for n in onnx.load(str(tmp_path / 'ema.onnx')).graph.node}
    small = not dynamic and shape[2] * shape[3] <= SMALL_MAP
    assert ('ReduceMean' in ops) != small  # the form meant for the map: pooling by a constant matrix, or reductions
    with torch.no_grad():  # the gate EMA multiplies its input by varies, so the comparison tests it
        y = net[:2](torch.randn(*shape))
        assert (net[2](y) / y).std() > 0.05


def test_plain_export_decomposes_the_operator(tmp_path):
    """Without ema_hub's translation table, torch.onnx.export writes the operator's decomposition
    (algebra.ema_portable): standard operators that compute the layer, at any batch size."""
    import contextlib
    import io

    from ema_hub.export import onnx_session

    net, x = _net(32, 8), torch.randn(2, 3, 10, 12)
    path = tmp_path / 'plain.onnx'
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(net, (x,), str(path), dynamo=True, dynamic_shapes=({0: torch.export.Dim('batch')},))
    assert {n.domain for n in onnx.load(str(path)).graph.node} <= {'', 'ai.onnx'}
    x = torch.randn(3, 3, 10, 12)
    with torch.no_grad():
        want = net(x)
    session = onnx_session(path)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
