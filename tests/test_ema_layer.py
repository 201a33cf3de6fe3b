"""The EMA layer against the paper's equations written out in full (tests/ema_reference.py)."""
import pytest
import torch

from ema_hub import EMA, ema_groups
from ema_reference import ReferenceEMA


def _pair(channels, factor=32, dtype=torch.float64, seed=0):
    """The fast layer with random (non-trivial) parameters and the reference holding the same ones."""
    torch.manual_seed(seed)
    fast = EMA(channels, factor).to(dtype)
    with torch.no_grad():
        for p in fast.parameters():
            p.normal_(0.0, 0.5)
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
]


@pytest.mark.parametrize('b,c,h,w,factor', SHAPES)
@pytest.mark.parametrize('train', [True, False])
def test_matches_reference_fp64(b, c, h, w, factor, train):
    fast, ref = _pair(c, factor)
    fast.train(train), ref.train(train)
    _assert_same_function(fast, ref, torch.randn(b, c, h, w, dtype=torch.float64) * 2 + 0.5, rtol=1e-9)


@pytest.mark.parametrize('c,s', [(256, 56), (512, 28), (1024, 14), (2048, 7)])
def test_matches_reference_fp32_resnet50_stages(c, s):
    fast, ref = _pair(c, dtype=torch.float32)
    _assert_same_function(fast, ref, torch.randn(2, c, s, s), rtol=1e-4)


@pytest.mark.parametrize('b,c,h,w,factor', SHAPES)
def test_matches_reference_fp32_odd_shapes(b, c, h, w, factor):
    fast, ref = _pair(c, factor, dtype=torch.float32)
    _assert_same_function(fast, ref, torch.randn(b, c, h, w), rtol=1e-4)


def test_channels_last_input():
    fast, ref = _pair(64, dtype=torch.float32)
    x = torch.randn(2, 64, 9, 7).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fast(x), ref(x.contiguous()), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_autocast(dtype):
    fast, ref = _pair(128, dtype=torch.float32)
    x = torch.randn(2, 128, 14, 14)
    with torch.autocast('cpu', dtype=dtype):
        y = fast(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # Low precision, so a loose bound: the point is that it runs and stays the same function.
    torch.testing.assert_close(y.float(), ref(x), rtol=0.05, atol=0.05)
    y.float().sum().backward()


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
def test_inference_path_matches_reference_and_keeps_input(mode, layout):
    """Without autograd (in-place steps take other paths there): same function, input untouched."""
    fast, ref = _pair(96, dtype=torch.float32)
    x = torch.randn(2, 96, 9, 7).contiguous(memory_format=layout)
    before = x.clone()
    with getattr(torch, mode)():
        y = fast(x)
    assert torch.equal(x, before)
    torch.testing.assert_close(y, ref(x), rtol=1e-4, atol=1e-5)
