"""Building, caching and turning off the compiled CPU forward (ema_hub/layers/native.py); what it computes is
tested against the reference in test_ema_layer.py, beside the PyTorch-ops form."""
import subprocess
import sys
import textwrap

import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import native


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty build cache and no library loaded yet; afterwards the session's library is loaded again."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    native._library.cache_clear()
    yield tmp_path / 'ema_hub' / 'native'
    monkeypatch.undo()
    native._library.cache_clear()


def test_builds_into_the_cache_and_loads_from_it(fresh_build):
    assert native.available()
    built = list(fresh_build.glob('ema_forward-*.so'))
    assert len(built) == 1 and not [p for p in fresh_build.iterdir() if p.is_dir()]  # no build folder left over
    mtime = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available() and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv('EMA_HUB_NATIVE', '0')
    assert not native.available()
    assert not fresh_build.exists()
    x = torch.randn(2, 64, 5, 5)
    assert not native.supports(x, list(EMA(64).parameters()))
    EMA(64)(x)  # the PyTorch ops run instead


def test_no_compiler_falls_back_quietly(fresh_build, monkeypatch, recwarn):
    monkeypatch.setenv('CC', 'no-such-compiler-ema-hub')
    assert not native.available()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


def test_failing_compiler_warns_once_and_falls_back(fresh_build, monkeypatch):
    monkeypatch.setenv('CC', 'false')  # found, exits 1: a compiler without OpenMP, say
    with pytest.warns(RuntimeWarning, match='could not build the native kernel'):
        assert not native.available()
    assert not native.available()  # decided once per process


def test_other_dtypes_and_devices_take_pytorch_ops():
    params = list(EMA(64).parameters())
    assert native.supports(torch.randn(2, 64, 5, 5), params)
    assert not native.supports(torch.randn(2, 64, 5, 5, dtype=torch.float64), params)
    assert not native.supports(torch.randn(2, 64, 5, 5, device='meta'), params)
    assert not native.supports(torch.randn(2, 64, 5, 5), [p.double() for p in params])


def test_threads_follow_torch(tmp_path):
    """The kernel runs on torch.get_num_threads() threads; one thread gives the same result as several."""
    script = textwrap.dedent('''
        import torch
        from ema_hub import EMA
        torch.manual_seed(0)
        m = EMA(256)
        with torch.no_grad():
            for p in m.parameters():
                p.normal_(0, 0.5)
        x = torch.randn(3, 256, 11, 13)
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with torch.inference_mode():
                outs.append(m(x))
        print(all(torch.equal(outs[0], o) for o in outs))
    ''')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == 'True'
