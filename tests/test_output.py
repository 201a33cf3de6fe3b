"""Writers of classification records and feature files, and the progress bar (ema_hub/engine/output.py)."""
import csv
import io
import json
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from ema_hub.engine.output import FeatureWriter, RecordWriter, check_feature_output, format_for_output, progress_bar, \
    read_features
from ema_hub.errors import UsageError


RECORDS: List[Dict[str, object]] = [
    {'path': 'a.jpg', 'predictions': [{'index': 3, 'label': 'dog, "good"', 'score': 0.75},
                                      {'index': 1, 'label': 'cat', 'score': 0.25}]},
    {'path': 'b.jpg', 'error': 'not an image'},
]


def _write(fmt: str) -> str:
    out = io.StringIO()
    writer = RecordWriter(out, fmt)
    for r in RECORDS:
        writer.write(r)
    writer.close()
    return out.getvalue()


def test_record_formats() -> None:
    assert json.loads(_write('json')) == RECORDS
    assert [json.loads(line) for line in _write('jsonl').splitlines()] == RECORDS
    rows = list(csv.DictReader(io.StringIO(_write('csv'))))
    assert [r['path'] for r in rows] == ['a.jpg', 'b.jpg']
    assert (rows[0]['index'], rows[0]['label'], float(rows[0]['score'])) == ('3', 'dog, "good"', 0.75)
    assert json.loads(rows[0]['predictions']) == RECORDS[0]['predictions'] and rows[0]['error'] == ''
    assert rows[1]['error'] == 'not an image' and rows[1]['label'] == ''
    table = _write('table')
    assert 'a.jpg' in table and '75.00%' in table and 'error: not an image' in table
    empty = io.StringIO()
    RecordWriter(empty, 'json').close()
    assert json.loads(empty.getvalue()) == []
    assert format_for_output('x.csv', io.StringIO()) == 'csv'
    assert format_for_output(None, io.StringIO()) == 'jsonl'  # not a terminal


def test_progress_only_on_a_terminal(monkeypatch) -> None:
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.delenv('HF_HUB_DISABLE_PROGRESS_BARS', raising=False)
    quiet, loud, off = io.StringIO(), Tty(), Tty()
    bars = [progress_bar(10, stream=quiet), progress_bar(10, stream=loud), progress_bar(10, stream=off, enabled=False)]
    time.sleep(0.6)  # a bar first draws after half a second
    for bar in bars:
        bar.update(10)
        bar.close()
    assert quiet.getvalue() == '' and off.getvalue() == '' and '10/10' in loud.getvalue()


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_feature_writer_round_trip(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f'f{suffix}'
    rng = np.random.default_rng(0)
    chunks = [rng.normal(size=(n, 7)).astype(np.float32) for n in (3, 0, 2)]
    names = [[f'img{i}_{j}.jpg' for j in range(len(c))] for i, c in enumerate(chunks)]
    with FeatureWriter(out, metadata={'model': 'm'}) as writer:
        for n, c in zip(names, chunks):
            writer.add(n, c)
    want = np.concatenate(chunks)
    paths = [p for n in names for p in n]
    if suffix == '.npz':
        with np.load(out) as data:
            assert data['features'].dtype == np.float32 and np.array_equal(data['features'], want)
            assert data['paths'].tolist() == paths
    else:
        from safetensors import safe_open
        with safe_open(str(out), framework='np') as f:
            assert np.array_equal(f.get_tensor('features'), want)
            assert json.loads(f.metadata()['paths']) == paths and f.metadata()['model'] == 'm'
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no spill files left


def test_feature_writer_empty_and_bad_suffix(tmp_path: Path) -> None:
    with FeatureWriter(tmp_path / 'e.npz'):
        pass
    with np.load(tmp_path / 'e.npz') as data:
        assert data['features'].shape == (0, 0) and data['paths'].shape == (0,)
    with pytest.raises(ValueError, match='.npz or .safetensors'):
        FeatureWriter(tmp_path / 'x.npy')


def test_check_feature_output(tmp_path: Path) -> None:
    for name in ('f.npz', 'f.safetensors', 'F.NPZ', 'sub/f.SafeTensors'):
        assert check_feature_output(str(tmp_path / name)) == tmp_path / name
    assert not (tmp_path / 'sub').exists()  # only checked: nothing is created
    for name in ('x.npy', 'x', 'x.npz.txt', 'x.json'):
        with pytest.raises(UsageError, match='.npz or .safetensors') as info:
            check_feature_output(tmp_path / name)
        assert isinstance(info.value, ValueError) and info.value.exit_code == 2 and repr(Path(name).name) in str(info.value)


@pytest.mark.parametrize('suffix', ['.npz', '.safetensors'])
def test_read_features_reads_what_the_writer_wrote(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f'f{suffix}'
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    with FeatureWriter(out, metadata={'model': 'm'}) as writer:
        writer.add(['a.jpg', 'b.jpg', 'c.jpg'], features)
    got, paths, metadata = read_features(out)
    assert np.array_equal(got, features) and got.dtype == np.float32 and paths == ['a.jpg', 'b.jpg', 'c.jpg']
    assert metadata == ({} if suffix == '.npz' else {'model': 'm'})
