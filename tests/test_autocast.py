"""Mixed precision: every family under bfloat16 and float16 autocast on the CPU, in a training step and in eval, in
eager, compiled and exported modes, and ``ema-classify --amp``. The operators' policy (ema_hub/layers/ops.py):
inputs as autocast hands them, float32 inside, x's dtype out.

Networks with random weights are too ill-conditioned in half precision to compare their logits with float32's
(plain resnet18 and mobilenetv2_100 differ by 40-100 %), so each EMA layer is checked where it runs: on the
half-precision map the network hands it, against the same layer in float32 on that map widened."""
import json

import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import native
from support.cli import run
from support.models import FAMILIES, acting, rel_err

HALF = [torch.bfloat16, torch.float16]
# Rounding the output (and, in training, the gradient the layer receives) to the half dtype, relative to the largest
# value: bfloat16 keeps 8 significant bits, float16 11; each bound is about four roundings.
BOUND = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _ema_inputs(model: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype):
    """Runs ``model`` under autocast (no grad) and returns its output and each EMA layer with the map it got."""
    seen = []
    hooks = [m.register_forward_hook(lambda m, args, out: seen.append((m, args[0].detach())))
             for m in model.modules() if isinstance(m, EMA)]
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        out = model(x)
    for h in hooks:
        h.remove()
    return out, seen


def _layer_grads(layer: EMA, x: torch.Tensor, dy: torch.Tensor, dtype=None):
    """The layer's output and the gradients of (output * dy).sum() for x and every parameter, under autocast of
    ``dtype`` (None: float32)."""
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast('cpu', dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        y = layer(x)
    (y.float() * dy).sum().backward()
    return y, [x.grad] + [p.grad.clone() for p in layer.parameters()]


@pytest.mark.parametrize('dtype', HALF, ids=str)
@pytest.mark.parametrize('family', FAMILIES)
def test_family_under_autocast(family, dtype):
    """Eval and a training step under autocast: every EMA layer gets the half-precision map, returns it in that
    dtype, and computes (output, input and parameter gradients) what float32 computes on it, within BOUND; the
    network's step reaches every EMA parameter."""
    torch.manual_seed(0)
    model = acting(FAMILIES[family]())
    x = torch.randn(2, 3, 64, 64)
    out, seen = _ema_inputs(model, x, dtype)
    assert torch.isfinite(out).all() and seen
    for layer, xh in seen:
        assert xh.dtype == dtype  # autocast's convolutions and linears hand the layer half precision
        dy = torch.randn(xh.shape)
        y, grads = _layer_grads(layer, xh, dy, dtype)
        y32, grads32 = _layer_grads(layer, xh.float(), dy)
        assert y.dtype == dtype and grads[0].dtype == dtype
        assert rel_err(y, y32) <= BOUND[dtype]
        assert rel_err(grads[0], grads32[0]) <= BOUND[dtype]
        # The parameters' together: a bias gradient alone is a sum that cancels to far below its terms.
        assert rel_err(torch.cat([g.flatten() for g in grads[1:]]), torch.cat([g.flatten() for g in grads32[1:]])) \
            <= BOUND[dtype]

    model.train()
    model.zero_grad()
    # float16 needs a loss scale, as in timm's train.py: one that neither underflows ConvNeXt's layer-scaled
    # gradients nor overflows float16 in MobileNetV2's (GradScaler's first, 2 ** 16, would skip this step)
    scaler = torch.amp.GradScaler('cpu', init_scale=2.0 ** 8, enabled=dtype is torch.float16)
    with torch.autocast('cpu', dtype=dtype):
        loss = model(x).float().logsumexp(1).mean()
    scaler.scale(loss).backward()
    for layer, _ in seen:
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().max() > 0 for g in grads)


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_half_precision_runs_the_compiled_kernels(kernel_calls, dtype):
    """Half-precision maps are widened in one pass for the CPU kernels, forward and backward, not sent down the
    PyTorch-ops path."""
    assert native.available()
    layer = acting(EMA(64))
    x = torch.randn(2, 64, 14, 14, dtype=dtype, requires_grad=True)
    layer(x).float().sum().backward()
    assert kernel_calls == {'forward': 1, 'backward': 1}


@pytest.mark.parametrize('dtype', HALF, ids=str)
def test_compiled_and_exported_under_autocast(kernel_calls, dtype):
    """torch.compile under autocast calls the same operators with the same dtypes as eager (outputs and the
    training step's gradients equal within BOUND); torch.export records an autocast region inside a forward, with
    the operator in it, and runs it back."""
    torch.manual_seed(0)
    net = acting(torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.BatchNorm2d(64), EMA(64),
                                     torch.nn.Conv2d(64, 8, 1))).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 10).contiguous(memory_format=torch.channels_last)  # as users of --channels-last run
    compiled = torch.compile(net, fullgraph=True)
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        want = net(x)
        before = kernel_calls['forward']
        got = compiled(x)
    assert kernel_calls['forward'] > before and got.dtype == want.dtype == dtype
    assert rel_err(got, want) <= BOUND[dtype]  # the convolutions' kernels may differ; EMA's are the same

    net.train()
    grads = []
    for model in (net, compiled):
        net.zero_grad()
        with torch.autocast('cpu', dtype=dtype):
            model(x).float().square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net[2].parameters()]))
    assert kernel_calls['backward'] >= 2
    assert rel_err(grads[1], grads[0]) <= BOUND[dtype]
    net.eval()

    class Amp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            with torch.autocast('cpu', dtype=dtype):
                return self.net(x)

    with torch.no_grad():
        want = Amp()(x)  # the training steps moved BatchNorm's statistics
        program = torch.export.export(Amp(), (x,))
        assert 'torch.ops.ema_hub.ema.default' in program.graph_module.print_readable(print_output=False)
        got = program.module()(x)
    assert got.dtype == dtype and rel_err(got, want) <= BOUND[dtype]


def test_classify_amp_on_the_cpu(checkpoint, inputs):
    """``ema-classify --amp`` on the CPU (bfloat16 autocast) classifies every image, with the top classes of
    float32 where they are clearly apart."""
    images = [str(inputs[name]) for name in ('exif6.jpg', 'gray.png', 'rgba.png')]
    records = {}
    for amp in ([], ['--amp']):
        proc = run('ema-classify', *images, '--model', f'local-dir:{checkpoint}', '--device', 'cpu',
                   '--format', 'jsonl', *amp)
        assert proc.returncode == 0, proc.stderr
        records[bool(amp)] = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r['path'] for r in records[True]] == images
    for half, full in zip(records[True], records[False]):
        assert 'error' not in half
        scores = {p['index']: p['score'] for p in full['predictions']}
        for p in half['predictions']:
            assert abs(p['score'] - scores.get(p['index'], 0.0)) <= 0.1
