"""What timm's own scripts do with the variants, as users run them: ``python -m ema_hub.run SCRIPT`` (the scripts
are in timm's repository, not its wheel, so a script of the same shape stands in), train.py's ``--torchscript``
(train, then validate under inference_mode) and onnx_export.py's ``timm.utils.onnx.onnx_export`` with either
exporter, with grad enabled as timm exports, checked in onnxruntime."""
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from timm.utils.onnx import onnx_export

from ema_hub import EMA
from support.models import FAMILIES, acting, rel_err

pytestmark = pytest.mark.filterwarnings('ignore:`torch.jit.script` is deprecated:FutureWarning')


def test_run_imports_the_package_then_runs_the_script(tmp_path):
    """``python -m ema_hub.run SCRIPT ARGS`` runs SCRIPT as ``__main__`` with its own argv, after ``import ema_hub``
    (so timm's registry has the variants), with the script's folder importable, as ``python SCRIPT`` would."""
    (tmp_path / 'helper.py').write_text('NAME = "resnet18_ema"\n')
    script = tmp_path / 'train.py'
    script.write_text(
        'import sys, timm\n'
        'from helper import NAME\n'
        'assert __name__ == "__main__"\n'
        'model = timm.create_model(sys.argv[2], num_classes=int(sys.argv[4]))\n'
        'print(sys.argv[1:], NAME, type(model).__name__, model.num_classes, timm.is_model(NAME))\n')
    proc = subprocess.run([sys.executable, '-m', 'ema_hub.run', str(script), '--model', 'resnet18_ema',
                           '--num-classes', '3'], capture_output=True, text=True, cwd=tmp_path.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["['--model',", "'resnet18_ema',", "'--num-classes',", "'3']", 'resnet18_ema',
                                   'ResNet', '3', 'True']
    # without it, the variant is unknown to timm: what the runner is for
    plain = subprocess.run([sys.executable, str(script), '--model', 'resnet18_ema', '--num-classes', '3'],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and 'Unknown model (resnet18_ema)' in plain.stderr
    missing = subprocess.run([sys.executable, '-m', 'ema_hub.run', 'no_such_train.py'], capture_output=True, text=True)
    assert missing.returncode == 2 and missing.stderr.startswith('error: no_such_train.py: no such script')
    assert len(missing.stderr.splitlines()) == 1


@pytest.mark.parametrize('model', [lambda: EMA(64), lambda: timm.create_model('resnet18_ema', num_classes=3)],
                         ids=['EMA(64)', 'resnet18_ema'])
def test_torchscript_trains_then_validates_in_inference_mode(model):
    """train.py --torchscript: ``torch.jit.script(model)``, training steps, then ``.eval()`` and validation under
    ``torch.inference_mode()``, with TorchScript's default (profiling) executor; the scripted model then computes
    what the eager one does."""
    torch.manual_seed(0)
    eager = acting(model()).train()
    scripted = torch.jit.script(eager)
    optimizer = torch.optim.SGD(scripted.parameters(), lr=0.01)
    shape = (2, 64, 8, 8) if isinstance(eager, EMA) else (2, 3, 64, 64)
    for _ in range(3):
        optimizer.zero_grad()
        scripted(torch.randn(shape)).square().mean().backward()
        optimizer.step()
    scripted.eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        got = scripted(x)
        got_again = scripted(x)
    with torch.no_grad():
        want = eager.eval()(x)
    assert rel_err(got, want) <= 1e-4 and torch.equal(got, got_again)


def _onnx_matches(path, model, shape) -> float:
    from ema_hub.export import onnx_session
    session = onnx_session(path)
    x = torch.randn(shape)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    return float(np.abs(got - want).max() / np.abs(want).max())


# The TorchScript-based exporter on every family; the torch.export-based one (about 40 s a network here) on the
# two kinds of graft, since the EMA module records the same graph in every family.
@pytest.mark.parametrize('family,dynamo', [(f, False) for f in FAMILIES] + [('resnet', True), ('add_ema', True)])
def test_timm_onnx_export(family, dynamo, tmp_path):
    """timm's ``onnx_export`` (what its onnx_export.py calls), parameters requiring grad as timm leaves them,
    dynamic batch and size: the file passes onnx's checker and timm's forward check, and runs in onnxruntime at
    another batch and size as PyTorch does."""
    pytest.importorskip('onnxruntime')
    torch.manual_seed(0)
    model = acting(FAMILIES[family]())
    assert all(p.requires_grad for p in model.parameters())
    path = tmp_path / 'model.onnx'
    onnx_export(model, str(path), example_input=torch.randn(2, 3, 64, 64), use_dynamo=dynamo, dynamic_size=True,
                check_forward=True, optimize=False)
    assert _onnx_matches(path, model.eval(), (3, 3, 96, 80)) <= 1e-5
