"""EMA's GPU forward (ema_hub/layers/ema_triton.py and ema._forward_gpu) without a GPU.

The Triton kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before Triton is imported, hence a
subprocess) on CPU tensors, against the paper's form in fp64: those tests need Triton and are skipped without
it. Which forward a CUDA input would take is checked in-process, with the kernels' availability switched on and
the kernel call recorded: those need no Triton and always run.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import ema

_INTERPRETED = textwrap.dedent('''
    import json, torch
    from ema_hub.layers import ema as E, ema_triton
    from ema_hub.reference import ReferenceEMA
    E.ema_triton = ema_triton

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()

    def layer(ch, factor, seed):
        torch.manual_seed(seed)
        m = E.EMA(ch, factor)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0.0, 0.5)
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
        out, gate, pooled, edges, s, q = E._forward_gpu(x, m.groups, m._params(), m.tap_edges, m.gn.eps, True)
        gx = E._grouped(x.float(), m.groups).contiguous()
        want_pooled, want_edges = E._pool(gx)
        res['forward'].append(dict(case=[b, ch, h, w, factor, layout, dtype], err=rel(out, ref(x.double())),
                                   dtype=str(out.dtype), strides=list(out.stride()) == list(x.stride()),
                                   pooled=rel(pooled, want_pooled), edges=rel(edges, want_edges)))

    # Training through the hand-written backward, its forward on the kernels.
    E._gpu_kernels = lambda x: True
    for i, (b, ch, h, w) in enumerate([(2, 64, 6, 6), (2, 32, 9, 4)]):
        m, ref = layer(ch, 8, 10 + i)
        x = torch.randn(b, ch, h, w) + 0.3
        dy = torch.randn_like(x)
        errs = []
        for net, dtype in ((m, torch.float32), (ref, torch.float64)):
            xi = x.detach().to(dtype).requires_grad_()
            net(xi).backward(dy.to(dtype))
            errs.append([xi.grad] + [p.grad for p in net.parameters()])
        res['backward'].append(max(rel(a, b) for a, b in zip(*errs)))
    print(json.dumps(res))
''')


@pytest.fixture(scope='module')
def interpreted():
    pytest.importorskip('triton')  # only the kernels themselves need it
    run = subprocess.run([sys.executable, '-c', _INTERPRETED], capture_output=True, text=True, timeout=600,
                         env={**os.environ, 'TRITON_INTERPRET': '1'})
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


@pytest.fixture
def kernels_recorded(monkeypatch):
    """CPU inputs routed as CUDA ones would be: the kernels available, each call recorded and then computed by
    the traceable form (the same function, and something torch.compile can trace on the CPU)."""
    calls = []

    def record(x, groups, params, tap_edges, eps, for_backward):
        calls.append(for_backward)
        return ema.ema_traceable(x, groups, params, tap_edges, eps), None

    monkeypatch.setattr(ema, '_gpu_kernels', lambda x: True)
    monkeypatch.setattr(ema, '_forward_gpu', record)
    return calls


def test_inference_under_autocast_and_compile_takes_the_kernels(kernels_recorded):
    layer, x = EMA(64).eval(), torch.randn(2, 64, 6, 6)
    with torch.inference_mode(), torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x.bfloat16())
    assert kernels_recorded == [False]
    with torch.no_grad():
        torch.compile(layer, fullgraph=True)(x)  # traced through the kernels' branch, no graph break
    assert kernels_recorded == [False, False]


def test_gradients_and_tracing_take_the_traceable_form(kernels_recorded):
    layer, x = EMA(64), torch.randn(2, 64, 6, 6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        layer(x.bfloat16()).float().sum().backward()  # autocast training: autograd through PyTorch ops
    assert kernels_recorded == []
    # A TorchScript trace records PyTorch ops, not kernels. (The decision itself: tracing the layer here would
    # leave a traced EMA type behind that later scripting of EMA collides with.)
    params, decisions = [p.detach() for p in layer._params()], []
    torch.jit.trace(lambda t: decisions.append(ema._gpu_inference(t, params)) or t * 2, x, check_trace=False)
    assert decisions == [False] and ema._gpu_inference(x, params)
