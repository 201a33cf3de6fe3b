"""`ema-hub benchmark --quick` runs and prints every row of its table (no timing assertions); `python -m
ema_hub_benchmarks.speed`, the same function behind another entry point, answers a bad device in one line."""
import datetime
import re
import subprocess
import sys

import pytest
import torch

from ema_hub_benchmarks.speed import cpu_target_count
from support.cli import run
from support.models import acting_layer

NUM = r'\s+([0-9.]+)'


def test_benchmark_quick_prints_full_table():
    """Eager mode end to end (compiling and exporting three ResNet-50s would take minutes: the other modes'
    runners are checked below on a small network)."""
    proc = run('ema-hub', 'benchmark', '--quick', '--modes', 'eager')
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for shape in ['(256,7)', '(512,3)', '(1024,3)', '(2048,3)']:
        m = re.search(re.escape(shape) + NUM * 2 + r'\s+([0-9.]+)x' + NUM * 2 + r'\s+([0-9.]+)x', out)
        assert m, f'no layer row for {shape} in:\n{out}'
        assert float(m.group(3)) > 0 and float(m.group(6)) > 0
    for kind in ['inference', 'train']:
        m = re.search(r'^eager\s+' + kind + NUM * 7 + r'\s*$', out, re.M)
        assert m, f'no eager {kind} row in:\n{out}'
        assert all(float(v) > 0 for v in m.groups())
    for net in ['resnet50', 'resnet50_ema', 'paper_form']:
        m = re.search(r'^' + net + NUM * 4 + r'\s*$', out, re.M)
        assert m, f'no memory row for {net} in:\n{out}'
        if net == 'resnet50':
            assert [m.group(i) for i in (2, 4)] == ['1.00'] * 2
    targets = re.findall(r'^(MET|NOT MET) +(.+)$', out, re.M)
    assert len(targets) == cpu_target_count(['eager']), out
    assert all('eager' in name or 'layer' in name for _, name in targets), out


def test_benchmark_without_the_paper_form_under_amp_in_markdown():
    """--no-paper-form leaves the paper form's network out (its compiled training step takes an hour to compile
    here): dashes in its columns, no memory row; the layer table still compares against it. --amp times the
    networks under bf16 autocast, training step included. --markdown: the same tables as the docs hold them,
    under a heading with the date, the machine and the versions."""
    proc = run('ema-hub', 'benchmark', '--quick', '--modes', 'eager', '--no-paper-form', '--amp', '--markdown')
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith(f'## CPU, {datetime.date.today().isoformat()}\n'), out
    assert '2 threads, networks in bf16 autocast' in out and f'torch {torch.__version__}' in out, out
    cell = r' \| ([0-9.]+)'
    for kind in ['inference', 'train']:
        m = re.search(r'^\| eager \| ' + kind + cell * 2 + r' \| -' + cell + r' \| - \| -' + cell + r' \|$', out, re.M)
        assert m, f'no eager {kind} row with the paper form left out in:\n{out}'
    assert re.search(r'^\| resnet50_ema' + cell * 4 + r' \|$', out, re.M) and '| paper_form' not in out, out
    assert re.search(r'^\| \(256,7\)' + cell * 2 + r' \| ([0-9.]+)x \|', out, re.M), out
    assert len(re.findall(r'^\|(---\|)+$', out, re.M)) == 4, out  # layer, networks, memory, targets: a rule each


@pytest.mark.parametrize('mode', ['compiled', 'onnxruntime'])
def test_runners_of_the_other_modes(mode, tmp_path):
    """What the compiled and onnxruntime modes time computes the network's output and, in training, its
    gradient (a small network with EMA: compiling ResNets takes minutes here)."""
    from torch import nn

    from ema_hub_benchmarks.speed import _Runners

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), acting_layer(32, 8), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 7))
    x, grad = torch.randn(2, 3, 16, 12), torch.randn(2, 7)
    runners = _Runners(mode, {'net': net}, x, grad, threads=2, folder=str(tmp_path))
    with torch.no_grad():
        want = net.eval()(x)
    got = torch.as_tensor(runners.get('net', 'inference')())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())
    if mode == 'onnxruntime':
        assert runners.get('net', 'train') is None and runners.export_s['net'] > 0
    else:
        dx = runners.get('net', 'train')()
        xr = x.clone().requires_grad_()
        net.train()(xr).backward(grad)
        torch.testing.assert_close(dx, xr.grad, rtol=0, atol=1e-4 * xr.grad.abs().max().item())


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the answer on a machine without CUDA')
def test_benchmark_without_cuda_says_so_in_one_line():
    proc = run('ema-hub', 'benchmark', '--device', 'cuda')
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: CUDA is not available on this machine: benchmark with --device cpu']
    module = subprocess.run([sys.executable, '-m', 'ema_hub_benchmarks.speed', '--device', 'cuda'], capture_output=True,
                            text=True, timeout=300)
    assert module.returncode == 2 and module.stderr.strip().endswith('benchmark with --device cpu'), module.stderr
