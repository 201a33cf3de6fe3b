"""The EMA layer against the paper's equations written out in full (ema_hub/reference.py, ReferenceEMA): every
implementation of the layer's table (ema_hub/layers/ema.py), forward and backward, in fp64 and fp32."""
import copy

import pytest
import torch

from ema_hub import EMA, ema_groups
from ema_hub.layers import eager, native
from ema_hub.layers.algebra import Edge, edge_taps, ema_portable, tap_edges
from ema_hub.reference import ReferenceEMA
from support.models import acting_layer, rel_err

OPERATOR_BACKWARD = 'GeneratedBackwardFor_ema_hub_ema_forward_defaultBackward'  # the custom operator's autograd node


def _pair(channels, factor=32, dtype=torch.float64, seed=0):
    """The fast layer with random (non-trivial) parameters and the reference holding the same ones."""
    fast = acting_layer(channels, factor, seed).to(dtype)
    ref = ReferenceEMA(channels, fast.groups).to(dtype)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _assert_same_function(fast, ref, x, rtol):
    x_fast = x.clone().requires_grad_()
    x_ref = x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), ref(x_ref)
    scale = y_ref.abs().max().clamp_min(1e-6).item()
    torch.testing.assert_close(y_fast, y_ref, rtol=0, atol=rtol * scale)
    grad_out = torch.randn_like(y_ref)
    g_fast = torch.autograd.grad(y_fast, [x_fast, *fast.parameters()], grad_out)
    g_ref = torch.autograd.grad(y_ref, [x_ref, *ref.parameters()], grad_out)
    # Some true gradients are exactly zero (gn.weight through s1, say); compare each against the largest.
    g_scale = max(g.abs().max().item() for g in g_ref)
    names = ['input'] + [n for n, _ in fast.named_parameters()]
    for name, a, b in zip(names, g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=0, atol=rtol * g_scale, msg=lambda m: f'grad of {name}: {m}')


@pytest.fixture(params=['native', 'torch_ops'])
def eager_path(request, monkeypatch):
    """The two forms of the eager fp32 CPU forward and backward: the compiled kernels (``native``) and PyTorch
    ops. Yields the native calls made: {'forward': n, 'backward': n}."""
    calls = {'forward': 0, 'backward': 0}
    if request.param == 'native':
        assert native.available(), 'the native kernel did not build: is a C compiler with OpenMP installed?'
        for name in calls:
            def counted(*a, _f=getattr(native, name), _name=name):
                calls[_name] += 1
                return _f(*a)
            monkeypatch.setattr(native, name, counted)
        torch_ops = []  # backwards through PyTorch ops: only fp64 ones (the oracle's)
        monkeypatch.setattr(eager, 'backward_full_size', lambda gx, *a, _f=eager.backward_full_size:
                            torch_ops.append(gx.dtype) or _f(gx, *a))
        yield calls
        assert calls['forward'], 'the native kernel was not called'
        assert torch.float32 not in torch_ops, 'an fp32 backward ran as PyTorch ops'
    else:
        monkeypatch.setattr(native, 'supports', lambda *a: False)
        yield calls


SHAPES = [
    # (batch, channels, H, W, factor)
    (2, 64, 7, 5, 32),     # non-square
    (1, 256, 14, 14, 32),  # batch 1
    (3, 144, 9, 9, 32),    # factor does not divide channels: 24 groups of 6
    (2, 16, 1, 1, 32),     # 1x1 spatial, fewer channels than the factor
    (2, 32, 1, 3, 8),      # single row
    (2, 64, 4, 1, 32),     # single column
    (2, 96, 2, 2, 32),
    (1, 8, 6, 6, 1),       # one group
    (2, 64, 17, 19, 32),   # more pixels than the pooling matmul takes: separate row/column reductions
    (1, 32, 300, 1, 8),    # ... with a single column
]


