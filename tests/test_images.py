"""Input listing, decoding (EXIF, modes, draft, broken files), output writers and the inference engine, in-process.

``make_inputs`` (also used by test_cli.py) writes one image of every kind the CLI must read plus broken files.
"""
import io
import json
import struct
import time
import zlib
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image

from ema_hub.engine.images import DECODE_ERRORS, InputEntry, describe_error, iter_inputs, list_inputs, load_image, \
    to_rgb
from ema_hub.engine.output import FeatureWriter, RecordWriter, format_for_output, progress_bar

# ---------------------------------------------------------------------------------------------------------------
# Generated inputs


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Photo-like content: smooth gradients plus a little noise (realistic JPEG size and decode cost)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / (width / 3.1) + seed)
    g = 128 + 100 * np.cos(y / (height / 2.3) - seed)
    b = 128 + 80 * np.sin((x + y) / ((width + height) / 5.7))
    img = np.stack([r, g, b], -1) + rng.normal(0, 6, (height, width, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def bomb_png() -> bytes:
    """A valid-looking PNG header that declares 50000 x 50000 pixels (a decompression bomb), and no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)
    ihdr = struct.pack('>IIBBBBB', 50000, 50000, 8, 2, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 64)) + chunk(b'IEND', b'')


# name -> None for readable images, or a fragment expected in the error reason
GOOD = ['exif6.jpg', 'gray.png', 'large.jpg', 'nonsquare.JPG', 'palette.png', 'palette_alpha.png', 'rgba.png',
        'cmyk.jpg', 'depth16.png', 'tiny.png', 'la.png']
BAD = {'empty.jpg': 'not an image', 'text.jpg': 'not an image', 'truncated.jpg': 'truncated',
       'bomb.png': 'decompression bomb'}


def make_inputs(folder: Path, large: bool = True) -> Dict[str, Path]:
    """Write every kind of image (and broken file) the CLI must handle into ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    p = {n: folder / n for n in GOOD + list(BAD)}
    rgb = _photo(96, 64, 1)
    Image.fromarray(rgb).save(p['exif6.jpg'], exif=_exif_orientation(6), quality=90)
    Image.fromarray(rgb[..., 0]).save(p['gray.png'])
    if large:
        Image.fromarray(_photo(3000, 2000, 2)).save(p['large.jpg'], quality=85)
    else:
        Image.fromarray(_photo(120, 80, 2)).save(p['large.jpg'], quality=85)
    Image.fromarray(_photo(300, 100, 3)).save(p['nonsquare.JPG'], format='JPEG')
    Image.fromarray(rgb).quantize(16).save(p['palette.png'])
    pal = Image.fromarray(rgb).quantize(16)
    pal.info['transparency'] = 0
    pal.save(p['palette_alpha.png'], transparency=0)
    rgba = np.dstack([rgb, np.tile(np.linspace(0, 255, 96, dtype=np.uint8), (64, 1))])
    Image.fromarray(rgba, 'RGBA').save(p['rgba.png'])
    Image.fromarray(rgb).convert('CMYK').save(p['cmyk.jpg'], quality=90)
    Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(p['depth16.png'])
    Image.new('RGB', (1, 1), (200, 10, 10)).save(p['tiny.png'])
    Image.fromarray(np.dstack([rgb[..., 2], rgba[..., 3]]), 'LA').save(p['la.png'])
    p['empty.jpg'].write_bytes(b'')
    p['text.jpg'].write_text('this is not a JPEG\n')
    buf = io.BytesIO()
    Image.fromarray(_photo(200, 150, 4)).save(buf, format='JPEG', quality=90)
    p['truncated.jpg'].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    p['bomb.png'].write_bytes(bomb_png())
    (folder / 'notes.txt').write_text('not an image, skipped when listing a folder')
    return p


@pytest.fixture(scope='module')
def inputs(tmp_path_factory) -> Dict[str, Path]:
    return make_inputs(tmp_path_factory.mktemp('inputs'))


# ---------------------------------------------------------------------------------------------------------------
# Listing


def test_listing_folders_globs_stdin_and_missing(tmp_path: Path, inputs: Dict[str, Path]) -> None:
    folder = inputs['gray.png'].parent
    listed = [Path(e.path).name for e in iter_inputs([str(folder)])]
    assert listed == sorted(GOOD + list(BAD))  # sorted, .JPG included, notes.txt skipped
    (tmp_path / 'b' / 'c').mkdir(parents=True)
    (tmp_path / '.hidden').mkdir()
    for name in ['b/c/z.PNG', 'b/a.jpeg', 'a.webp', '.hidden/x.jpg', 'b/._junk.jpg', 'b/readme.md']:
        (tmp_path / name).write_bytes(b'x')
    assert [e.path for e in iter_inputs([str(tmp_path)])] == [
        str(tmp_path / 'a.webp'), str(tmp_path / 'b' / 'a.jpeg'), str(tmp_path / 'b' / 'c' / 'z.PNG')]
    assert [Path(e.path).name for e in iter_inputs([str(tmp_path / '**' / '*')])] == ['a.webp', 'a.jpeg', 'z.PNG']
    explicit = tmp_path / 'b' / 'readme.md'  # a file named explicitly is tried whatever its extension
    missing = tmp_path / 'nope.jpg'
    stdin = io.StringIO(f'{tmp_path / "a.webp"}\n\n{missing}\n')
    entries = list(iter_inputs([str(explicit), '-', str(tmp_path / 'b' / 'c')], stdin=stdin))
    assert entries == [InputEntry(str(explicit)), InputEntry(str(tmp_path / 'a.webp')),
                       InputEntry(str(missing), 'no such file or directory'),
                       InputEntry(str(tmp_path / 'b' / 'c' / 'z.PNG'))]
    assert list(iter_inputs([str(tmp_path / 'none*.jpg')])) == []
    assert list_inputs([str(folder)]) == list(iter_inputs([str(folder)]))


# ---------------------------------------------------------------------------------------------------------------
# Decoding


def test_every_mode_becomes_rgb(inputs: Dict[str, Path]) -> None:
    for name in GOOD:
        image = load_image(inputs[name])
        assert image.mode == 'RGB', name
    assert load_image(inputs['exif6.jpg']).size == (64, 96)  # orientation 6: rotated upright
    assert load_image(inputs['tiny.png']).getpixel((0, 0)) == (200, 10, 10)


def test_mode_conversions() -> None:
    assert to_rgb(Image.new('L', (2, 2), 7)).getpixel((0, 0)) == (7, 7, 7)
    assert to_rgb(Image.new('1', (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    # transparency composited on white, opaque colour kept
    rgba = Image.new('RGBA', (2, 1), (10, 20, 30, 0))
    rgba.putpixel((1, 0), (10, 20, 30, 255))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 20, 30)
    assert to_rgb(Image.new('LA', (1, 1), (0, 0))).getpixel((0, 0)) == (255, 255, 255)
    # 16-bit and 32-bit: scaled by range, not clipped to white
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert [to_rgb(sixteen).getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]
    assert to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32), 'I')).getpixel((1, 0)) == (255,) * 3
    assert to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), 'F')).getpixel((1, 0)) == (128,) * 3
    cmyk = Image.new('CMYK', (1, 1), (0, 255, 255, 0))
    assert to_rgb(cmyk).getpixel((0, 0)) == (255, 0, 0)
    pal = Image.new('P', (1, 1), 0)
    pal.putpalette([9, 8, 7] * 256)
    assert to_rgb(pal).getpixel((0, 0)) == (9, 8, 7)


