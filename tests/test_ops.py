"""EMA's custom operators (ema_hub/layers/ops.py): one dispatch for eager, torch.compile, torch.export, autocast
and the meta device, calling the same kernels."""
import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import native, ops
from ema_hub.reference import ReferenceEMA
from support.models import acting_layer


def _args(layer, x):
    return (x, *layer.params(), layer.tap_edges, layer.groups, layer.gn.eps)


def test_opcheck():
    """torch.library's own check of the registration: schema, fake implementation against the real one,
    autograd, and tracing through AOTAutograd."""
    layer = acting_layer()
    x = (torch.randn(2, 64, 7, 5) + 0.5).requires_grad_()
    torch.library.opcheck(ops.ema_forward, _args(layer, x))
    with torch.no_grad():  # the inference operator, which has no autograd formula
        args = _args(layer, x.detach())
    torch.library.opcheck(ops.ema, tuple(a.detach() if torch.is_tensor(a) else a for a in args))
    # channels_last in, channels_last out: the fake's strides are the kernel's
    x_cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(ops.ema, tuple(a.detach() if torch.is_tensor(a) else a for a in _args(layer, x_cl)))
    with torch.no_grad():
        _, *stats = ops.ema_forward(*_args(layer, x.detach()))
    dy = torch.randn(2, 64, 7, 5)
    params = [p.detach() for p in layer.params()]  # the backward has no autograd of its own (double backward
    # differentiates the portable form instead)
    torch.library.opcheck(ops.ema_backward, (dy, x.detach(), *stats, *params, layer.tap_edges, layer.groups,
                                             layer.gn.eps))
    # channels_last x (torch.compile's layout): the input gradient still comes back contiguous, as the fake says
    torch.library.opcheck(ops.ema_backward, (dy, x_cl, *stats, *params, layer.tap_edges, layer.groups, layer.gn.eps))


def test_compiled_calls_the_same_kernels(kernel_calls):
    """torch.compile(fullgraph=True) sees the operator as opaque: the compiled model runs the compiled CPU
    kernels, forward and backward, and equals eager."""
    layer = acting_layer()
    ref = ReferenceEMA(64, layer.groups)
    ref.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(2, 64, 14, 14) + 0.5
    with torch.no_grad():
        eager_out = layer(x)
        before = kernel_calls['forward']
        out = compiled(x)
    assert kernel_calls['forward'] > before
    torch.testing.assert_close(out, eager_out, rtol=0, atol=1e-4 * eager_out.abs().max().item())
    xr = x.clone().requires_grad_()
    compiled(xr).square().sum().backward()
    assert kernel_calls['backward'] >= 1
    xe = x.clone().requires_grad_()
    ref(xe).square().sum().backward()
    torch.testing.assert_close(xr.grad, xe.grad, rtol=0, atol=1e-4 * xe.grad.abs().max().item())


@pytest.mark.parametrize('dynamic', [False, True])
def test_compiled_channels_last_network(kernel_calls, dynamic):
    """Between convolutions torch.compile hands the operator channels_last maps (its layout optimisation); the
    kernel reads and writes them in place, and the network equals eager, with static and symbolic sizes (the
    fake decides the output's layout as the kernel does)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), acting_layer(), torch.nn.Conv2d(64, 8, 1)).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 10).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = net(x)
        before = kernel_calls['forward']
        got = torch.compile(net, fullgraph=True, dynamic=dynamic)(x)
    assert kernel_calls['forward'] > before
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_compiled_network_hands_the_kernel_its_layout(monkeypatch):
    """torch.compile turns a network's convolutions channels_last on the CPU (inductor's layout optimisation)
    although eager mode ran it contiguous; the inference operator's layout is flexible, so the kernel reads those
    maps in place instead of getting a copy in the traced layout (a transposing pass per layer)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), acting_layer(),
                              torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.BatchNorm2d(64), acting_layer(),
                              torch.nn.Conv2d(64, 8, 1)).eval()
    layouts = []
    forward = native.forward
    monkeypatch.setattr(native, 'forward', lambda x, *a: layouts.append(
        'channels_last' if x.is_contiguous(memory_format=torch.channels_last) else 'contiguous') or forward(x, *a))
    x = torch.randn(2, 3, 12, 10)
    with torch.no_grad():
        want = net(x)
        assert layouts == ['contiguous'] * 2
        layouts.clear()
        got = torch.compile(net, fullgraph=True)(x)
    assert layouts == ['channels_last'] * 2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_export_keeps_the_operator(tmp_path, kernel_calls):
    """torch.export records the operator (the inference one without grad), the .pt2 file loads back (with ema_hub
    imported) and runs the kernel."""
    layer = acting_layer().eval()
    x = torch.randn(3, 64, 9, 7)
    with torch.no_grad():
        program = torch.export.export(layer, (x,), dynamic_shapes=({0: torch.export.Dim('batch')},))
    targets = [n.target for n in program.graph.nodes if n.op == 'call_function']
    assert torch.ops.ema_hub.ema.default in targets
    torch.export.save(program, str(tmp_path / 'layer.pt2'))
    loaded = torch.export.load(str(tmp_path / 'layer.pt2')).module()
    before = kernel_calls['forward']
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.randn(5, 64, 9, 7)).shape, torch.Size([5, 64, 9, 7]))
        torch.testing.assert_close(loaded(x), layer(x))
    assert kernel_calls['forward'] > before


def test_meta_device():
    """Built and run on the meta device: shapes only, through the operator's fake implementation."""
    layer = EMA(96, device='meta')
    out = layer(torch.empty(2, 96, 11, 6, device='meta'))
    assert out.device.type == 'meta' and out.shape == (2, 96, 11, 6)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_half_precision_input_computes_in_float32(dtype):
    """Half-precision input (autocast's convolutions produce it) is computed in float32 and cast back; the
    statistics the backward keeps are float32."""
    layer = acting_layer()
    x = torch.randn(2, 64, 6, 6) + 0.5
    out, gate, pooled, edges, sums = ops.ema_forward(*_args(layer, x.to(dtype)))
    assert out.dtype == dtype and {t.dtype for t in (gate, pooled, edges, sums)} == {torch.float32}
    with torch.no_grad():
        want = layer(x.to(dtype).float())
    torch.testing.assert_close(out.float(), want, rtol=0, atol=2e-2 * want.abs().max().item())


def test_statistics_are_not_differentiable():
    """Only the output carries gradient: the statistics are marked non-differentiable."""
    layer = acting_layer()
    x = torch.randn(2, 64, 5, 5, requires_grad=True)
    out, *stats = ops.ema_forward(*_args(layer, x))
    assert out.requires_grad and not any(t.requires_grad for t in stats)


def test_output_can_be_modified_in_place():
    """A residual ``out += shortcut`` after the layer (timm's blocks do it) is allowed and differentiated."""
    layer = acting_layer()
    x = torch.randn(2, 64, 5, 5, requires_grad=True)
    out = layer(x)
    out += x
    out.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
