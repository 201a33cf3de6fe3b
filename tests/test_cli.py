"""The CLI as users run it: ``ema-classify`` / ``ema-hub`` in a subprocess, on every kind of image and broken file.

Weights come from a local folder written by ``save_pretrained`` (``local-dir:``, the session fixture
``checkpoint``), a bare safetensors file (``--weights``) or the loopback Hub (``hf-hub:``). Each subprocess pays
torch's import, so the invocations are few and each checks a lot; the engine is tested in-process in
test_images.py, test_data.py, test_inference.py, test_features.py and test_output.py.
"""
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from ema_hub.engine.output import read_features
from support.cli import run
from support.images import BAD, GOOD
from support.models import LABELS, serve_base, train_py_checkpoint


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


def test_help_texts_show_their_brackets() -> None:
    """Rich reads [word] in a help text as markup and drops it (pip install 'ema-hub[export]' showed as 'ema-hub'):
    every bracket in a command's help, epilog and option help is escaped."""
    import typer.main

    from ema_hub_cli.app import app, classify_app

    texts = []
    for typer_app in (app, classify_app):
        group = typer.main.get_command(typer_app)
        for cmd in getattr(group, 'commands', {None: group}).values():
            texts += [cmd.help or '', cmd.epilog or ''] + [getattr(p, 'help', None) or '' for p in cmd.params]
    assert [text for text in texts if re.search(r'(?<!\\)\[', text)] == []
    proc = run('ema-hub', 'export', '--help')
    assert proc.returncode == 0 and "pip install 'ema-hub[export]'" in ' '.join(proc.stdout.split())


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


def test_classify_gives_every_argument_a_record_in_its_place(inputs: Dict[str, Path], checkpoint: Path,
                                                             tmp_path: Path) -> None:
    """A missing path, a pattern that matches nothing and a folder without images each get an error record (exit
    1); a file whose name holds glob characters is that file."""
    literal = tmp_path / 'shot[1].png'
    shutil.copy(inputs['tiny.png'], literal)
    (tmp_path / 'empty').mkdir()
    args = [str(tmp_path / 'missing[1].png'), str(inputs['tiny.png']), str(tmp_path / 'nomatch' / '*.png'),
            str(literal), str(tmp_path / 'empty')]
    proc = run('ema-classify', *args, '--model', f'local-dir:{checkpoint}', '-k', '3')
    assert proc.returncode == 1, proc.stderr
    records = _records(proc)
    assert [r['path'] for r in records] == args and [len(r['predictions']) for r in records[1::2]] == [3, 3]
    assert [r['error'] for r in records[::2]] == [
        'no such file, and no image file matches it as a pattern',
        'no such file, and no image file matches it as a pattern', 'no image files in this folder']


def test_classify_output_file_is_whole_or_untouched(inputs: Dict[str, Path], checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """-o FILE appears once every record is written: a disk that fills up on the second record (its write raises
    ENOSPC) leaves the previous FILE as it was, no temporary file, and one error line."""
    out = tmp_path / 'preds.jsonl'
    out.write_text('previous run\n')
    script = textwrap.dedent('''
        import errno, sys
        from ema_hub.engine import output
        write = output.RecordWriter.write
        def full_disk(self, record):
            if self.count:
                raise OSError(errno.ENOSPC, 'No space left on device')
            write(self, record)
        output.RecordWriter.write = full_disk
        from ema_hub_cli.app import classify_main
        sys.argv[0] = 'ema-classify'
        classify_main()
    ''')
    images = [str(inputs[n]) for n in ('tiny.png', 'gray.png')]
    model = ['--model', f'local-dir:{checkpoint}', '-o', str(out)]
    proc = subprocess.run([sys.executable, '-c', script, *images, *model], capture_output=True, text=True,
                          env={**os.environ, 'HF_HUB_OFFLINE': '1'}, timeout=600)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f'error: {out}: No space left on device (left as it was)'], proc.stderr
    assert out.read_text() == 'previous run\n' and os.listdir(tmp_path) == ['preds.jsonl']
    proc = run('ema-classify', *images, *model)  # the same run with room on the disk replaces it whole
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)['path'] for line in out.read_text().splitlines()] == images
    assert os.listdir(tmp_path) == ['preds.jsonl']


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


class _Custom:
    """A class of the test's own: harmless, but weights-only loading must refuse any class it does not know."""


