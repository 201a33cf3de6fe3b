"""The CLI as users run it: ``ema-classify`` / ``ema-hub`` in a subprocess, on every kind of image and broken file.

Weights come from a local folder written by ``save_pretrained`` (``local-dir:``, the session fixture
``checkpoint``), a bare safetensors file (``--weights``) or the loopback Hub (``hf-hub:``). Each subprocess pays
torch's import, so the invocations are few and each checks a lot; the engine is tested in-process in
test_images.py, test_data.py, test_inference.py, test_features.py and test_output.py.
"""
import csv
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from ema_hub.engine.output import read_features
from support.cli import run
from support.images import BAD, GOOD
from support.models import LABELS, serve_base


def _records(proc: subprocess.CompletedProcess) -> List[dict]:
    return [json.loads(line) for line in proc.stdout.splitlines()]


def _check_records(records: List[dict], names: List[str], labels=LABELS) -> None:
    assert [Path(r['path']).name for r in records] == names
    for name, record in zip(names, records):
        if name in BAD:
            assert set(record) == {'path', 'error'} and BAD[name] in record['error'], record
        else:
            preds = record['predictions']
            assert len(preds) == 3 and all(p['label'] in labels for p in preds), record
            assert preds[0]['score'] >= preds[1]['score'] >= preds[2]['score']


def test_help_is_fast_and_does_not_import_torch() -> None:
    for entry in ('ema-classify', 'ema-hub'):
        proc = run(entry, '--help')
        assert proc.returncode == 0 and 'Usage' in proc.stdout
    assert 'features' in proc.stdout and 'publish' in proc.stdout
    probe = subprocess.run([sys.executable, '-c', 'import sys, ema_hub_cli.app; print("torch" in sys.modules, '
                                                  '"timm" in sys.modules, "ema_hub" in sys.modules)'],
                           capture_output=True, text=True)
    assert probe.stdout.split() == ['False', 'False', 'False'], probe.stderr


def test_classify_folder_jsonl_every_kind(inputs: Dict[str, Path], checkpoint: Path) -> None:
    folder = inputs['gray.png'].parent
    proc = run('ema-classify', str(folder), '--model', f'local-dir:{checkpoint}', '--top-k', '3', '-b', '4')
    assert proc.returncode == 1, proc.stderr  # broken files present
    _check_records(_records(proc), sorted(GOOD + list(BAD)))
    assert f'{len(BAD)} of {len(GOOD) + len(BAD)}' in proc.stderr


def test_classify_json_output_file_and_explicit_order(inputs: Dict[str, Path], checkpoint: Path,
                                                      tmp_path: Path) -> None:
    names = ['truncated.jpg', 'tiny.png', 'cmyk.jpg', 'exif6.jpg', 'bomb.png', 'depth16.png']
    out = tmp_path / 'sub' / 'out.json'
    missing = str(inputs['tiny.png'].parent / 'missing.png')
    proc = run('ema-classify', *[str(inputs[n]) for n in names], missing, '--model', f'local-dir:{checkpoint}',
               '-k', '3', '--output', str(out), '--workers', '0')
    assert proc.returncode == 1 and proc.stdout == ''
    records = json.loads(out.read_text())
    _check_records(records[:-1], names)
    assert records[-1] == {'path': missing, 'error': 'no such file or directory'}


