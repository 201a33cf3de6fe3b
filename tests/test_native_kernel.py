"""Building, caching and turning off the compiled CPU forward (ema_hub/layers/native.py); what it computes is
tested against the reference in test_ema_layer.py, beside the PyTorch-ops form."""
import json
import os
import time

import pytest
import torch

from ema_hub import EMA
from ema_hub.layers import algebra, eager, native
from ema_hub.reference import ReferenceEMA
from support.models import acting_layer
from support.scripts import run_script


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
    built = list(fresh_build.glob('ema_kernels-*.so'))
    assert len(built) == 1 and not [p for p in fresh_build.iterdir() if p.is_dir()]  # no build folder left over
    mtime = built[0].stat().st_mtime_ns
    native._library.cache_clear()
    assert native.available() and built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_turned_off_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv('EMA_HUB_NATIVE', '0')
    assert not native.available()
    assert not fresh_build.exists()
    layer = acting_layer(64)
    x = torch.randn(2, 64, 5, 5)
    assert not native.supports(x, list(layer.parameters()))
    ref = ReferenceEMA(64, layer.groups)
    ref.load_state_dict(layer.state_dict())
    # the PyTorch ops run instead, and compute the same function
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-4, atol=1e-5)
    assert not fresh_build.exists()  # nothing was built on the way


# A fresh process computes the layer (forward and input gradient, fp32 on the CPU: the kernels' case) against the
# reference in fp64, and prints whether the kernels loaded and the EMA warnings it saw.
_CHECK_LAYER = '''
    import json, warnings
    warnings.simplefilter('always')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        import torch
        from ema_hub.layers import native
        from ema_hub.reference import ReferenceEMA
        from support.models import acting_layer, rel_err
        layer = acting_layer(64)
        ref = ReferenceEMA(64, layer.groups).double()
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(2, 64, 9, 7, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        dy = torch.randn(2, 64, 9, 7)
        y, y_ref = layer(x), ref(x64)
        grads = torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x64, dy.double())[0]
        assert all(rel_err(got.double(), want) < 1e-4 for got, want in [(y, y_ref), grads])
        loaded = native.available()
    print(json.dumps({'native': loaded, 'warnings': [str(w.message) for w in caught if 'EMA' in str(w.message)]}))
'''


def _check_layer(cache, **env):
    """Run _CHECK_LAYER with its own cache (and ``env``); its result: whether the kernels loaded, the warnings."""
    environ = {k: v for k, v in os.environ.items() if k not in ('CC', 'EMA_HUB_NATIVE', 'EMA_HUB_CC_TIMEOUT')}
    run = run_script(_CHECK_LAYER, env={**environ, 'XDG_CACHE_HOME': str(cache), **env})
    assert run.returncode == 0, run.stderr  # a cut-off library in the cache ended the process with 135 (SIGBUS)
    result = json.loads(run.stdout)
    return result['native'], result['warnings']


def test_a_cut_off_library_is_built_again(tmp_path):
    assert _check_layer(tmp_path) == (True, [])
    library, = (tmp_path / 'ema_hub' / 'native').glob('ema_kernels-*.so')
    whole = library.read_bytes()
    library.write_bytes(whole[:len(whole) // 2])  # a full disk or a killed copy
    assert _check_layer(tmp_path) == (True, [])
    assert library.read_bytes() == whole and list(library.parent.glob('ema_kernels-*.so')) == [library]
    checksum, = library.parent.glob('ema_kernels-*.so.sha256')
    checksum.unlink()  # a library without its checksum (written before it existed): built again too
    mtime = library.stat().st_mtime_ns
    assert _check_layer(tmp_path) == (True, []) and library.stat().st_mtime_ns != mtime and checksum.is_file()


@pytest.mark.parametrize('env', [{'CC': 'no-such-compiler-ema-hub'}, {'PATH': 'empty'}], ids=['CC', 'PATH'])
def test_no_compiler_warns_once_and_falls_back(tmp_path, env):
    if env.get('PATH'):  # a PATH with no compiler on it, and no CC: neither Python's compiler nor cc is found
        (tmp_path / 'empty').mkdir()
        env = {'PATH': str(tmp_path / 'empty')}
    loaded, warned = _check_layer(tmp_path, **env)
    assert not loaded and len(warned) == 1 and 'no C compiler found' in warned[0], warned
    assert not (tmp_path / 'ema_hub').exists()


@pytest.mark.parametrize('hangs_on', ['--version', 'build'])
def test_a_hung_compiler_times_out(tmp_path, hangs_on):
    compiler = tmp_path / 'slow-cc'
    answer = 'exec sleep 60' if hangs_on == '--version' else 'echo slow-cc 1.0; exit 0'
    compiler.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then {answer}; fi\nexec sleep 60\n')
    compiler.chmod(0o755)
    start = time.monotonic()
    loaded, warned = _check_layer(tmp_path, CC=str(compiler), EMA_HUB_CC_TIMEOUT='0.5')
    assert not loaded and len(warned) == 1 and 'did not finish within 0.5 s' in warned[0], warned
    assert time.monotonic() - start < 50  # not the compiler's minute
    assert not list(tmp_path.glob('ema_hub/native/ema_kernels-*'))


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
    """The kernels run on torch.get_num_threads() threads; one thread gives the same results as several (the
    parameters' gradients are summed over groups in PyTorch, not across threads)."""
    run = run_script('''
        import torch
        from support.models import acting_layer
        m = acting_layer(256)
        x = torch.randn(3, 256, 17, 19)
        dy = torch.randn_like(x)
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            xr = x.clone().requires_grad_()
            y = m(xr)
            outs.append([y.detach()] + list(torch.autograd.grad(y, [xr, *m.parameters()], dy)))
        print(all(torch.equal(a, b) for o in outs for a, b in zip(outs[0], o)))
    ''')
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == 'True'


@pytest.mark.parametrize('n,c,h,w', [(4, 8, 56, 56), (6, 16, 17, 19), (3, 64, 7, 7), (2, 6, 7, 5), (2, 4, 1, 1),
                                     (2, 8, 1, 3), (2, 8, 4, 1), (1, 8, 300, 1)])
def test_backward_matches_pytorch_ops(n, c, h, w):
    """The compiled backward against eager.backward_full_size (its PyTorch-ops twin, the path without a compiler
    or off the CPU), on maps of every size."""
    gen = torch.Generator().manual_seed(n * c + h + w)
    gx, dy = torch.randn(n, c, h, w, generator=gen) + 0.5, torch.randn(n, c, h, w, generator=gen)
    layer = EMA(c, 1)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5, generator=gen)
    params = algebra.Params(*(p.detach() for p in layer.params()))
    gate = torch.rand(n, h, w, generator=gen)
    pooled, edges = eager.pool(gx)
    gates = algebra.gates(pooled, params.w1, params.b1)
    shift = algebra.shift(pooled, gates, h)
    a = gx * gates[:, :, :h, None] * gates[:, :, None, h:] - shift
    co = algebra.coefficients(edges, a.sum((2, 3)), a.square().sum((2, 3)), params, layer.tap_edges, layer.gn.eps,
                              h * w)
    want = eager.backward_full_size(gx, dy, gate, gates, shift, pooled, edges, co, params)
    got = native.backward(gx, dy, gate, gates, shift.view(n, c), co, params)
    for name, a, b in zip(['dx', 'dk', 'dlogit', 'dbias', 'du', 'dtaps_mix'], got, want):
        # (the absolute floor: on a 1x1 map a - shift, and so dk, is rounding noise around 0 in both)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item() + 1e-6,
                                   msg=lambda m: f'{name}: {m}')