@pytest.mark.parametrize('b,c,h,w,factor', SHAPES)
@pytest.mark.parametrize('train', [True, False])
def test_matches_reference_fp64(b, c, h, w, factor, train):
    fast, ref = _pair(c, factor)
    fast.train(train), ref.train(train)
    _assert_same_function(fast, ref, torch.randn(b, c, h, w, dtype=torch.float64) * 2 + 0.5, rtol=1e-9)


@pytest.mark.parametrize('c,s', [(256, 56), (512, 28), (1024, 14), (2048, 7)])
def test_matches_reference_fp32_resnet50_stages(c, s, eager_path):
    fast, ref = _pair(c, dtype=torch.float32)
    _assert_same_function(fast, ref, torch.randn(2, c, s, s), rtol=1e-4)
    assert eager_path['backward'] == eager_path['forward']  # natively: both once; with PyTorch ops: neither


@pytest.mark.parametrize('b,c,h,w,factor', SHAPES)
def test_matches_reference_fp32_odd_shapes(b, c, h, w, factor, eager_path):
    fast, ref = _pair(c, factor, dtype=torch.float32)
    _assert_same_function(fast, ref, torch.randn(b, c, h, w), rtol=1e-4)
    assert eager_path['backward'] == eager_path['forward']


def test_channels_last_input():
    fast, ref = _pair(64)
    x = torch.randn(2, 64, 9, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _assert_same_function(fast, ref, x, rtol=1e-9)


@pytest.mark.parametrize('b,c,h,w,factor', SHAPES)
def test_portable_form_matches_reference_fp64(b, c, h, w, factor):
    """The plain-ops form TorchScript, torch.func and ONNX see (the operator is tested above)."""
    fast, ref = _pair(c, factor)
    portable = lambda x: ema_portable(x, fast.groups, fast.params(), fast.tap_edges, fast.gn.eps)[0]
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_a, y_b = portable(x_a), ref(x_b)
    assert y_a.grad_fn.name() != OPERATOR_BACKWARD
    torch.testing.assert_close(y_a, y_b, rtol=0, atol=1e-12)
    g = torch.randn_like(y_b)
    for a, b_ in zip(torch.autograd.grad(y_a, [x_a, *fast.parameters()], g),
                     torch.autograd.grad(y_b, [x_b, *ref.parameters()], g)):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)


def test_double_backward():
    """create_graph=True differentiates the portable form: second derivatives are exact too."""
    fast, _ = _pair(16, 4)
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64, requires_grad=True)  # 4 channels a group, H != W
    assert torch.autograd.gradgradcheck(fast, (x,))