def test_timm_training_checkpoint_classify_and_convert(inputs: Dict[str, Path], tmp_path: Path) -> None:
    """A DDP run's model_best.pth.tar (keys under module., args pickled): ema-classify --weights classifies with its
    state_dict, as the model does in-process; convert --use-ema writes its averaged weights; a checkpoint that
    pickles a class of its own is refused in one line."""
    import safetensors.torch
    import torch

    from ema_hub.engine.images import list_inputs
    from ema_hub.engine.inference import classify

    model, averaged, path = train_py_checkpoint(tmp_path / 'run', ddp=True)
    image = str(inputs['gray.png'])
    proc = run('ema-classify', image, '--model', 'resnet18_ema', '--weights', str(path), '-f', 'jsonl')
    assert proc.returncode == 0 and proc.stderr.splitlines() == ['weights: model_best.pth.tar, entry state_dict']
    got, = _records(proc)
    want, = classify(list_inputs([image]), model)
    assert [p['index'] for p in got['predictions']] == [p['index'] for p in want['predictions']]
    assert np.allclose([p['score'] for p in got['predictions']], [p['score'] for p in want['predictions']], atol=1e-5)

    out = tmp_path / 'averaged.safetensors'
    proc = run('ema-hub', 'convert', str(path), 'resnet18_ema', str(out), '--use-ema')
    assert proc.returncode == 0 and 'with 5 classes' in proc.stdout, proc.stderr
    assert proc.stderr.splitlines() == ['weights: model_best.pth.tar, entry state_dict_ema']
    converted = safetensors.torch.load_file(str(out))
    assert all(converted[k].equal(v) for k, v in averaged.state_dict().items())

    evil = tmp_path / 'custom.pth.tar'
    torch.save({'state_dict': model.state_dict(), 'args': _Custom()}, evil)
    proc = run('ema-classify', image, '--model', 'resnet18_ema', '--weights', str(evil))
    lines = proc.stderr.splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith(f'error: {evil} pickles ')
    assert '_Custom' in lines[0] and 'weights-only' in lines[0] and proc.stdout == ''


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    (tmp_path / 'notes.txt').write_text('no images here')
    proc = run('ema-classify', '-', stdin='')  # no input at all (a folder without images is an error record)
    assert proc.returncode == 2 and proc.stderr.startswith('error: no input'), proc.stderr
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


def test_arguments_yielding_nothing_are_error_records(checkpoint: Path, tmp_path: Path) -> None:
    """Issue 26's command line: no argument yields an image, yet each gets its error record in input order, exit 1."""
    (tmp_path / 'nomatch').mkdir()
    (tmp_path / 'nomatch' / 'notes.txt').write_text('no images here')
    reason = 'no such file, and no image file matches it as a pattern'  # missing[1].png is a pattern too
    want = [{'path': 'missing[1].png', 'error': reason}, {'path': 'nomatch/*.png', 'error': reason}]
    args = ['missing[1].png', 'nomatch/*.png', '--model', f'local-dir:{checkpoint}']
    proc = run('ema-classify', *args, '-f', 'jsonl', cwd=tmp_path)
    assert proc.returncode == 1 and _records(proc) == want, proc.stderr
    assert proc.stderr.splitlines()[-1] == '2 of 2 image(s) could not be classified'
    proc = run('ema-classify', *args, '-f', 'table', cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout.splitlines() == [line for r in want for line in (r['path'], f"  error: {r['error']}")]


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_features(inputs: Dict[str, Path], checkpoint: Path, tmp_path: Path, suffix: str) -> None:
    names = ['exif6.jpg', 'empty.jpg', 'cmyk.jpg', 'depth16.png']
    out = tmp_path / f'feats{suffix}'
    # arguments that yield no image are reported in input order, as in classify
    missing, nomatch = str(tmp_path / 'missing.png'), str(tmp_path / 'nomatch' / '*.png')
    paths = [str(inputs[n]) for n in names]
    proc = run('ema-hub', 'features', paths[0], missing, *paths[1:], nomatch, '--model',
               f'local-dir:{checkpoint}', '--output', str(out), '-b', '2')
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
    assert errors[0] == f'error: {missing}: no such file or directory', proc.stderr
    assert errors[1].startswith(f'error: {inputs["empty.jpg"]}: not an image') and len(errors) == 3
    assert errors[2] == f'error: {nomatch}: no such file, and no image file matches it as a pattern'
    assert 'wrote 3 x 512' in proc.stderr and '3 image(s) failed' in proc.stderr
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
