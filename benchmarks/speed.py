"""Speed and memory of EMA against the paper's straightforward form, alone and in ResNet-50, in every mode a
model runs in: eager, torch.compile and onnxruntime on the CPU (eager and torch.compile on CUDA).

Run ``ema-hub benchmark [--quick] [--modes eager,compiled,onnxruntime] [--threads 2] [--batch 8] [--repeats N]
[--device cpu|cuda] [--no-paper-form] [--amp] [--markdown]`` (or ``python -m ema_hub_benchmarks.speed`` with the same options).

Everything runs in one process and the candidates are interleaved round-robin (each repeat times every
candidate once, in turn, the order reversed every other round), so that load on a shared machine and one
candidate's after-effects hit all of them alike. Times are medians over repeats; a ratio (or speedup) is the
median of the per-round ratios, each taken between two runs seconds apart, so a stretch of load on the
machine moves both sides of it.

* Layer (eager): ``ema_hub.EMA`` vs ``ema_hub.reference.ReferenceEMA`` (same parameters) at the four ResNet-50
  stage shapes, inference (``torch.inference_mode``) and a training step (forward + backward w.r.t. the
  input and the parameters). Target: the fast layer >= 2x faster at each shape, both modes.
* Networks, per mode: ``resnet50_ema`` (EMA in every bottleneck) and the same network with the paper's form
  of the layer, each timed against ``resnet50`` run the same way in a pair of its own, and against each
  other. Inference latency and the training step (forward + backward in train mode; not in onnxruntime).
  In eager mode also training peak memory. Targets: TARGETS below; onnxruntime's also compares the export time
  of resnet50_ema with resnet50's (``torch.onnx.export``, the same exporter). ``--no-paper-form`` leaves the
  paper form's network out (compiling its training step takes about an hour on two CPU cores).

Training peak memory is counted exactly from the CPU allocator's events (torch.profiler, profile_memory):
parameters, buffers and the input, plus the most that one training step (activations autograd keeps,
temporaries, parameter gradients) holds at once, as torch.cuda.max_memory_allocated would on a GPU. The
process's fixed footprint (libraries, allocator slack) is left out, which makes the ratio stricter than
one of peak RSS. The activation memory autograd keeps for backward (unique storages, weights excluded,
counted with saved_tensors_hooks) is printed beside it.

On CUDA (``--device cuda``) the networks run channels_last under bf16 autocast (batch 256 unless given)
and report throughput in images/s. ``--amp`` runs the CPU's networks under bf16 autocast too (the layer table
stays fp32). ``--markdown`` prints the same tables in Markdown under a heading with the date, the machine and the
versions: the docs' measurement tables are this output.
"""
import argparse
import datetime
import itertools
import os
import statistics
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import nn

from ema_hub.errors import UsageError
from ema_hub.layers import EMA, implementation
from ema_hub.reference import ReferenceEMA, with_reference_layers

STAGES = [(256, 56), (512, 28), (1024, 14), (2048, 7)]
MODES = {'cpu': ('eager', 'compiled', 'onnxruntime'), 'cuda': ('eager', 'compiled')}
LAYER_SPEEDUP = 2.0
# (mode, measurement, bound): resnet50_ema over resnet50 run the same way; 'export' is the ONNX export time.
TARGETS = {
    'cpu': [('eager', 'inference', 1.25), ('eager', 'inference', 1.15), ('eager', 'train', 1.35),
            ('eager', 'peak memory', 1.25), ('compiled', 'inference', 1.25), ('compiled', 'inference', 1.10),
            ('compiled', 'train', 1.40), ('onnxruntime', 'inference', 1.30), ('onnxruntime', 'inference', 1.15),
            ('onnxruntime', 'export', 2.0)],
    'cuda': [('compiled', 'inference', 1.2)],
}


def cpu_target_count(modes=MODES['cpu']) -> int:
    """How many targets a CPU run over ``modes`` checks (and prints, MET or NOT MET)."""
    return 2 * len(STAGES) + sum(mode in modes for mode, _, _ in TARGETS['cpu'])