def test_parameter_gradients_without_input_gradient():
    fast, ref = _pair(64)
    x = torch.randn(2, 64, 6, 5, dtype=torch.float64)  # no requires_grad: only parameters need gradients
    g = torch.randn_like(x)
    for a, b in zip(torch.autograd.grad(fast(x), list(fast.parameters()), g),
                    torch.autograd.grad(ref(x), list(ref.parameters()), g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_training_keeps_only_the_input_at_full_size():
    """Autograd holds x and per-channel / per-pixel vectors only: the memory target rests on this."""
    fast, _ = _pair(256, dtype=torch.float32)
    x = torch.randn(2, 256, 56, 56, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = fast(x)
    assert y.grad_fn.name() == OPERATOR_BACKWARD
    full = [t for t in saved if t.numel() >= x.numel()]
    assert len(full) == 1 and full[0].untyped_storage().data_ptr() == x.untyped_storage().data_ptr()
    rest = sum(t.numel() for t in saved if t.numel() < x.numel())
    # The per-pixel gate is 1/8 of x here (8 channels per group), the pooled means (H + W) / (H W) of it.
    assert rest < 0.2 * x.numel()


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    fast, ref = _pair(128, dtype=torch.float32)
    x = torch.randn(2, 128, 14, 14)
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype):
        y = fast(x_fast)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Low precision, so a loose bound: the point is that it runs and stays the same function.
    y_ref = ref(x_ref)
    torch.testing.assert_close(y.float(), y_ref, rtol=0.05, atol=0.05)
    # ... and so does its gradient: the input's and every parameter's, against the fp32 reference's.
    grad_out = torch.randn_like(y_ref)
    (y.float() * grad_out).sum().backward()
    (y_ref * grad_out).sum().backward()
    names = ['input'] + [n for n, _ in fast.named_parameters()]
    got = [x_fast.grad] + [p.grad for p in fast.parameters()]
    want = [x_ref.grad] + [p.grad for p in ref.parameters()]
    g_scale = max(g.abs().max().item() for g in want)
    for name, a, b in zip(names, got, want):
        assert a is not None and a.shape == b.shape, name
        assert torch.isfinite(a).all(), name
        # 3 % of each gradient's largest entry, plus 0.5 % of the largest of all: a bias gradient is a sum that
        # cancels (conv1x1.bias's is ~1/300 of the others), so its rounding is the size of its terms, not of it.
        torch.testing.assert_close(a.float(), b, rtol=0, atol=0.03 * b.abs().max().item() + 0.005 * g_scale,
                                   msg=lambda m: f'grad of {name}: {m}')


def test_low_precision_parameters():
    fast, ref = _pair(64, dtype=torch.float32)
    x = torch.randn(2, 64, 8, 8)
    y = fast.to(torch.bfloat16)(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), rtol=0.05, atol=0.05)


def test_device_dtype_kwargs():
    m = EMA(64, device='cpu', dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in m.parameters())


def test_parameter_names_and_shapes_match_paper_code():
    m = EMA(256)  # 32 groups of 8 channels
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        'gn.weight': (8,), 'gn.bias': (8,),
        'conv1x1.weight': (8, 8, 1, 1), 'conv1x1.bias': (8,),
        'conv3x3.weight': (8, 8, 3, 3), 'conv3x3.bias': (8,),
    }


@pytest.mark.parametrize('channels,factor,groups', [
    (256, 32, 32), (144, 32, 24), (96, 32, 32), (16, 32, 16), (7, 32, 7), (7, 4, 1), (1, 32, 1), (10, 1, 1),
])
def test_group_rule(channels, factor, groups):
    assert ema_groups(channels, factor) == groups
    assert EMA(channels, factor).groups == groups


@pytest.mark.parametrize('channels,factor', [(0, 32), (-3, 32), (64, 0), (64, -1)])
def test_impossible_arguments(channels, factor):
    with pytest.raises(ValueError, match=f'channels={channels}, factor={factor}'):
        EMA(channels, factor)


@pytest.mark.parametrize('mode', ['no_grad', 'inference_mode'])
@pytest.mark.parametrize('layout', [torch.contiguous_format, torch.channels_last])
def test_inference_path_matches_reference_and_keeps_input(mode, layout, eager_path):
    """Without autograd (in-place steps take other paths there): same function, input untouched."""
    fast, ref = _pair(96, dtype=torch.float32)
    x = torch.randn(2, 96, 9, 7).contiguous(memory_format=layout)
    before = x.clone()
    with getattr(torch, mode)():
        y = fast(x)
    assert torch.equal(x, before)
    assert y.stride() == x.stride()  # channels_last in, channels_last out (torch.compile relies on it)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('c,s', [(256, 56), (2048, 7)])
def test_fp32_accuracy_when_mean_dominates(c, s, eager_path):
    """Post-activation maps have |mean| >> std. The variance must not cancel: fp32 stays within 5e-6 of the
    fp64 result (E[a^2] - E[a]^2 without the shift was off by up to 8e-5 in the input gradient here)."""
    fast, _ = _pair(c, dtype=torch.float32)
    exact = copy.deepcopy(fast).double()
    x = torch.rand(2, c, s, s, generator=torch.Generator().manual_seed(0)) * 0.5 + 3
    x32, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    y32, y64 = fast(x32), exact(x64)
    g = torch.randn_like(y64)
    d32, d64 = torch.autograd.grad(y32, x32, g.float())[0], torch.autograd.grad(y64, x64, g)[0]
    assert rel_err(y32.double(), y64) < 5e-6
    assert rel_err(d32.double(), d64) < 5e-6