def test_every_vector_width_computes_the_same(monkeypatch, tmp_path):
    """The kernels are written for any vector width (16 lanes with AVX-512, 8 with AVX, 4 elsewhere): each,
    built here with -DEMA_VL, gives the default build's forward (contiguous and channels_last, rows shorter and
    longer than a vector) and backward."""
    layer = acting_layer(96, 6)
    params = algebra.Params(*(p.detach() for p in layer.params()))
    inputs = [torch.randn(2, 96, 7, 5) + 0.5, torch.randn(1, 96, 13, 21).contiguous(memory_format=torch.channels_last)]

    def run():
        results = []
        for x in inputs:
            out = torch.empty_like(x)
            stats = native.forward(x, layer.groups, params, layer.tap_edges, layer.gn.eps, out)
            gx = algebra.grouped(x, layer.groups).contiguous()
            n, c, h, w = gx.shape
            gates = algebra.gates(stats[1], params.w1, params.b1)
            shift = algebra.shift(stats[1], gates, h)
            co = algebra.coefficients(stats[2], stats[3][0], stats[3][1], params, layer.tap_edges, layer.gn.eps, h * w)
            back = native.backward(gx, torch.ones_like(gx), stats[0], gates, shift.view(n, c), co, params)
            results += [out, *stats, *back]
        return results

    want = run()
    for width in (4, 8, 16):
        monkeypatch.setattr(native, '_FLAG_SETS', tuple([f'-DEMA_VL={width}', *flags] for flags in native._FLAG_SETS))
        monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / str(width)))
        native._library.cache_clear()
        for a, b in zip(run(), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=lambda m: f'{width}: {m}')
    monkeypatch.undo()
    native._library.cache_clear()


@pytest.mark.parametrize('b,c,h,w,factor', [
    (2, 256, 9, 11, 32),  # 8 channels a group, blocks of 4 groups, rows longer than eight pixels
    (1, 128, 5, 3, 8),    # 16 a group, blocks of 2, rows shorter than eight
    (3, 24, 6, 4, 3),     # 8 a group, 3 groups: a block of 3
    (1, 128, 7, 7, 2),    # 64 a group, one group a block
    (2, 64, 1, 1, 8),     # a 1x1 map
    (1, 96, 6, 5, 32),    # 3 a group: the channel-map path
])
def test_channels_last_equals_contiguous(b, c, h, w, factor):
    """The forward reads and writes channels_last maps in place (pixel by pixel, a block of groups at a time,
    when a group's channels are a multiple of 8): the output and every statistic equal the contiguous input's."""
    layer = acting_layer(c, factor)
    params = algebra.Params(*(p.detach() for p in layer.params()))
    x = torch.randn(b, c, h, w) * 2 + 0.5
    x_cl = x.contiguous(memory_format=torch.channels_last)
    out, out_cl = torch.empty_like(x), torch.empty_like(x_cl)
    stats = native.forward(x, layer.groups, params, layer.tap_edges, layer.gn.eps, out)
    stats_cl = native.forward(x_cl, layer.groups, params, layer.tap_edges, layer.gn.eps, out_cl)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    for name, got, want in zip(['out', 'gate', 'pooled', 'edges', 'sums'], (out_cl, *stats_cl), (out, *stats)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item(),
                                   msg=lambda m: f'{name}: {m}')