def test_classify_csv_from_stdin_all_good_exits_0(inputs: Dict[str, Path], checkpoint: Path) -> None:
    names = ['nonsquare.JPG', 'palette_alpha.png', 'large.jpg', 'la.png']
    stdin = ''.join(f'{inputs[n]}\n' for n in names)
    proc = run('ema-classify', '-', '--model', f'local-dir:{checkpoint}', '--format', 'csv', '--top-k', '2',
               '--channels-last', stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert [Path(r['path']).name for r in rows] == names
    assert all(r['label'] in LABELS and r['error'] == '' and len(json.loads(r['predictions'])) == 2 for r in rows)


def test_classify_table_with_weights_file(inputs: Dict[str, Path], checkpoint: Path, tmp_path: Path) -> None:
    weights = tmp_path / 'finetuned.safetensors'
    shutil.copy(checkpoint / 'model.safetensors', weights)
    proc = run('ema-classify', str(inputs['gray.png']), '--model', 'resnet18_ema', '--weights', str(weights),
               '--format', 'table', '--top-k', '5')
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].endswith('gray.png') and len(lines) == 6 and '%' in lines[1]
    assert sorted(line.split(']')[-1].strip() for line in lines[1:]) == ['0', '1', '2', '3', '4']  # no names: index


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / 'notes.txt').write_text('no images here')
    proc = run('ema-classify', str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.startswith('error: no images found'), proc.stderr
    proc = run('ema-classify', str(tmp_path), '--top-k', '0')
    assert proc.returncode == 2
    (tmp_path / 'img.png').write_bytes(b'')
    proc = run('ema-classify', str(tmp_path), '--model', 'resnet18_nope')
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown model 'resnet18_nope'"), proc.stderr
    proc = run('ema-hub', 'features', str(tmp_path), '--model', 'resnet18_ema', '--output', 'x.npy')
    assert proc.returncode == 2 and 'npz' in proc.stderr


def test_hub_model_and_offline_cold_cache(inputs: Dict[str, Path], checkpoint: Path, fake_hub,
                                          hub_env: Dict[str, str]) -> None:
    for name in ('config.json', 'model.safetensors', 'README.md'):
        fake_hub.add_file('org/tiny-ema', name, (checkpoint / name).read_bytes())
    proc = run('ema-classify', str(inputs['rgba.png']), str(inputs['text.jpg']), '--model', 'hf-hub:org/tiny-ema',
               '-k', '3', '-f', 'jsonl', env=hub_env)
    assert proc.returncode == 1, proc.stderr
    _check_records(_records(proc), ['rgba.png', 'text.jpg'])

    offline = {**hub_env, 'HF_HUB_OFFLINE': '1'}
    proc = run('ema-classify', str(inputs['tiny.png']), '--model', 'resnet18_ema', env=offline)
    assert proc.returncode == 1 and proc.stdout == ''
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and 'ema-hub download' in lines[0], proc.stderr


def test_classify_with_any_warm_tag(inputs: Dict[str, Path], fake_hub, hub_env: Dict[str, str]) -> None:
    """A warm tag other than the default: that base tag's checkpoint, fetched from the (loopback) Hub."""
    serve_base(fake_hub, 'resnet18_ema', 'tv_in1k')
    proc = run('ema-classify', str(inputs['tiny.png']), '--model', 'resnet18_ema.warm_tv_in1k', '-k', '2', '-f',
               'jsonl', env=hub_env)
    assert proc.returncode == 0, proc.stderr
    assert len(_records(proc)[0]['predictions']) == 2


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_features(inputs: Dict[str, Path], checkpoint: Path, tmp_path: Path, suffix: str) -> None:
    names = ['exif6.jpg', 'empty.jpg', 'cmyk.jpg', 'depth16.png']
    out = tmp_path / f'feats{suffix}'
    proc = run('ema-hub', 'features', *[str(inputs[n]) for n in names], '--model', f'local-dir:{checkpoint}',
               '--output', str(out), '-b', '2')
    assert proc.returncode == 1
    assert f'error: {inputs["empty.jpg"]}: not an image' in proc.stderr and 'wrote 3 x 512' in proc.stderr
    good = [str(inputs[n]) for n in names if n not in BAD]
    features, paths, _ = read_features(out)
    assert features.shape == (3, 512) and features.dtype == np.float32 and paths == good
    assert np.isfinite(features).all()


def test_list_info_download_publish_convert(checkpoint: Path, tmp_path: Path, fake_hub,
                                            hub_env: Dict[str, str]) -> None:
    proc = run('ema-hub', 'list', '--format', 'json', env=hub_env)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert any(r['model'] == 'resnet18_ema.warm_a1_in1k' and r['default'] and r['cached'] is False for r in rows)

    proc = run('ema-hub', 'info', f'local-dir:{checkpoint}', '--json', env=hub_env)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info['num_classes'] == 5 and info['data_config']['input_size'] == [3, 224, 224]
    assert info['pretrained_cfg']['label_names'].startswith('5 names') and info['card_summary']

    for name in ('config.json', 'model.safetensors', 'README.md'):
        fake_hub.add_file('org/tiny-ema', name, (checkpoint / name).read_bytes())
    proc = run('ema-hub', 'download', 'hf-hub:org/tiny-ema', '--to', str(tmp_path / 'dl'), env=hub_env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / 'dl' / 'model.safetensors').read_bytes() == (checkpoint / 'model.safetensors').read_bytes()

    proc = run('ema-hub', 'publish', f'local-dir:{checkpoint}', 'me/tiny', '--dry-run', str(tmp_path / 'pub'),
               env=hub_env)
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in (tmp_path / 'pub').iterdir()} >= {'config.json', 'model.safetensors', 'README.md'}

    proc = run('ema-hub', 'convert', str(tmp_path / 'missing.pth'), 'resnet18_ema', str(tmp_path / 'o.safetensors'))
    assert proc.returncode == 1 and proc.stderr.startswith('error: ') and 'does not exist' in proc.stderr
