"""Benchmark: ``ema-classify DIR`` against the straightforward batched timm recipe, side by side.

    python -m ema_hub.engine.bench_classify [--dir DIR] [--images 48] [--rounds 3]

Both sides run as fresh processes (start-up included) on the same folder of large "photo-like" JPEGs
(3000x2000: smooth gradients, shapes and sensor-like noise, so decoding costs what a camera photo costs) and
load the same model from the same place: a resnet18_ema checkpoint written once with ``save_pretrained``
(random weights, BatchNorm statistics calibrated on generated images so that predictions differ between
images; there is no network here). The recipe is: PIL open + ``convert('RGB')``, timm's eval transform from
the model's pretrained cfg, batches of 16, ``inference_mode``. Rounds alternate the two sides and the median
times are compared. Top-1 agreement is reported on the large JPEGs (where ema-classify's JPEG draft mode
applies) and on a set of small images where no decoding shortcut applies (there it must be 100%).
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


def prepare(folder: Path, count: int, small: int) -> Tuple[Path, Path, Path]:
    """Large JPEGs, small JPEGs (no draft applies) and the checkpoint, reused when already there."""
    large_dir, small_dir, ckpt = folder / 'large', folder / 'small', folder / 'resnet18_ema'
    for sub, n, size, offset in ((large_dir, count, (3000, 2000), 0), (small_dir, small, (640, 480), 10_000)):
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            path = sub / f'photo_{i:03d}.jpg'
            if not path.exists():
                photo(*size, seed=offset + i).save(path, quality=90)
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
    return large_dir, small_dir, ckpt


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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--dir', default=os.path.join(tempfile.gettempdir(), 'ema_bench_classify'),
                        help='work folder (images and checkpoint are generated once and reused)')
    parser.add_argument('--images', type=int, default=48)
    parser.add_argument('--small', type=int, default=16, help='small images for the no-shortcut agreement check')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--cli-args', default='', help='extra ema-classify options, e.g. "--workers 2 -b 16"')
    parser.add_argument('--clean', action='store_true', help='remove the work folder at the end')
    args = parser.parse_args(argv)

    folder = Path(args.dir)
    t0 = time.perf_counter()
    large, small, ckpt = prepare(folder, args.images, args.small)
    print(f'data: {args.images} x 3000x2000 JPEG ({sum(p.stat().st_size for p in large.iterdir()) / 2**20:.0f} MiB) '
          f'+ {args.small} x 640x480 in {folder} (prepared in {time.perf_counter() - t0:.1f} s); '
          f'cpus={os.cpu_count()}, load avg={os.getloadavg()[0]:.1f}', flush=True)
    extra = args.cli_args.split()
    cli_times, recipe_times, cli_cpu, recipe_cpu = [], [], [], []
    cli_out = recipe_out = None
    for r in range(args.rounds):
        # alternate which side goes first, so background load drifts hit both alike
        order = (('cli', 'recipe') if r % 2 == 0 else ('recipe', 'cli'))
        for side in order:
            if side == 'cli':
                t, c, cli_out = run_cli(large, ckpt, extra)
                cli_times.append(t)
                cli_cpu.append(c)
            else:
                t, c, recipe_out = run_recipe(large, ckpt)
                recipe_times.append(t)
                recipe_cpu.append(c)
        print(f'round {r + 1}: ema-classify {cli_times[-1]:.2f} s (cpu {cli_cpu[-1]:.2f} s), recipe '
              f'{recipe_times[-1]:.2f} s (cpu {recipe_cpu[-1]:.2f} s), wall ratio '
              f'{cli_times[-1] / recipe_times[-1]:.3f}, load avg {os.getloadavg()[0]:.1f}', flush=True)
    cli_med, recipe_med = statistics.median(cli_times), statistics.median(recipe_times)
    cpu_cli, cpu_recipe = statistics.median(cli_cpu), statistics.median(recipe_cpu)
    print(f'median cpu time: ema-classify {cpu_cli:.2f} s, recipe {cpu_recipe:.2f} s, ratio {cpu_cli / cpu_recipe:.3f}')
    same, total, distinct, max_diff = agreement(cli_out, recipe_out)
    print(f'median: ema-classify {cli_med:.2f} s, recipe {recipe_med:.2f} s, ratio {cli_med / recipe_med:.3f} '
          f'(target <= 0.75)')
    print(f'top-1 agreement on large JPEGs (draft mode): {same}/{total} ({distinct} distinct classes in the '
          f'recipe), max |top-1 prob diff| where equal {max_diff:.2e}')
    _, _, cli_small = run_cli(small, ckpt, extra)
    _, _, recipe_small = run_recipe(small, ckpt)
    same, total, distinct, max_diff = agreement(cli_small, recipe_small)
    print(f'top-1 agreement on small JPEGs (no decoding shortcut): {same}/{total} ({distinct} distinct classes), '
          f'max |top-1 prob diff| {max_diff:.2e}')
    if args.clean:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == '__main__':
    main()
