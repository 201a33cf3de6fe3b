"""EMA's CUDA forward (ema_hub/layers/ema_triton.py and ops.forward_triton) without a GPU.

The Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, hence a
subprocess) on CPU tensors, against the paper's form in fp64: those tests need Triton and are skipped without
it. Which forward a CUDA input takes, and the operator's fake shapes there, are checked in-process on fake CUDA
tensors: those need neither Triton nor a GPU and always run.
"""
import json
import os

import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import ops
from support.scripts import run_script

_INTERPRETED = '''
    import json, torch
    from ema_hub.layers import algebra, eager, ops, ema_triton
    from ema_hub.reference import ReferenceEMA
    from support.models import acting_layer
    ops.ema_triton = ema_triton

    def rel(a, b):  # relative to the whole tensor's norm: a few near-zero entries say nothing of the kernel
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    def layer(ch, factor, seed):
        m = acting_layer(ch, factor, seed)
        ref = ReferenceEMA(ch, m.groups).double()
        ref.load_state_dict(m.state_dict())
        return m, ref

    res = {'forward': [], 'backward': []}
    # (batch, channels, H, W, factor, layout, dtype): ResNet-like groups, odd maps (1x1, one row, one column,
    # taller than a tile), a channel count the factor does not divide (144 -> 24 groups of 6), bf16 input.
    cases = [(2, 64, 7, 8, 8, 'channels_last', 'float32'), (2, 32, 5, 5, 8, 'contiguous', 'float32'),
             (2, 16, 1, 1, 8, 'contiguous', 'float32'), (1, 24, 1, 9, 8, 'channels_last', 'float32'),
             (1, 24, 9, 1, 8, 'contiguous', 'float32'), (1, 16, 70, 3, 8, 'contiguous', 'float32'),
             (1, 144, 6, 5, 32, 'channels_last', 'float32'), (2, 128, 6, 6, 8, 'channels_last', 'bfloat16')]
    for i, (b, ch, h, w, factor, layout, dtype) in enumerate(cases):
        m, ref = layer(ch, factor, i)
        x = torch.randn(b, ch, h, w) * 2 + 0.5
        x = x.contiguous(memory_format=getattr(torch, layout if layout == 'channels_last' else 'contiguous_format'))
        x = x.to(getattr(torch, dtype))
        with torch.no_grad():
            out, gate, pooled, edges, sums = ops.forward_triton(x, m.params(), m.tap_edges, m.groups, m.gn.eps)
        want_pooled, want_edges = eager.pool(algebra.grouped(x.float(), m.groups).contiguous())
        res['forward'].append(dict(case=[b, ch, h, w, factor, layout, dtype], err=rel(out, ref(x.double())),
                                   dtype=str(out.dtype), strides=list(out.stride()) == list(x.stride()),
                                   pooled=rel(pooled, want_pooled), edges=rel(edges, want_edges)))

    # Training: the backward operator on the statistics the kernels' forward keeps.
    for i, (b, ch, h, w) in enumerate([(2, 64, 6, 6), (2, 32, 9, 4)]):
        m, ref = layer(ch, 8, 10 + i)
        x = torch.randn(b, ch, h, w) + 0.3
        dy = torch.randn_like(x)
        with torch.no_grad():
            _, *stats = ops.forward_triton(x, m.params(), m.tap_edges, m.groups, m.gn.eps)
            got = ops.ema_backward(dy, x, *stats, *m.params(), m.tap_edges, m.groups, m.gn.eps)
        xr = x.double().requires_grad_()
        ref(xr).backward(dy.double())
        want = [xr.grad] + [p.grad for p in (ref.conv1x1.weight, ref.conv1x1.bias, ref.gn.weight, ref.gn.bias,
                                             ref.conv3x3.weight, ref.conv3x3.bias)]  # the operator's order
        res['backward'].append(max(rel(a, b) for a, b in zip(got, want)))
    print(json.dumps(res))
'''


@pytest.fixture(scope='module')
def interpreted():
    pytest.importorskip('triton')  # only the kernels themselves need it
    run = run_script(_INTERPRETED, env={**os.environ, 'TRITON_INTERPRET': '1'}, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kernels_compute_the_paper_function(interpreted):
    for r in interpreted['forward']:
        tol = 1e-2 if r['case'][-1] == 'bfloat16' else 1e-5  # bf16: the output's own rounding (2^-8)
        assert r['err'] < tol, r
        assert r['dtype'] == 'torch.' + r['case'][-1], r  # the input's dtype out
        assert r['strides'], r  # channels_last stays channels_last: nothing copied into grouped layout
        assert r['pooled'] < 1e-5 and r['edges'] < 1e-5, r  # what the backward keeps, as the PyTorch ops make it


def test_gradients_through_the_kernels_forward(interpreted):
    assert all(err < 1e-4 for err in interpreted['backward']), interpreted['backward']


def _fake_cuda(*shape, dtype=torch.float32):
    """A CUDA tensor's shape, dtype and device without a GPU (what torch.compile traces with)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        return torch.empty(*shape, dtype=dtype, device='cuda')


def test_cuda_forward_takes_the_kernels_for_float_dtypes(monkeypatch):
    """With Triton present, a CUDA input of float32, bfloat16 or float16 runs the Triton kernels (eager, autocast
    and compiled alike: they all call the operator); float64 and CPU input take the PyTorch ops."""
    monkeypatch.setattr(ops, 'ema_triton', object())
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert ops.triton_kernels(_fake_cuda(2, 64, 6, 6, dtype=dtype))
    assert not ops.triton_kernels(_fake_cuda(2, 64, 6, 6, dtype=torch.float64))
    assert not ops.triton_kernels(torch.randn(2, 64, 6, 6))
    monkeypatch.setattr(ops, 'ema_triton', None)  # no Triton: PyTorch ops everywhere
    assert not ops.triton_kernels(_fake_cuda(2, 64, 6, 6))


def test_fake_shapes_on_cuda_match_the_kernels():
    """The operator's fake gives a CUDA output x's strides (the kernels write channels_last in place) and float32
    statistics for half-precision input."""
    layer = EMA(64)
    x = _fake_cuda(2, 64, 6, 5, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True):
        out, gate, pooled, edges, sums = ops.ema_forward(x, *layer.params(), layer.tap_edges, layer.groups, 1e-5)
    assert out.dtype == torch.bfloat16 and out.stride() == x.stride()
    assert (gate.shape, pooled.shape, edges.shape, sums.shape) == ((64, 6, 5), (64, 2, 11), (64, 2, 9), (2, 64, 2))
    assert {t.dtype for t in (gate, pooled, edges, sums)} == {torch.float32}
