"""`python -m ema_hub.benchmark --quick` runs and prints every row of its table (no timing assertions)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM = r'\s+([0-9.]+)'


def test_benchmark_quick_prints_full_table():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get('PYTHONPATH')])))
    out = subprocess.run([sys.executable, '-m', 'ema_hub.benchmark', '--quick'], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600, check=True).stdout
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
    assert len(targets) == 12, out