def _sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def _interleaved(fns: Dict[str, Callable[[], object]], repeats: int, device: str,
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


def _train_step(model: nn.Module, x: torch.Tensor, grad: torch.Tensor,
                autocast: bool = False) -> Callable[[], torch.Tensor]:
    """Forward and backward with respect to the input and the parameters; returns the input's gradient."""
    def step():
        xr = x.detach().requires_grad_()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(xr)
        out.backward(grad.to(out.dtype))
        model.zero_grad(set_to_none=True)
        return xr.grad
    return step


def _infer(model: nn.Module, x: torch.Tensor, autocast: bool = False) -> Callable[[], torch.Tensor]:
    def run():
        with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(x)
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
# The pairs each mode times: every network against resnet50, and resnet50_ema against the paper's form.
PAIRS = [('resnet50_ema', 'resnet50'), ('paper_form', 'resnet50'), ('resnet50_ema', 'paper_form')]


def _network(name: str) -> nn.Module:
    import timm
    if name == 'paper_form':  # the same network, each EMA computed the paper's way with the same weights
        return with_reference_layers(timm.create_model('resnet50_ema'))
    return timm.create_model(name)


class _Runners:
    """The callables a mode times, made once per network and kind (compiling and exporting are slow)."""

    def __init__(self, mode: str, nets: Dict[str, nn.Module], x: torch.Tensor, grad: torch.Tensor, threads: int,
                 folder: str, autocast: bool = False):
        self.mode, self.nets, self.x, self.grad, self.threads, self.folder = mode, nets, x, grad, threads, folder
        self.autocast = autocast
        self.export_s: Dict[str, float] = {}
        self._made: Dict[tuple, Callable[[], object]] = {}

    def get(self, name: str, kind: str) -> Optional[Callable[[], object]]:
        if kind == 'train' and self.mode == 'onnxruntime':
            return None
        key = (name, kind)
        if key not in self._made:
            self._made[key] = self._make(name, kind)
        return self._made[key]

    def _make(self, name: str, kind: str) -> Callable[[], object]:
        net = self.nets[name].train(kind == 'train')
        if self.mode == 'onnxruntime':
            return self._onnx(name, net)
        model = torch.compile(net) if self.mode == 'compiled' else net
        if kind == 'train':
            return _train_step(model, self.x, self.grad, self.autocast)
        return _infer(model, self.x, self.autocast)

    def _onnx(self, name: str, net: nn.Module) -> Callable[[], object]:
        from ema_hub.export import export_module, onnx_session
        if not self.export_s:  # the exporter's one-time set-up, which would land on the first network's time
            export_module(nn.Conv2d(3, 8, 3), f'{self.folder}/warm-up.onnx', (2, 3, 16, 16))
        path = f'{self.folder}/{name}.onnx'
        report = export_module(net, path, tuple(self.x.shape))
        self.export_s[name] = report.export_s
        session = onnx_session(path, self.threads)
        feed = {session.get_inputs()[0].name: self.x.numpy()}
        return lambda: session.run(None, feed)[0]


def bench_networks(device: str, modes: List[str], batch: int, repeats: int, img: int, threads: int,
                   warmup: int, paper_form: bool = True, amp: bool = False) -> Dict[str, dict]:
    """Per mode and kind (inference, train): each pair of ``PAIRS`` timed interleaved (A B B A ...), so a ratio is
    never skewed by a third network's memory traffic landing on one side only. Returns
    ``{mode: {kind: {'ms': {net: ms}, 'ratio': {(a, b): ratio}}}}``, plus eager memory and the export times.
    Without ``paper_form``, only resnet50_ema against resnet50; ``amp``: bf16 autocast (always on CUDA)."""
    import tempfile

    torch.manual_seed(0)
    names = [k for k in NETWORKS if paper_form or k != 'paper_form']
    pairs = [(a, b) for a, b in PAIRS if a in names and b in names]
    nets = {k: _network(k).to(device) for k in names}
    x = torch.randn(batch, 3, img, img, device=device)
    if device == 'cuda':
        nets = {k: m.to(memory_format=torch.channels_last) for k, m in nets.items()}
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn(batch, 1000, device=device)
    results: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as folder:
        for mode in modes:
            runners = _Runners(mode, nets, x, grad, threads, folder, autocast=amp or device == 'cuda')
            results[mode] = {}
            for kind in (('inference',) if device == 'cuda' else ('inference', 'train')):
                if runners.get('resnet50', kind) is None:
                    continue
                ms, ratio = {}, {}
                for a, b in pairs:
                    t = _interleaved({b: runners.get(b, kind), a: runners.get(a, kind)}, repeats, device, warmup)
                    ratio[(a, b)] = _ratio(t, a, b)
                    for k in (a, b):
                        ms.setdefault(k, statistics.median(t[k]) * 1e3)
                results[mode][kind] = {'ms': ms, 'ratio': ratio}
            if runners.export_s:
                results[mode]['export_s'] = runners.export_s
    if 'eager' in modes and device == 'cpu':
        results['eager']['memory'] = {k: (_training_peak_bytes(m.train(), x, grad), _saved_activation_bytes(m, x))
                                      for k, m in nets.items()}
    return results


class Table(NamedTuple):
    """One printed table: its title, column headers and rows of cells, rendered as aligned text or Markdown."""
    title: str
    header: List[str]
    rows: List[List[str]]

    def render(self, markdown: bool) -> str:
        if markdown:
            lines = [f'### {self.title}', '', '| ' + ' | '.join(self.header) + ' |', '|' + '---|' * len(self.header)]
            return '\n'.join(lines + ['| ' + ' | '.join(row) + ' |' for row in self.rows]) + '\n'
        widths = [max(len(cell) for cell in column) for column in zip(self.header, *self.rows)]
        def line(cells):  # the first column left-aligned, numbers right-aligned
            return ' '.join(c.ljust(n) if i == 0 else c.rjust(n) for i, (c, n) in enumerate(zip(cells, widths)))
        return '\n'.join([f'## {self.title}', line(self.header)] + [line(row).rstrip() for row in self.rows])


def run(device: str = 'cpu', threads: int = 2, batch: Optional[int] = None, repeats: Optional[int] = None,
        quick: bool = False, modes: Optional[List[str]] = None, paper_form: bool = True,
        amp: bool = False, markdown: bool = False) -> Dict[str, bool]:
    """Measures and prints the tables; returns each target's name and whether this run met it.

    batch: 8 on CPU (2 with ``quick``), 256 on CUDA; repeats: timed rounds per measurement, 7 (1 with ``quick``);
    modes: a subset of ``MODES[device]`` (default: all). ``quick`` shrinks the shapes to check that everything
    runs: its numbers mean nothing. Without ``paper_form`` the networks leave the paper form out (the layer table
    keeps it). ``amp``: the CPU's networks under bf16 autocast. ``markdown``: the tables in Markdown, under a
    heading with the date and the machine, as the docs hold them.
    """
    if device == 'cuda' and not torch.cuda.is_available():
        raise UsageError('CUDA is not available on this machine: benchmark with --device cpu')
    modes = list(modes or MODES[device])
    unknown = [m for m in modes if m not in MODES[device]]
    if unknown:
        raise UsageError(f'unknown mode(s) {", ".join(unknown)} on {device}; use {", ".join(MODES[device])}')
    torch.set_num_threads(threads)
    repeats = repeats or (1 if quick else 7)
    warmup = 0 if quick else 1
    met: Dict[str, bool] = {}
    tables: List[Table] = []
    if device == 'cuda':
        batch = batch or 256
        setting = f'bf16 autocast, channels_last, batch {batch}'
    else:
        batch = batch or (2 if quick else 8)
        setting = f'{threads} threads, {"networks in bf16 autocast" if amp else "fp32"}, batch {batch}'
    print(_heading(device, setting, repeats, quick, markdown), flush=True)  # (builds the CPU kernels: not timed)
    if device == 'cpu':
        tables.append(_layer_table(bench_layer(batch, repeats, quick, 'cpu', warmup), met))
    img = 32 if quick and device == 'cpu' else 224
    res = bench_networks(device, modes, batch, repeats, img, threads, warmup, paper_form, amp)
    tables += _network_tables(res, img, batch)
    _check_targets(device, res, met)
    tables.append(Table('targets', ['result', 'target'],
                        [['MET' if ok else 'NOT MET', name] for name, ok in met.items()]))
    print('\n'.join(table.render(markdown) for table in tables))
    return met


def _heading(device: str, setting: str, repeats: int, quick: bool, markdown: bool) -> str:
    """What was run, where and with what: the docs' tables carry it."""
    import timm
    machine = torch.cuda.get_device_name() if device == 'cuda' else _cpu_name()
    versions = f'torch {torch.__version__}, timm {timm.__version__}'
    detail = (f'{machine}; {setting}, {repeats} interleaved rounds (times: medians; ratios: medians of the '
              f'per-round ratios); {versions}; EMA: {implementation(device)}'
              + ('; QUICK: reduced shapes, numbers not meaningful' if quick else ''))
    if markdown:
        return f'## {device.upper()}, {datetime.date.today().isoformat()}\n\n{detail}.\n'
    return f'# {device.upper()}: {detail}'


def _cpu_name() -> str:
    import platform
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), '')
    except OSError:
        name = ''
    return f'{name or platform.processor() or platform.machine()} ({os.cpu_count()} cores, {platform.system()})'


