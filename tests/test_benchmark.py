"""`ema-hub benchmark --quick` runs and prints every row of its table (no timing assertions); `python -m
ema_hub_benchmarks.speed`, the same function behind another entry point, answers a bad device in one line."""
import re
import subprocess
import sys

import pytest
import torch

from ema_hub_benchmarks.speed import cpu_target_count
from support.cli import run

NUM = r'\s+([0-9.]+)'


def test_benchmark_quick_prints_full_table():
    proc = run('ema-hub', 'benchmark', '--quick')
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for shape in ['(256,7)', '(512,3)', '(1024,3)', '(2048,3)']:
        m = re.search(re.escape(shape) + NUM * 2 + r'\s+([0-9.]+)x' + NUM * 2 + r'\s+([0-9.]+)x', out)
        assert m, f'no layer row for {shape} in:\n{out}'
        assert float(m.group(3)) > 0 and float(m.group(6)) > 0
    for net in ['resnet50', 'resnet50_ema', 'paper_form']:
        m = re.search(r'^' + net + NUM * 8 + r'\s*$', out, re.M)
        assert m, f'no network row for {net} in:\n{out}'
        assert all(float(v) > 0 for v in m.groups())
        if net == 'resnet50':
            assert [m.group(i) for i in (2, 4, 6, 8)] == ['1.00'] * 4
    targets = re.findall(r'^(MET    |NOT MET) (.+)$', out, re.M)
    assert len(targets) == cpu_target_count(), out


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the answer on a machine without CUDA')
def test_benchmark_without_cuda_says_so_in_one_line():
    proc = run('ema-hub', 'benchmark', '--device', 'cuda')
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: CUDA is not available on this machine: benchmark with --device cpu']
    module = subprocess.run([sys.executable, '-m', 'ema_hub_benchmarks.speed', '--device', 'cuda'], capture_output=True,
                            text=True, timeout=300)
    assert module.returncode == 2 and module.stderr.strip().endswith('benchmark with --device cpu'), module.stderr
