"""Files written whole or not at all, with the permissions the umask gives (ema_hub/files.py), and the package's
writers that go through it: feature files, saved and converted weights, fine-tuning checkpoints."""
import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ema_hub.engine.finetune import _atomic_save
from ema_hub.engine.output import FeatureWriter
from ema_hub.files import atomic_path, follow_umask
from ema_hub.hub import download, publish, save_pretrained


@pytest.fixture(params=[0o022, 0o077], ids=['umask022', 'umask077'])
def umask(request):
    """The process's umask for the test (nothing else here creates files meanwhile); the mode new files get."""
    old = os.umask(request.param)
    yield 0o666 & ~request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_path_gives_the_umasks_mode(tmp_path: Path, umask: int) -> None:
    with atomic_path(tmp_path / 'sub' / 'a.txt') as tmp:
        tmp.write_text('a')
    with atomic_path(tmp_path / 'w.safetensors') as tmp:  # safetensors replaces the file with a 0600 one of its own
        safetensors.torch.save_file({'w': torch.arange(3.0)}, str(tmp))
    assert (tmp_path / 'sub' / 'a.txt').read_text() == 'a'
    assert safetensors.torch.load_file(tmp_path / 'w.safetensors')['w'].tolist() == [0.0, 1.0, 2.0]
    assert _mode(tmp_path / 'sub' / 'a.txt') == _mode(tmp_path / 'w.safetensors') == umask
    assert sorted(os.listdir(tmp_path)) == ['sub', 'w.safetensors']  # no temporary file left


def test_follow_umask_fixes_a_file_a_library_wrote(tmp_path: Path, umask: int) -> None:
    weights = tmp_path / 'w.safetensors'
    safetensors.torch.save_file({'w': torch.zeros(1)}, str(weights))
    follow_umask(weights)
    assert _mode(weights) == umask and os.listdir(tmp_path) == ['w.safetensors']


def test_a_failed_write_leaves_the_previous_file(tmp_path: Path) -> None:
    out = tmp_path / 'out.txt'
    out.write_text('previous')
    with pytest.raises(OSError) as info:
        with atomic_path(out) as tmp:
            tmp.write_text('cut off')
            raise OSError(errno.ENOSPC, 'No space left on device')  # what a write on a full disk raises: no file
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out)  # named, for the one-line error
    assert out.read_text() == 'previous' and os.listdir(tmp_path) == ['out.txt']
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / 'new.txt') as tmp:
            tmp.write_text('half')
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ['out.txt']


def test_the_packages_writers_give_the_umasks_mode(tmp_path: Path, umask: int, tiny_model) -> None:
    for suffix in ('.npz', '.safetensors'):
        with FeatureWriter(tmp_path / f'feats{suffix}') as writer:
            writer.add(['a.png'], np.ones((1, 4), np.float32))
    save_pretrained(tiny_model, tmp_path / 'model')
    _atomic_save({'epoch': 1}, tmp_path / 'checkpoint.pt')
    written = [tmp_path / 'feats.npz', tmp_path / 'feats.safetensors', tmp_path / 'checkpoint.pt',
               *(tmp_path / 'model').iterdir()]
    assert {p.name for p in written} >= {'model.safetensors', 'config.json', 'README.md'}
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(umask) for p in written}
    assert sorted(os.listdir(tmp_path)) == ['checkpoint.pt', 'feats.npz', 'feats.safetensors', 'model']


def test_a_downloaded_folder_gives_the_umasks_mode(tmp_path: Path, umask: int, tiny_model, fake_hub) -> None:
    publish(tiny_model, 'someone/tiny', token='test')
    folder = download('hf-hub:someone/tiny', to=tmp_path / 'copy')
    files = [p for p in folder.iterdir() if p.is_file()]
    assert {p.name for p in files} >= {'model.safetensors', 'config.json', 'README.md'}
    assert {p.name: oct(_mode(p)) for p in files} == {p.name: oct(umask) for p in files}