def test_draft_mode_only_for_large_jpegs(inputs: Dict[str, Path]) -> None:
    full = load_image(inputs['large.jpg'])
    assert full.size == (3000, 2000)
    drafted = load_image(inputs['large.jpg'], draft_size=235)
    assert drafted.size == (750, 500)  # 1/4 scale: still >= 2 x 235 on the shorter side
    assert min(drafted.size) >= 2 * 235
    small = load_image(inputs['nonsquare.JPG'], draft_size=235)
    assert small.size == (300, 100)
    # drafted pixels agree with a full decode downscaled the same way
    ref = np.asarray(full.resize(drafted.size, Image.BOX), dtype=np.float32)
    assert np.abs(np.asarray(drafted, dtype=np.float32) - ref).mean() < 3.0


@pytest.mark.parametrize('name', sorted(BAD))
def test_broken_files_raise_and_are_described(inputs: Dict[str, Path], name: str) -> None:
    with pytest.raises(Exception) as info:
        load_image(inputs[name], draft_size=235)
    assert isinstance(info.value, DECODE_ERRORS)  # what training/validation datasets catch to skip a file
    reason = describe_error(info.value)
    assert BAD[name] in reason and '\n' not in reason


def test_image_folder_dataset_decodes_like_load_image(inputs: Dict[str, Path]) -> None:
    from ema_hub.engine.validate import ImageFolderDataset

    names = sorted(n for n in GOOD if n != 'large.jpg') + sorted(BAD)
    dataset = ImageFolderDataset([(str(inputs[n]), i) for i, n in enumerate(names)])
    for i, name in enumerate(names):
        item = dataset[i]
        if name in BAD:
            assert item == (None, i), name  # skipped, not raised
        else:
            image, target, index = item
            assert (target, index) == (i, i) and image.mode == 'RGB'
            assert np.array_equal(np.asarray(image), np.asarray(load_image(inputs[name]))), name