def _ms(sec: float) -> str:
    return f'{sec * 1e3:.1f}'


def _layer_table(rows: List[dict], met: Dict[str, bool]) -> Table:
    cells = []
    for r in rows:
        si, st = r['inf_speedup'], r['tr_speedup']
        met[f'layer {r["shape"]} inference speedup >= {LAYER_SPEEDUP:g}x'] = si >= LAYER_SPEEDUP
        met[f'layer {r["shape"]} train speedup >= {LAYER_SPEEDUP:g}x'] = st >= LAYER_SPEEDUP
        cells.append([r['shape'], _ms(r['inf_ref']), _ms(r['inf_ema']), f'{si:.2f}x', _ms(r['tr_ref']),
                      _ms(r['tr_ema']), f'{st:.2f}x'])
    return Table(f'layer, eager: EMA vs paper form (ms; speedup = ref / ema, target >= {LAYER_SPEEDUP:g}x)',
                 ['shape (C,H=W)', 'inf ref', 'inf ema', 'speedup', 'train ref', 'train ema', 'speedup'], cells)


def _network_tables(res: Dict[str, dict], img: int, batch: int) -> List[Table]:
    rows = []
    for mode, kinds in res.items():
        for kind in ('inference', 'train'):
            if kind not in kinds:
                continue
            ms, ratio = kinds[kind]['ms'], kinds[kind]['ratio']
            rows.append([mode, kind, f'{ms["resnet50"]:.1f}', f'{ms["resnet50_ema"]:.1f}',
                         _cell(ms.get('paper_form'), 1),
                         f'{ratio[("resnet50_ema", "resnet50")]:.2f}', _cell(ratio.get(('paper_form', 'resnet50')), 2),
                         _cell(ratio.get(('resnet50_ema', 'paper_form')), 2),
                         f'{batch / ms["resnet50_ema"] * 1e3:.1f}'])
    tables = [Table(f'networks, {img}x{img}: ms per batch; ratios of resnet50_ema (ema) and the paper form (paper) '
                    'over resnet50 run the same way, and of ema over paper, each timed in a pair of its own',
                    ['mode', 'kind', 'resnet50', 'ema', 'paper', 'ema/r50', 'paper/r50', 'ema/paper', 'img/s ema'],
                    rows)]
    if 'memory' in res.get('eager', {}):
        memory = res['eager']['memory']
        base_peak, base_saved = memory['resnet50']
        tables.append(Table(
            'eager training memory, fp32 (MiB; ratio over resnet50): peak of a training step, activations saved',
            ['network', 'peak', 'ratio', 'saved', 'ratio'],
            [[name, f'{peak / 2**20:.1f}', f'{peak / base_peak:.2f}', f'{saved / 2**20:.1f}',
              f'{saved / base_saved:.2f}'] for name, (peak, saved) in memory.items()]))
    exports = [[mode, f'{e["resnet50"]:.1f}', f'{e["resnet50_ema"]:.1f}', f'{e["resnet50_ema"] / e["resnet50"]:.2f}']
               for mode, e in ((m, k['export_s']) for m, k in res.items() if 'export_s' in k)]
    if exports:
        tables.append(Table('ONNX export (torch.onnx.export, checked), seconds', ['mode', 'resnet50', 'resnet50_ema',
                                                                                   'ratio'], exports))
    return tables


