"""Speed and memory of the fast EMA layer against the paper's straightforward form, alone and in ResNet-50.

Run ``ema-hub benchmark [--quick] [--threads 2] [--batch 8] [--repeats N] [--device cpu|cuda]`` (or
``python -m ema_hub_benchmarks.speed`` with the same options).

Everything runs in one process and the candidates are interleaved round-robin (each repeat times every
candidate once, in turn, the order reversed every other round), so that load on a shared machine and one
candidate's after-effects hit all of them alike. Times are medians over repeats; a ratio (or speedup) is the
median of the per-round ratios, each taken between two runs seconds apart, so a stretch of load on the
machine moves both sides of it.

* Layer: ``ema_hub.EMA`` vs ``ema_hub.reference.ReferenceEMA`` (same parameters) at the four ResNet-50
  stage shapes, inference (``torch.inference_mode``) and a training step (forward + backward w.r.t. the
  input and the parameters). Target: the fast layer >= 2x faster at each shape, both modes.
* Network: ``resnet50_ema`` (EMA in every bottleneck) and the same network with the reference layer, each
  timed against ``resnet50`` in a pair of its own. Inference latency (target ratio <= 1.25, stretch
  <= 1.15), training step time (forward + backward in train mode, target <= 1.35) and training peak memory
  (target <= 1.25).

Training peak memory is counted exactly from the CPU allocator's events (torch.profiler, profile_memory):
parameters, buffers and the input, plus the most that one training step (activations autograd keeps,
temporaries, parameter gradients) holds at once, as torch.cuda.max_memory_allocated would on a GPU. The
process's fixed footprint (libraries, allocator slack) is left out, which makes the ratio stricter than
one of peak RSS. The activation memory autograd keeps for backward (unique storages, weights excluded,
counted with saved_tensors_hooks) is printed beside it.

On CUDA (``--device cuda``) the network runs channels_last under bf16 autocast (batch 256 unless given)
and reports throughput in images/s, plus a ``torch.compile`` variant of each network (target: compiled
resnet50_ema within 1.2x of compiled resnet50).
"""
import argparse
import itertools
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from ema_hub.errors import UsageError
from ema_hub.layers import EMA, implementation
from ema_hub.reference import ReferenceEMA, with_reference_layers

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
# The targets this benchmark checks: the fast layer's speedup over the paper's form at every stage shape, both
# modes; the networks' ratios over resnet50 (times and peak memory).
LAYER_SPEEDUP = 2.0
NETWORK_TARGETS = {'network inference ratio <= 1.25': ('inf_ratio', 1.25),
                   'network inference ratio <= 1.15 (stretch)': ('inf_ratio', 1.15),
                   'network train-step ratio <= 1.35': ('tr_ratio', 1.35),
                   'network training peak memory ratio <= 1.25': ('peak_ratio', 1.25)}
GPU_TARGETS = {'compiled throughput ratio <= 1.2': ('+compile', 1.2)}


def cpu_target_count() -> int:
    """How many targets a CPU run checks (and prints, MET or NOT MET)."""
    return 2 * len(STAGES) + len(NETWORK_TARGETS)


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _interleaved(fns: Dict[str, Callable[[], None]], repeats: int, device: str,
                 warmup: int = 1) -> Dict[str, List[float]]:
    """Seconds of each callable in each of ``repeats`` rounds, timing them round-robin after ``warmup`` rounds.

    The order alternates from round to round (A B C, C B A, ...): whatever one candidate leaves behind (a
    heap to grow back, caches to refill) then falls on each of the others alike.
    """
    times: Dict[str, List[float]] = {k: [] for k in fns}
    order = list(fns.items())
    for r in range(warmup + repeats):
        for k, fn in (order if r % 2 == 0 else order[::-1]):
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def _ratio(times: Dict[str, List[float]], num: str, den: str) -> float:
    """The median over rounds of num's time over den's in the same round."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def _train_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step():
        xr = x.detach().requires_grad_()
        model(xr).backward(grad)
        model.zero_grad(set_to_none=True)
    return step


def _infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run():
        with torch.inference_mode():
            model(x)
    return run


def _saved_activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward during one training forward (unique storages, weights excluded).

    This is the activation memory that sets a training step's peak; counted exactly through
    saved_tensors_hooks, so unlike RSS it is independent of the allocator's caching and of the machine's load.
    """
    saved: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x.detach().requires_grad_())
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in saved.items() if ptr not in weights)


def _training_peak_bytes(model: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int:
    """Peak bytes of one training step: model state and input plus the step's peak allocation (see module doc)."""
    from torch.profiler import ProfilerActivity, profile

    model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        model(x.detach().requires_grad_()).backward(grad)
    model.zero_grad(set_to_none=True)
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]' and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    state = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    return state + x.numel() * x.element_size() + peak


