"""Shared fixtures: a loopback Hugging Face Hub the real client and timm talk to, with a per-test cache; generated
images, a small labelled checkpoint, and the digits fine-tuning run (once per session: it takes minutes).

Helpers that are not fixtures live in tests/support/ (tests/ is on sys.path): test modules never import each other.
"""
import atexit
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

from support.hub_server import FakeHub, client_env, use_fake_hub

# The suite runs as CI services run it, with CI=true (inductor is stricter then: it refuses a custom operator that
# has a global decomposition, for one), and with caches of its own, cold, so that nothing an earlier run compiled
# (inductor's graphs, Triton's kernels, ema_hub's CPU kernels) can hide a failure. Set before torch is imported,
# here and in every process the tests start.
_CACHES = tempfile.mkdtemp(prefix='ema-hub-test-caches-')
atexit.register(shutil.rmtree, _CACHES, ignore_errors=True)
os.environ.update({'CI': 'true', 'TORCHINDUCTOR_CACHE_DIR': os.path.join(_CACHES, 'inductor'),
                   'TRITON_CACHE_DIR': os.path.join(_CACHES, 'triton'), 'XDG_CACHE_HOME': os.path.join(_CACHES, 'xdg')})

# Under pytest-xdist each worker keeps to a core of its own, and so do the processes it starts (the package sizes
# its threads and decoders to this process's share of the cores): workers with a thread per core each would
# oversubscribe CI's two cores several times over.
_WORKER = os.environ.get('PYTEST_XDIST_WORKER')
if _WORKER and hasattr(os, 'sched_setaffinity'):
    _cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {_cpus[int(_WORKER.removeprefix('gw')) % len(_cpus)]})
    import torch
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope='session')
def _no_real_hub(tmp_path_factory) -> Iterator[None]:
    """No test may reach the real Hub or the developer's cache: point both at a dead end unless a test asks."""
    import huggingface_hub.constants as hc
    saved = hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE
    hc.ENDPOINT = 'http://127.0.0.1:9'  # discard port: nothing listens
    hc.HUGGINGFACE_CO_URL_TEMPLATE = hc.ENDPOINT + '/{repo_id}/resolve/{revision}/{filename}'
    hc.HF_HUB_CACHE = str(tmp_path_factory.mktemp('hf_cache'))
    yield
    hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE = saved


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / 'hf_home'


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Iterator[FakeHub]:
    """The real huggingface_hub client and timm talk to an in-memory Hub; cache under tmp; undone after the test."""
    with FakeHub() as hub:
        use_fake_hub(monkeypatch, hub, hf_home)
        yield hub


@pytest.fixture
def hub_env(fake_hub: FakeHub, hf_home: Path) -> Dict[str, str]:
    """Environment for subprocesses (the CLI) that talk to ``fake_hub``; add HF_HUB_OFFLINE='1' for offline runs."""
    return {**os.environ, **client_env(fake_hub, hf_home), 'HF_HUB_OFFLINE': '0'}


# -- inputs and models --------------------------------------------------------------------------------------------

@pytest.fixture(scope='session')
def inputs(tmp_path_factory) -> Dict[str, Path]:
    """One image of every kind (support.images.GOOD) and every broken file (BAD) in one folder: name -> path.
    Read-only: tests that need to add files use their own folder."""
    from support.images import make_inputs
    return make_inputs(tmp_path_factory.mktemp('inputs'))


@pytest.fixture(scope='session')
def checkpoint(tmp_path_factory) -> Path:
    """A 5-class resnet18_ema with random weights, every EMA acting, and label names (support.models.LABELS), in
    timm's Hub layout."""
    from support.models import tiny_checkpoint
    return tiny_checkpoint(tmp_path_factory.mktemp('ckpt') / 'tiny')


@pytest.fixture(scope='session')
def tiny_model():
    """A 5-class resnet18_ema with random weights, every EMA acting, in eval mode. Shared: use it, never change it."""
    import torch

    from ema_hub.hub import create_model
    from support.models import acting
    torch.manual_seed(0)
    return acting(create_model('resnet18_ema', pretrained=False, num_classes=5))


@pytest.fixture
def kernel_calls(monkeypatch):
    """How often the compiled CPU kernels ran: {'forward': n, 'backward': n}."""
    from ema_hub.layers import native
    assert native.available(), 'the native kernel did not build: is a C compiler with OpenMP installed?'
    calls = {'forward': 0, 'backward': 0}
    for name in calls:
        def counted(*a, _f=getattr(native, name), _name=name):
            calls[_name] += 1
            return _f(*a)
        monkeypatch.setattr(native, name, counted)
    return calls


# -- the digits fine-tuning run (test_finetune.py, test_validate.py) ----------------------------------------------

@pytest.fixture(scope='session')
def digits(tmp_path_factory) -> Path:
    """All of scikit-learn's digits as train/ and val/ (80/20, stratified) ImageFolders."""
    pytest.importorskip('sklearn')
    from support.digits import write_digits
    return write_digits(tmp_path_factory.mktemp('digits'))


@pytest.fixture(scope='session')
def small_digits(tmp_path_factory) -> Path:
    """24 training and 6 validation images per digit: for the quick fine-tuning runs."""
    pytest.importorskip('sklearn')
    from support.digits import write_digits
    return write_digits(tmp_path_factory.mktemp('small_digits'), per_class=(24, 6))


@pytest.fixture(scope='session')
def trained(digits, tmp_path_factory):
    """The issue's command line, once per session (minutes): ``ema-hub finetune resnet18_ema DATA --no-pretrained
    --epochs 8 --img-size 32 --output DIR``. Returns (the output folder, its metrics.json, the process).

    Under pytest-xdist the first worker that needs it runs it, under a file lock in the session's shared temporary
    folder, and the others wait for it and share the folder and the process's output."""
    import fcntl
    import subprocess
    from support.cli import run_module

    base = tmp_path_factory.getbasetemp()
    shared = (base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base) / 'digits_run'
    shared.mkdir(exist_ok=True)
    out, record = shared / 'r18', shared / 'process.json'
    with open(shared / 'lock', 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not record.exists():
            start = time.perf_counter()
            proc = run_module(['finetune', 'resnet18_ema', str(digits), '--no-pretrained', '--epochs', '8',
                               '--img-size', '32', '--output', str(out)])
            elapsed = time.perf_counter() - start
            assert proc.returncode == 0, proc.stderr[-3000:]
            record.write_text(json.dumps({'args': proc.args, 'returncode': proc.returncode, 'stdout': proc.stdout,
                                          'stderr': proc.stderr}))
            metrics = json.loads((out / 'metrics.json').read_text())
            print(f'\ndigits finetune: top-1 {metrics["top1"]:.2f} %, top-5 {metrics["top5"]:.2f} %, '
                  f'train {metrics["train_time_s"]:.0f} s, wall {elapsed:.0f} s')
    proc = subprocess.CompletedProcess(**json.loads(record.read_text()))
    return out, json.loads((out / 'metrics.json').read_text()), proc


@pytest.fixture(scope='session')
def measured(trained, digits) -> Dict[str, float]:
    """``support.digits.independent_eval`` of the trained folder on the digits' val/ split."""
    from support.digits import independent_eval
    return independent_eval(trained[0], digits / 'val')

