"""Pooled embeddings of image files (ema_hub/engine/features.py): batch by batch, gathered (one process here; the
torchrun runs are in test_distributed.py) and written by ``extract_features``, what ``ema-hub features`` runs."""
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from ema_hub.engine.features import FeatureSummary, extract_features, gather_features, iter_features, \
    pooled_features
from ema_hub.engine.images import InputEntry
from ema_hub.engine.output import read_features
from ema_hub.errors import UsageError


def test_iter_features_shapes_and_shards(tiny_model, inputs: Dict[str, Path]) -> None:
    entries = [InputEntry(str(inputs[n])) for n in ['tiny.png', 'empty.jpg', 'gray.png', 'la.png']]
    batches = list(iter_features(entries, tiny_model, batch_size=2, workers=0))
    paths = [p for b in batches for p in b.paths]
    assert paths == [entries[i].path for i in (0, 2, 3)]
    assert all(b.features.shape == (len(b.paths), 512) and b.features.dtype == np.float32 for b in batches)
    assert [p for b in batches for p, _ in b.errors] == [entries[1].path]
    shard = [p for b in iter_features(entries, tiny_model, workers=0, rank=1, world_size=2) for p in b.paths]
    assert shard == [entries[3].path]  # entries[1::2] minus the broken one


def test_pooled_features_are_the_heads_input(tiny_model) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = pooled_features(tiny_model, x)
        assert feats.shape == (2, 512)
        torch.testing.assert_close(tiny_model.fc(feats), tiny_model(x))


def test_gather_features_in_one_process_is_iter_features(tiny_model, inputs: Dict[str, Path]) -> None:
    entries = [InputEntry(str(inputs[n])) for n in ['gray.png', 'text.jpg', 'palette.png']]
    one = list(iter_features(entries, tiny_model, batch_size=2, workers=0))
    gathered = list(gather_features(entries, tiny_model, batch_size=2, workers=0, round_size=1))
    assert [b.paths for b in gathered] == [b.paths for b in one] and [b.errors for b in gathered] == [
        b.errors for b in one]
    for a, b in zip(gathered, one):
        np.testing.assert_array_equal(a.features, b.features)


@pytest.fixture
def torch_threads():
    """extract_features sets torch's thread count as the CLI would: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_extract_features_writes_the_file_and_reports_failures(checkpoint: Path, inputs: Dict[str, Path],
                                                               tmp_path: Path, suffix: str, torch_threads) -> None:
    names = ['exif6.jpg', 'empty.jpg', 'cmyk.jpg', 'depth16.png']
    entries = [InputEntry(str(inputs[n])) for n in names] + [InputEntry('gone.png', 'no such file or directory')]
    out = tmp_path / 'sub' / f'feats{suffix}'
    reported = []
    summary = extract_features(entries, f'local-dir:{checkpoint}', str(out), device='cpu', batch_size=2, workers=0,
                               report=lambda path, reason: reported.append((Path(path).name, reason)))
    assert summary == FeatureSummary(rows=3, dim=512, failed=2)
    assert [name for name, _ in reported] == ['empty.jpg', 'gone.png']
    assert 'not an image' in reported[0][1] and reported[1][1] == 'no such file or directory'
    good = [str(inputs[n]) for n in names if n != 'empty.jpg']
    features, paths, metadata = read_features(out)
    assert metadata == ({} if suffix == '.npz' else {'model': f'local-dir:{checkpoint}'})
    assert features.shape == (3, 512) and features.dtype == np.float32 and paths == good
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no spill file left


def test_extract_features_refuses_an_unknown_suffix(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match='.npz or .safetensors'):
        extract_features([InputEntry('x.png')], f'local-dir:{checkpoint}', str(tmp_path / 'x.npy'), device='cpu')
    assert list(tmp_path.iterdir()) == []
