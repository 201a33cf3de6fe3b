"""``ema-hub export`` and ema_hub/export.py: ONNX files that run in onnxruntime alone, torch.export programs, and
the errors users meet."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ema_hub.export import export_model
from support.cli import run
from support.models import train_py_checkpoint

# What an ONNX file may contain: operators of the standard domain, nothing a runtime would need ema_hub for.
STANDARD_DOMAINS = {'', 'ai.onnx'}


def _differences(stdout: str):
    """(shape, relative difference) from the command's check lines."""
    rows = []
    for line in stdout.splitlines():
        if ' vs PyTorch at ' in line:
            shape = line.split(' vs PyTorch at ')[1].split(':')[0]
            rows.append((shape, float(line.rsplit('(', 1)[1].split()[0])))
    return rows


def test_onnx_with_dynamic_size_runs_in_onnxruntime_alone(checkpoint, tmp_path):
    """The CLI checks the file at the traced size and at a non-square one; a fresh process with only onnxruntime and
    numpy (no torch) runs it at a third size and gets PyTorch's output."""
    out = tmp_path / 'model.onnx'
    proc = run('ema-hub', 'export', f'local-dir:{checkpoint}', str(out), '--dynamic-size', '--img-size', '96 80')
    assert proc.returncode == 0, proc.stderr
    diffs = _differences(proc.stdout)
    assert len(diffs) == 2 and diffs[0][0] != diffs[1][0], proc.stdout
    assert all(rel <= 1e-4 for _, rel in diffs), proc.stdout

    import onnx
    graph = onnx.load(str(out)).graph
    assert {n.domain for n in graph.node} <= STANDARD_DOMAINS

    x = np.random.default_rng(0).standard_normal((3, 3, 70, 130)).astype(np.float32)
    np.save(tmp_path / 'x.npy', x)
    script = ('import sys, numpy as np, onnxruntime as ort\n'
              's = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])\n'
              'y = s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0]\n'
              'assert "torch" not in sys.modules and "ema_hub" not in sys.modules\n'
              'np.save(sys.argv[3], y)\n')
    fresh = subprocess.run([sys.executable, '-I', '-c', script, str(out), str(tmp_path / 'x.npy'),
                            str(tmp_path / 'y.npy')], capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr
    from ema_hub.hub import create_model
    model = create_model(f'local-dir:{checkpoint}').eval()
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    got = np.load(tmp_path / 'y.npy')
    assert got.shape == (3, 5)
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_pt2_round_trip(checkpoint, tmp_path):
    report = export_model(f'local-dir:{checkpoint}', tmp_path / 'model.pt2', img_size=(64,), batch_size=3)
    assert report.format == 'pt2' and report.dynamic == ['batch'] and report.input_shape == (3, 3, 64, 64)
    assert list(report.max_rel_diff.values()) == [0.0]  # the same operator and kernels as eager
    program = torch.export.load(str(tmp_path / 'model.pt2')).module()
    with torch.no_grad():
        assert program(torch.randn(5, 3, 64, 64)).shape == (5, 5)  # another batch size


def test_export_timm_training_checkpoint(tmp_path):
    """``--weights model_best.pth.tar`` as timm's train.py writes it (its args pickled): the program computes its
    state_dict, or with --use-ema its averaged state_dict_ema, and stderr says which in one line."""
    model, averaged, path = train_py_checkpoint(tmp_path / 'run')
    x = torch.randn(2, 3, 64, 64)
    outputs = []
    for flags, reference, entry in (([], model, 'state_dict'), (['--use-ema'], averaged, 'state_dict_ema')):
        out = tmp_path / f'{entry}.pt2'
        proc = run('ema-hub', 'export', 'resnet18_ema', str(out), '--img-size', '64', '--weights', str(path), *flags)
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr.splitlines() == [f'weights: model_best.pth.tar, entry {entry}']
        with torch.no_grad():
            outputs.append(torch.export.load(str(out)).module()(x))
            torch.testing.assert_close(outputs[-1], reference(x))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # two sets of weights, two functions


def test_bad_suffix_and_missing_extra(checkpoint, tmp_path):
    proc = run('ema-hub', 'export', f'local-dir:{checkpoint}', str(tmp_path / 'model.tflite'))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        'error: model.tflite: the output suffix picks the format, one of .onnx, .pt2']
    # onnxruntime missing: a package of that name that cannot be imported, first on the path
    shadow = tmp_path / 'shadow'
    shadow.mkdir()
    (shadow / 'onnxruntime.py').write_text('raise ImportError("onnxruntime is not installed")\n')
    import os
    env = {**os.environ, 'PYTHONPATH': f'{shadow}{os.pathsep}{os.environ.get("PYTHONPATH", "")}'}
    proc = run('ema-hub', 'export', f'local-dir:{checkpoint}', str(tmp_path / 'model.onnx'), env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: ONNX export needs onnxruntime; install them with pip install 'ema-hub[export]'"]
    assert not (tmp_path / 'model.onnx').exists()


@pytest.mark.parametrize('size', ['0', 'a b', '1 2 3'])
def test_bad_image_size_is_a_usage_error(size, tmp_path):
    proc = run('ema-hub', 'export', 'resnet18_ema', str(tmp_path / 'm.onnx'), '--img-size', size)
    assert proc.returncode == 2 and 'is not H or "H W"' in proc.stderr