@pytest.mark.parametrize('b,c,h,w,factor', [(3, 64, 9, 7, 32), (2, 64, 17, 19, 32), (5, 8, 6, 6, 1)])
def test_chunked_temporaries(monkeypatch, b, c, h, w, factor):
    """The PyTorch-ops path makes its largest temporaries a chunk of the batch at a time; with chunks far smaller
    than these inputs (so that every loop runs several times, with a shorter last chunk) nothing changes."""
    monkeypatch.setattr(eager, '_CHUNK_BYTES', 2000)
    fast, ref = _pair(c, factor)
    assert len(eager._chunks(b * fast.groups, 9 * h * w * 8)) > 2
    _assert_same_function(fast, ref, torch.randn(b, c, h, w, dtype=torch.float64) * 2 + 0.5, rtol=1e-9)


def test_torch_func_per_sample_gradients():
    """Under torch.func transforms (vmap of grad: per-sample gradients) the layer runs its portable form;
    the result equals per-sample gradients taken one sample at a time through the operator."""
    from torch.func import functional_call, grad, vmap

    fast, _ = _pair(64)
    params = {k: v.detach() for k, v in fast.named_parameters()}
    x = torch.randn(3, 64, 6, 5, dtype=torch.float64)

    def loss(p, xi):
        return functional_call(fast, p, (xi.unsqueeze(0),)).square().sum()

    batched = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        one = torch.autograd.grad(fast(x[i:i + 1]).square().sum(), list(fast.parameters()))
        for (name, _), g in zip(fast.named_parameters(), one):
            torch.testing.assert_close(batched[name][i], g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('size', [(5, 7), (20, 18)])  # the small-map matrix path and the large-map one
def test_edge_sums_sit_where_edge_names_them_in_every_form(size):
    """``algebra.Edge`` is the one definition of the edge sums' order: the PyTorch ops, the C kernel (which gets
    the positions from it at build time) and ``tap_edges`` all agree with it."""
    h, w = size
    x = torch.randn(2, 64, h, w)
    gx = x.reshape(4, 32, h, w)
    def named(g):
        return {Edge.TOTAL: g.sum((2, 3)), Edge.FIRST_ROW: g[:, :, 0].sum(2), Edge.LAST_ROW: g[:, :, -1].sum(2),
                Edge.FIRST_COL: g[:, :, :, 0].sum(2), Edge.LAST_COL: g[:, :, :, -1].sum(2),
                Edge.X00: g[:, :, 0, 0], Edge.X0L: g[:, :, 0, -1], Edge.XL0: g[:, :, -1, 0], Edge.XLL: g[:, :, -1, -1]}
    layer = EMA(64, 2)  # two groups of 32 channels, as gx has them
    forms = {'eager': eager.pool(gx)[1]}
    if native.available():
        forms['native'] = native.forward(x, layer.groups, layer.params(), layer.tap_edges, layer.gn.eps,
                                         torch.empty_like(x))[2]
    for form, edges in forms.items():
        for edge, want in named(gx).items():
            torch.testing.assert_close(edges[:, :, edge], want, atol=1e-4, rtol=1e-5,
                                       msg=lambda m: f'{form} {edge!r}: {m}')
    # the sum of a zero-padded 3x3 convolution's output, from the edge sums through tap_edges
    w3 = torch.randn(32, 32, 3, 3, dtype=torch.float64)
    conv_sum = torch.nn.functional.conv2d(gx.double(), w3, padding=1).sum((2, 3))
    exact = named(gx.double())
    edges = torch.stack([exact[e] for e in Edge], 2)
    via_edges = torch.einsum('nie,oie->no', edges, edge_taps(w3, tap_edges().double()))
    torch.testing.assert_close(via_edges, conv_sum)