def bench_layer(batch: int, repeats: int, quick: bool, device: str, warmup: int = 1) -> List[dict]:
    rows = []
    for ch, s in STAGES:
        if quick:
            s = max(s // 8, 3)
        torch.manual_seed(0)
        fast = EMA(ch).to(device)
        with torch.no_grad():
            for p in fast.parameters():
                p.normal_(0.0, 0.5)
        ref = ReferenceEMA(ch, fast.groups).to(device)
        ref.load_state_dict(fast.state_dict())
        x = torch.randn(batch, ch, s, s, device=device)
        grad = torch.randn_like(x)
        inf = _interleaved({'ref': _infer(ref, x), 'ema': _infer(fast, x)}, repeats, device, warmup)
        tr = _interleaved({'ref': _train_step(ref, x, grad), 'ema': _train_step(fast, x, grad)}, repeats, device, warmup)
        rows.append(dict(shape=f'({ch},{s})', inf_ref=statistics.median(inf['ref']),
                         inf_ema=statistics.median(inf['ema']), inf_speedup=_ratio(inf, 'ref', 'ema'),
                         tr_ref=statistics.median(tr['ref']), tr_ema=statistics.median(tr['ema']),
                         tr_speedup=_ratio(tr, 'ref', 'ema')))
    return rows


NETWORKS = ['resnet50', 'resnet50_ema', 'paper_form']


def _network(name: str) -> nn.Module:
    import timm
    if name == 'paper_form':  # the same network, each EMA computed the paper's way with the same weights
        return with_reference_layers(timm.create_model('resnet50_ema'))
    return timm.create_model(name)


def _networks(device: str) -> Dict[str, nn.Module]:
    return {k: _network(k).to(device) for k in NETWORKS}


def bench_network_cpu(batch: int, repeats: int, img: int, threads: int, warmup: int) -> Dict[str, dict]:
    """Each network against resnet50 in a pair of its own (A B B A ...): a ratio is never skewed by a third
    network's memory traffic landing on one side only. resnet50's row shows its time from the first pair."""
    nets = _networks('cpu')
    x = torch.randn(batch, 3, img, img)
    grad = torch.randn(batch, 1000)
    base = nets['resnet50']
    res = {k: {} for k in nets}
    for mode, measure in (('inf', lambda m: _infer(m, x)), ('tr', lambda m: _train_step(m, x, grad))):
        for m in nets.values():
            m.train(mode == 'tr')
        for k in NETWORKS[1:]:
            t = _interleaved({'resnet50': measure(base), k: measure(nets[k])}, repeats, 'cpu', warmup)
            res[k][mode], res[k][mode + '_ratio'] = statistics.median(t[k]), _ratio(t, k, 'resnet50')
            res['resnet50'].setdefault(mode, statistics.median(t['resnet50']))
        res['resnet50'][mode + '_ratio'] = 1.0
    for k, m in nets.items():
        res[k]['peak'], res[k]['saved'] = _training_peak_bytes(m, x, grad), _saved_activation_bytes(m, x)
    return res


def bench_network_cuda(batch: int, repeats: int) -> Dict[str, dict]:
    nets = _networks('cuda')
    x = torch.randn(batch, 3, 224, 224, device='cuda').contiguous(memory_format=torch.channels_last)
    out = {}
    fns = {}
    for k, m in nets.items():
        m = m.eval().to(memory_format=torch.channels_last)
        fns[k] = m
        fns[k + '+compile'] = torch.compile(m)

    def run(m):
        def f():
            with torch.inference_mode(), torch.autocast('cuda', dtype=torch.bfloat16):
                m(x)
        return f
    t = _interleaved({k: run(m) for k, m in fns.items()}, repeats, 'cuda', warmup=3)
    for k, times in t.items():
        sec = statistics.median(times)
        # eager against eager resnet50, compiled against compiled
        base = 'resnet50' + ('+compile' if k.endswith('+compile') else '')
        out[k] = dict(inf=sec, throughput=batch / sec, ratio=_ratio(t, k, base))
    return out


def _fmt_ms(sec: float) -> str:
    return f'{sec * 1e3:9.1f}'


def run(device: str = 'cpu', threads: int = 2, batch: Optional[int] = None, repeats: Optional[int] = None,
        quick: bool = False) -> Dict[str, bool]:
    """Measures and prints the tables; returns each target's name and whether this run met it.

    batch: 8 on CPU (2 with ``quick``), 256 on CUDA; repeats: timed rounds per measurement, 7 (1 with ``quick``).
    ``quick`` shrinks the shapes to check that everything runs: its numbers mean nothing.
    """
    if device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('CUDA is not available on this machine: benchmark with --device cpu')
    torch.set_num_threads(threads)
    repeats = repeats or (1 if quick else 7)
    warmup = 0 if quick else 1
    met: Dict[str, bool] = {}

    if device == 'cuda':
        batch = batch or 256
        print(f'# CUDA {torch.cuda.get_device_name()}, bf16 autocast, channels_last, batch {batch}, median of {repeats}')
        print(f'# EMA forward: {implementation("cuda")}')
        res = bench_network_cuda(batch, repeats)
        print(f'{"network":24s} {"ms":>9s} {"img/s":>9s}')
        for k, r in res.items():
            print(f'{k:24s} {_fmt_ms(r["inf"])} {r["throughput"]:9.0f}')
        ratios = {tag: res['resnet50_ema' + tag]['ratio'] for tag in ('', '+compile')}
        for tag, ratio in ratios.items():
            print(f'ratio resnet50_ema{tag}/resnet50{tag} inference: {ratio:.2f}')
        for name, (tag, bound) in GPU_TARGETS.items():
            met[name] = ratios[tag] <= bound
        _print_targets(met)
        return met

    batch = batch or (2 if quick else 8)
    print(f'# CPU, {threads} threads, fp32 eager, batch {batch}, {repeats} interleaved rounds '
          '(times: medians; ratios: medians of the per-round ratios)'
          + (' (QUICK: reduced shapes, numbers not meaningful)' if quick else ''))
    print(f'# EMA forward and backward: {implementation("cpu")}')
    print('## layer: EMA vs paper form (ms; speedup = ref / ema, target >= 2x)')
    print(f'{"shape (C,H=W)":14s} {"inf ref":>9s} {"inf ema":>9s} {"speedup":>8s} {"train ref":>9s} {"train ema":>9s} {"speedup":>8s}')
    for r in bench_layer(batch, repeats, quick, 'cpu', warmup):
        si, st = r['inf_speedup'], r['tr_speedup']
        met[f'layer {r["shape"]} inference speedup >= {LAYER_SPEEDUP:g}x'] = si >= LAYER_SPEEDUP
        met[f'layer {r["shape"]} train speedup >= {LAYER_SPEEDUP:g}x'] = st >= LAYER_SPEEDUP
        print(f'{r["shape"]:14s} {_fmt_ms(r["inf_ref"])} {_fmt_ms(r["inf_ema"])} {si:7.2f}x '
              f'{_fmt_ms(r["tr_ref"])} {_fmt_ms(r["tr_ema"])} {st:7.2f}x')

    img = 32 if quick else 224
    print(f'## network: {img}x{img} (ms; peak = training peak MiB; saved = activation MiB autograd keeps for '
          'backward; ratio = network / resnet50, timed in pairs)')
    net = bench_network_cpu(batch, repeats, img, threads, warmup)
    base = net['resnet50']
    print(f'{"network":14s} {"inference":>9s} {"ratio":>6s} {"train":>9s} {"ratio":>6s} {"peak MiB":>9s} {"ratio":>6s} '
          f'{"saved MiB":>9s} {"ratio":>6s}')
    for k, r in net.items():
        print(f'{k:14s} {_fmt_ms(r["inf"])} {r["inf_ratio"]:6.2f} {_fmt_ms(r["tr"])} {r["tr_ratio"]:6.2f} '
              f'{r["peak"] / 2**20:9.1f} {r["peak"] / base["peak"]:6.2f} {r["saved"] / 2**20:9.1f} '
              f'{r["saved"] / base["saved"]:6.2f}')
    ema = dict(net['resnet50_ema'], peak_ratio=net['resnet50_ema']['peak'] / base['peak'])
    for name, (key, bound) in NETWORK_TARGETS.items():
        met[name] = ema[key] <= bound
    _print_targets(met)
    return met


def _print_targets(met: Dict[str, bool]) -> None:
    print('## targets')
    for name, ok in met.items():
        print(f'{"MET    " if ok else "NOT MET"} {name}')


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m ema_hub_benchmarks.speed', description=__doc__.split('\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=None, help='default 8 on CPU (2 with --quick), 256 on CUDA')
    ap.add_argument('--repeats', type=int, default=None, help='timed rounds per measurement (default 7, 1 with --quick)')
    ap.add_argument('--quick', action='store_true', help='small shapes and few repeats: checks that it runs')
    ap.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    args = ap.parse_args(argv)
    try:
        run(args.device, args.threads, args.batch, args.repeats, args.quick)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
