"""Benchmark: ``ema-classify DIR`` against the straightforward batched timm recipe, side by side.

    python -m ema_hub_benchmarks.classify [--sizes 3000x2000,1600x1200,640x480] [--counts 40,160] [--rounds 3]

For every image size and count, both sides run as fresh processes (start-up included) on the same folder of
"photo-like" JPEGs (smooth gradients, shapes and sensor-like noise, so decoding costs what a camera photo
costs) and load the same model from the same place: a resnet18_ema checkpoint written once with
``save_pretrained`` (random weights, BatchNorm statistics calibrated on generated images so that predictions
differ between images; there is no network here). The recipe is: PIL open + ``convert('RGB')``, timm's eval
transform from the model's pretrained cfg, batches of 16, ``inference_mode``. Rounds alternate the two sides;
the ratio is the median of the per-round ratios of wall times. Top-1 agreement is reported per folder (large
JPEGs are decoded in draft mode by ema-classify) and on small images where no decoding shortcut applies (there
it must be 100%). Target: on the largest photos at the largest count (camera photos, where decoding costs most),
ema-classify with default options at most 0.65x the recipe's wall time; on small images both are the model's
time and the start-up both pay, so the ratio is near 1.
"""
import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image

RECIPE = r'''
import glob, sys, torch, timm, ema_hub
from PIL import Image
from timm.data import create_transform, resolve_data_config
folder, ckpt = sys.argv[1], sys.argv[2]
model = timm.create_model('local-dir:' + ckpt, pretrained=True).eval()
transform = create_transform(**resolve_data_config({}, model=model))
paths = sorted(glob.glob(folder + '/*.jpg'))
with torch.inference_mode():
    for i in range(0, len(paths), 16):
        batch = paths[i:i + 16]
        x = torch.stack([transform(Image.open(p).convert('RGB')) for p in batch])
        probs = model(x).softmax(-1)
        for p, row in zip(batch, probs):
            print(p, int(row.argmax()), float(row.max()))
'''


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A photo-like RGB image: low-frequency colour fields and shapes, upscaled, plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    small_w, small_h = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = rng.uniform(0.5, 4, 2).tolist() + [rng.uniform(0, 6.3)]
        channels.append(128 + 90 * np.sin(fx * x / small_w * 6.3 + phase) * np.cos(fy * y / small_h * 6.3))
    base = np.stack(channels, -1)
    for _ in range(6):  # a few soft blobs ("objects")
        cx, cy, r = rng.uniform(0, small_w), rng.uniform(0, small_h), rng.uniform(0.05, 0.3) * small_w
        mask = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        base = base * (1 - mask) + rng.uniform(0, 255, 3) * mask
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(np.asarray(image, np.int16) + noise, 0, 255).astype(np.uint8))


def photos(folder: Path, width: int, height: int, count: int) -> Path:
    """A folder of ``count`` photo-like JPEGs of ``width`` x ``height``, generated once and reused."""
    sub = folder / f'{width}x{height}_{count}'
    sub.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        path = sub / f'photo_{i:03d}.jpg'
        if not path.exists():
            photo(width, height, seed=i).save(path, quality=90)
    return sub


def checkpoint(folder: Path) -> Path:
    """A resnet18_ema checkpoint (random weights, calibrated BatchNorm statistics), written once and reused."""
    ckpt = folder / 'resnet18_ema'
    if not (ckpt / 'model.safetensors').exists():
        import torch

        from ema_hub.hub import create_model, save_pretrained
        from timm.data import create_transform, resolve_data_config
        torch.manual_seed(0)
        model = create_model('resnet18_ema', pretrained=False)
        transform = create_transform(**resolve_data_config({}, model=model))
        calib = torch.stack([transform(photo(320, 240, seed=20_000 + i)) for i in range(48)])
        model.train()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
        with torch.no_grad():
            for chunk in calib.split(16):
                model(chunk)
        model.eval()
        save_pretrained(model, ckpt)
    return ckpt


def _cli() -> List[str]:
    script = Path(sys.executable).parent / 'ema-classify'
    if script.is_file():
        return [str(script)]
    return [sys.executable, '-c', 'from ema_hub_cli.app import classify_main; classify_main()']


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: List[str]) -> Tuple[float, float, subprocess.CompletedProcess]:
    """Wall time and CPU time (the process and the workers it reaped) of one command."""
    cpu, start = _cpu(), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return time.perf_counter() - start, _cpu() - cpu, proc


