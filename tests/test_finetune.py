"""`ema-hub finetune` on real data: scikit-learn's handwritten digits as an ImageFolder.

The digits (1797 8x8 grayscale images, 0..16) are upscaled to 32x32 RGB PNGs and split 80/20, stratified and
deterministic, into train/ and val/ (support/digits.py). The main run is the issue's command line, as a
subprocess: ``ema-hub finetune resnet18_ema DATA --no-pretrained --epochs 8 --img-size 32 --output DIR``
(the session fixture ``trained`` in conftest.py, shared with test_validate.py); its reported top-1 must reach
90 % and equal an independent evaluation of the saved folder. Resume and bad-data tests use a small subset to
stay quick.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ema_hub import EMA, hub
from support.cli import CLI, ROOT, run, run_module as run_cli
from support.digits import independent_eval
from support.models import random_base

pytest.importorskip('sklearn')


def test_finetune_digits_reaches_90_and_reports_true_accuracy(trained, measured):
    out, metrics, proc = trained
    assert metrics['top1'] >= 90.0, metrics['history']
    assert metrics['epochs'] == 8 and len(metrics['history']) == 8
    assert metrics['num_classes'] == 10 and metrics['classes'] == [str(d) for d in range(10)]
    assert metrics['images_skipped'] == 0 and metrics['val_images'] == measured['n'] == 360
    assert metrics['train_time_s'] > 0
    # The reported accuracy is the saved model's, preprocessed as its config.json says.
    assert measured['top1'] == pytest.approx(metrics['top1'], abs=1e-9)
    assert measured['top5'] == pytest.approx(metrics['top5'], abs=1e-9)
    assert measured['input_size'] == (3, 32, 32)
    # stdout: one JSON summary line; stderr: the per-epoch log.
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary['top1'] == metrics['top1']
    assert proc.stderr.count('epoch 8/8: train loss') == 1


def test_output_folder_is_hub_layout_with_labels_and_data_config(trained):
    out, metrics, _ = trained
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']
    config = json.loads((out / 'config.json').read_text())
    pcfg = config['pretrained_cfg']
    assert config['num_classes'] == pcfg['num_classes'] == 10
    assert config['label_names'] == pcfg['label_names'] == [str(d) for d in range(10)]
    assert tuple(pcfg['input_size']) == (3, 32, 32)
    for key in ('interpolation', 'crop_pct', 'mean', 'std'):
        assert pcfg[key] == metrics['data_config'][key] or tuple(pcfg[key]) == tuple(metrics['data_config'][key])
    assert 'test_input_size' not in pcfg
    card = (out / 'README.md').read_text()
    assert f'{metrics["top1"]:.2f} %' in card

    model = hub.create_model(f'local-dir:{out}')
    assert hub.class_labels(model) == [str(d) for d in range(10)]


def test_classify_prints_class_folder_names(trained, digits):
    out = trained[0]
    image = sorted((digits / 'val' / '7').glob('*.png'))[0]
    proc = run('ema-classify', '--model', f'local-dir:{out}', str(image), '--format', 'json', '--top-k', '3')
    assert proc.returncode == 0, proc.stderr
    records = json.loads(proc.stdout)
    records = records if isinstance(records, list) else [records]
    labels = [p['label'] for p in records[0]['predictions']]
    assert set(labels) <= {str(d) for d in range(10)} and len(labels) == 3


def _checkpoint_epoch(path: Path) -> int:
    try:
        return int(torch.load(str(path), map_location='cpu', weights_only=True)['epoch'])
    except Exception:  # being written: atomic rename makes this rare
        return 0


def test_interrupted_run_resumes_from_last_completed_epoch(small_digits, tmp_path):
    out = tmp_path / 'run'
    args = ['finetune', 'resnet18_ema', str(small_digits), '--no-pretrained', '--epochs', '3', '--img-size', '32',
            '--output', str(out), '--workers', '0']
    env = {**os.environ, 'HF_HUB_OFFLINE': '1'}
    ckpt = out / 'checkpoint.pt'
    with open(tmp_path / 'first.log', 'w') as log:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(CLI + args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 600
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # a hard kill: nothing gets the chance to clean up
        proc.wait(timeout=60)
    assert ckpt.exists(), 'no checkpoint was written'
    done = _checkpoint_epoch(ckpt)
    assert 1 <= done < 3
    assert not (out / 'metrics.json').exists() and not (out / 'model.safetensors').exists()

    # Without --resume the folder is refused: one error line, no traceback.
    again = run_cli(args, timeout=300)
    assert again.returncode == 1 and '--resume' in again.stderr and 'Traceback' not in again.stderr

    resumed = run_cli(args + ['--resume'], timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resuming from epoch {done} of 3' in resumed.stderr
    assert f'epoch {done}/3:' not in resumed.stderr and 'epoch 3/3:' in resumed.stderr
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['epochs'] == 3 and [h['epoch'] for h in metrics['history']] == [1, 2, 3]
    assert not ckpt.exists()
    assert independent_eval(out, small_digits / 'val')['top1'] == pytest.approx(metrics['top1'], abs=1e-9)


def test_torchrun_two_processes_train_and_save_once(small_digits, tmp_path):
    out = tmp_path / 'ddp'
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1'}
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc-per-node', '2', '-m',
         'ema_hub_cli.app', 'finetune', 'resnet18_ema', str(small_digits), '--no-pretrained', '--epochs', '2',
         '--img-size', '32', '--output', str(out), '--workers', '0', '--device', 'cpu'],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Rank 0 alone prints and writes: one summary, one header, one set of files.
    assert len([line for line in proc.stdout.splitlines() if line.startswith('{')]) == 1
    assert proc.stderr.count('fine-tuning resnet18_ema') == 1
    assert 'x 2 process(es)' in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ['README.md', 'config.json', 'metrics.json', 'model.safetensors']
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['world_size'] == 2 and metrics['epochs'] == 2 and metrics['val_images'] == 60
    # Sharded validation, summed over ranks, equals a single-process evaluation of the saved model.
    assert independent_eval(out, small_digits / 'val')['top1'] == pytest.approx(metrics['top1'], abs=1e-9)


def _bad_data(tmp_path: Path, small_digits: Path, kind: str) -> Path:
    data = tmp_path / kind
    shutil.copytree(small_digits, data)
    if kind == 'no_val':
        shutil.rmtree(data / 'val')
    elif kind == 'empty_class':
        for f in (data / 'train' / '3').iterdir():
            f.unlink()
    elif kind == 'mismatch':
        shutil.rmtree(data / 'val' / '9')
    return data


@pytest.mark.parametrize('kind, expected', [
    ('no_val', 'has no val/'),
    ('empty_class', 'class folder(s) without images: 3'),
    ('mismatch', 'only in train/: 9'),
])
def test_bad_data_gets_one_clear_line(small_digits, tmp_path, kind, expected):
    data = _bad_data(tmp_path, small_digits, kind)
    proc = run_cli(['finetune', 'resnet18_ema', str(data), '--no-pretrained', '--output', str(tmp_path / 'o')],
                   timeout=300)
    assert proc.returncode == 1
    assert expected in proc.stderr and 'Traceback' not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith('error: ')
    assert not (tmp_path / 'o').exists()


def test_unreadable_images_are_skipped_and_counted(small_digits, tmp_path):
    from ema_hub.engine.finetune import FinetuneConfig, finetune

    data = tmp_path / 'data'
    shutil.copytree(small_digits, data)
    (data / 'train' / '0' / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really a png')
    (data / 'val' / '5' / 'truncated.png').write_bytes((small_digits / 'val' / '5').glob('*.png').__next__()
                                                      .read_bytes()[:40])
    metrics = finetune(FinetuneConfig('resnet18_ema', str(data), str(tmp_path / 'out'), epochs=1, img_size=32,
                                      pretrained=False, workers=0), progress=False)
    assert metrics['images_skipped'] == 2
    assert sorted(Path(p).name for p in metrics['skipped_files']) == ['broken.png', 'truncated.png']
    assert metrics['val_images'] == 60 and metrics['train_images'] == 241
    assert json.loads((tmp_path / 'out' / 'metrics.json').read_text())['images_skipped'] == 2


def test_add_ema_grafts_any_timm_model_end_to_end(small_digits, fake_hub, hub_env, tmp_path):
    """``ema-hub finetune resnet18.a1_in1k DATA --add-ema``: timm's own checkpoint (a random one, served by the
    loopback Hub), EMA grafted into it, fine-tuned; the folder loads with local-dir:, classifies and publishes."""
    base = random_base('resnet18')
    fake_hub.add_file('timm/resnet18.a1_in1k', 'model.safetensors', safetensors.torch.save(base.state_dict()))
    out = tmp_path / 'grafted'
    proc = run('ema-hub', 'finetune', 'resnet18.a1_in1k', str(small_digits), '--add-ema', '--epochs', '1',
               '--img-size', '32', '--hflip', '0', '--output', str(out), env=hub_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / 'config.json').read_text())
    assert config['architecture'] == 'ema_grafted' and config['model_args']['base'] == 'resnet18.a1_in1k'
    model = hub.create_model(f'local-dir:{out}')
    layers = [m for m in model.modules() if isinstance(m, EMA)]
    assert len(layers) == 8 and all(m.gn.weight.abs().sum() > 0 for m in layers)  # trained from their x/2 start
    assert hub.class_labels(model) == [str(d) for d in range(10)]
    image = sorted((small_digits / 'val' / '3').glob('*.png'))[0]
    proc = run('ema-classify', '--model', f'local-dir:{out}', str(image), '--format', 'json', env=hub_env)
    assert proc.returncode == 0, proc.stderr
    proc = run('ema-hub', 'publish', f'local-dir:{out}', 'me/grafted', '--dry-run', str(tmp_path / 'pub'),
               env=hub_env)
    assert proc.returncode == 0, proc.stderr
    card = (tmp_path / 'pub' / 'README.md').read_text()
    assert 'resnet18.a1_in1k' in card and 'add_ema' in card


def test_add_ema_needs_a_timm_model(small_digits, tmp_path):
    proc = run('ema-hub', 'finetune', 'no_such_net', str(small_digits), '--add-ema', '--output', str(tmp_path / 'o'))
    assert proc.returncode == 2 and 'not a timm model name' in proc.stderr