def test_describe_os_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        load_image(tmp_path / 'missing.png')
    assert describe_error(info.value) == 'no such file or directory'
    assert describe_error(PermissionError(13, 'Permission denied')) == 'permission denied'


# ---------------------------------------------------------------------------------------------------------------
# Writers

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
    import csv
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


# ---------------------------------------------------------------------------------------------------------------
# Engine (in-process, a 5-class resnet18_ema with random weights)


@pytest.fixture(scope='module')
def tiny_model():
    import torch

    from ema_hub.hub import create_model
    torch.manual_seed(0)
    model = create_model('resnet18_ema', pretrained=False, num_classes=5).eval()
    return model


@pytest.mark.parametrize('workers', [0, 2])
def test_classify_keeps_order_and_errors(tiny_model, inputs: Dict[str, Path], workers: int) -> None:
    from ema_hub.engine.inference import classify
    entries = [InputEntry(str(inputs[n])) for n in ['tiny.png', 'text.jpg', 'gray.png', 'bomb.png', 'rgba.png',
                                                     'cmyk.jpg', 'exif6.jpg']]
    entries.append(InputEntry('missing.jpg', 'no such file or directory'))
    seen = []
    records = list(classify(entries, tiny_model, top_k=3, batch_size=2, workers=workers,
                            labels=['a', 'b', 'c', 'd', 'e'], progress=seen.append))
    assert [r['path'] for r in records] == [e.path for e in entries]
    assert ['error' in r for r in records] == [False, True, False, True, False, False, False, True]
    assert sum(seen) == len(entries)
    good = records[0]['predictions']
    assert len(good) == 3 and good[0]['label'] in 'abcde' and good[0]['score'] >= good[1]['score']


def test_pipeline_equals_timm_recipe_without_draft(tiny_model, inputs: Dict[str, Path]) -> None:
    """Where no decoding shortcut applies, the engine computes exactly what PIL + timm's eval transform give."""
    import torch
    from timm.data import create_transform, resolve_data_config

    from ema_hub.engine.inference import _logits, run_model
    names = ['nonsquare.JPG', 'gray.png', 'tiny.png', 'palette.png']
    transform = create_transform(**resolve_data_config({}, model=tiny_model))
    with torch.inference_mode():
        x = torch.stack([transform(Image.open(inputs[n]).convert('RGB')) for n in names])
        want = tiny_model(x)
    got = torch.stack([row for batch in run_model([InputEntry(str(inputs[n])) for n in names], tiny_model, _logits,
                                                  batch_size=3, workers=0) for _, row, _ in batch])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_iter_features_shapes_and_shards(tiny_model, inputs: Dict[str, Path]) -> None:
    from ema_hub.engine.inference import iter_features
    entries = [InputEntry(str(inputs[n])) for n in ['tiny.png', 'empty.jpg', 'gray.png', 'la.png']]
    batches = list(iter_features(entries, tiny_model, batch_size=2, workers=0))
    paths = [p for b in batches for p in b.paths]
    assert paths == [entries[i].path for i in (0, 2, 3)]
    assert all(b.features.shape == (len(b.paths), 512) and b.features.dtype == np.float32 for b in batches)
    assert [p for b in batches for p, _ in b.errors] == [entries[1].path]
    shard = [p for b in iter_features(entries, tiny_model, workers=0, rank=1, world_size=2) for p in b.paths]
    assert shard == [entries[3].path]  # entries[1::2] minus the broken one