def run_cli(folder: Path, ckpt: Path, extra: List[str]) -> Tuple[float, float, Dict[str, Tuple[int, float]]]:
    elapsed, cpu, proc = _timed(_cli() + [str(folder), '--model', f'local-dir:{ckpt}', '--format', 'jsonl', '-k', '1']
                                + extra)
    if proc.returncode != 0:
        raise SystemExit(f'ema-classify failed ({proc.returncode}): {proc.stderr}')
    out = {}
    for line in proc.stdout.splitlines():
        rec = json.loads(line)
        top = rec['predictions'][0]
        out[os.path.basename(rec['path'])] = (top['index'], top['score'])
    return elapsed, cpu, out


def run_recipe(folder: Path, ckpt: Path) -> Tuple[float, float, Dict[str, Tuple[int, float]]]:
    elapsed, cpu, proc = _timed([sys.executable, '-c', RECIPE, str(folder), str(ckpt)])
    if proc.returncode != 0:
        raise SystemExit(f'recipe failed ({proc.returncode}): {proc.stderr}')
    out = {}
    for line in proc.stdout.splitlines():
        path, index, score = line.rsplit(' ', 2)
        out[os.path.basename(path)] = (int(index), float(score))
    return elapsed, cpu, out


def agreement(a: Dict[str, Tuple[int, float]], b: Dict[str, Tuple[int, float]]) -> Tuple[int, int, int, float]:
    assert a.keys() == b.keys(), 'both sides must see the same files'
    same = sum(a[k][0] == b[k][0] for k in a)
    distinct = len({v[0] for v in b.values()})
    max_diff = max(abs(a[k][1] - b[k][1]) for k in a if a[k][0] == b[k][0]) if same else float('nan')
    return same, len(a), distinct, max_diff


TARGET = 0.65


def _pair(folder: Path, ckpt: Path, extra: List[str], rounds: int) -> Dict[str, object]:
    """Both sides on ``folder``, ``rounds`` times, alternating which goes first."""
    times = {'cli': [], 'recipe': []}
    outs = {}
    for r in range(rounds):
        for side in (('cli', 'recipe') if r % 2 == 0 else ('recipe', 'cli')):
            t, _, outs[side] = run_cli(folder, ckpt, extra) if side == 'cli' else run_recipe(folder, ckpt)
            times[side].append(t)
    ratio = statistics.median(a / b for a, b in zip(times['cli'], times['recipe']))
    same, total, _, _ = agreement(outs['cli'], outs['recipe'])
    return dict(cli=statistics.median(times['cli']), recipe=statistics.median(times['recipe']), ratio=ratio,
                agree=f'{same}/{total}')


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'ema_bench_classify'),
                        help='work folder (images and checkpoint are generated once and reused)')
    parser.add_argument('--sizes', default='3000x2000,1600x1200,640x480', help='image sizes, WxH, comma-separated')
    parser.add_argument('--counts', default='40,160', help='images per folder, comma-separated')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--cli-args', default='', help='extra ema-classify options, e.g. "--workers 2 -b 16"')
    parser.add_argument('--clean', action='store_true', help='remove the work folder at the end')
    args = parser.parse_args(argv)

    folder = Path(args.dir)
    sizes = [tuple(int(v) for v in size.split('x')) for size in args.sizes.split(',')]
    counts = [int(c) for c in args.counts.split(',')]
    ckpt = checkpoint(folder)
    extra = args.cli_args.split()
    print(f'# ema-classify {" ".join(extra) or "(default options)"} vs the timm recipe; cpus={os.cpu_count()}, '
          f'{args.rounds} rounds each, times are medians; target ratio <= {TARGET}')
    print(f'{"images":>14s} {"count":>6s} {"ema-classify s":>15s} {"recipe s":>9s} {"ratio":>6s} {"top-1 agree":>12s}')
    target = None
    for width, height in sizes:
        for count in counts:
            images = photos(folder, width, height, count)
            r = _pair(images, ckpt, extra, args.rounds)
            if (width * height, count) == max((w * h, n) for w, h in sizes for n in counts):
                target = r['ratio']
            print(f'{f"{width}x{height}":>14s} {count:6d} {r["cli"]:15.2f} {r["recipe"]:9.2f} {r["ratio"]:6.3f} '
                  f'{r["agree"]:>12s}', flush=True)
    small = photos(folder, 64, 48, 16)  # below every resize: no draft decoding, so results must agree exactly
    same, total, distinct, max_diff = agreement(run_cli(small, ckpt, extra)[2], run_recipe(small, ckpt)[2])
    print(f'top-1 agreement on small images (no decoding shortcut): {same}/{total} ({distinct} distinct classes), '
          f'max |top-1 prob diff| {max_diff:.2e}')
    largest = max(sizes, key=lambda wh: wh[0] * wh[1])
    print(f'{"MET    " if target <= TARGET else "NOT MET"} ema-classify / recipe wall time <= {TARGET} on '
          f'{max(counts)} x {largest[0]}x{largest[1]} ({target:.3f})')
    if args.clean:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