def _cell(value: Optional[float], digits: int) -> str:
    """A number, or '-' for a network left out (the paper form's)."""
    return f'{value:.{digits}f}' if value is not None else '-'


def _check_targets(device: str, res: Dict[str, dict], met: Dict[str, bool]) -> None:
    for mode, kind, bound in TARGETS[device]:
        if mode not in res:
            continue
        if kind == 'export':
            e = res[mode]['export_s']
            value = e['resnet50_ema'] / e['resnet50']
            met[f'{mode} export time resnet50_ema / resnet50 <= {bound:g}'] = value <= bound
        elif kind == 'peak memory':
            memory = res[mode]['memory']
            met[f'{mode} training peak memory ratio <= {bound:g}'] = \
                memory['resnet50_ema'][0] / memory['resnet50'][0] <= bound
        else:
            value = res[mode][kind]['ratio'][('resnet50_ema', 'resnet50')]
            met[f'{mode} {kind} ratio resnet50_ema / resnet50 <= {bound:g}'] = value <= bound


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog='python -m ema_hub_benchmarks.speed', description=__doc__.split('\n')[0])
    ap.add_argument('--threads', type=int, default=2)
    ap.add_argument('--batch', type=int, default=None, help='default 8 on CPU (2 with --quick), 256 on CUDA')
    ap.add_argument('--repeats', type=int, default=None, help='timed rounds per measurement (default 7, 1 with --quick)')
    ap.add_argument('--quick', action='store_true', help='small shapes and few repeats: checks that it runs')
    ap.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    ap.add_argument('--modes', default=None, help='comma-separated: eager, compiled, onnxruntime (default: all)')
    ap.add_argument('--no-paper-form', action='store_true', help='networks without the paper form (the layer keeps it)')
    ap.add_argument('--amp', action='store_true', help='the networks on the CPU under bf16 autocast (as on CUDA)')
    ap.add_argument('--markdown', action='store_true', help='Markdown tables under a dated heading naming the machine')
    args = ap.parse_args(argv)
    try:
        run(args.device, args.threads, args.batch, args.repeats, args.quick,
            args.modes.split(',') if args.modes else None, not args.no_paper_form, args.amp, args.markdown)
    except ValueError as e:
        ap.error(str(e))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
