"""`ema-hub explain`: Grad-CAM and EMA's gates on a model fine-tuned where the answer is known.

The data (support/shapes.py): the class is a shape, a disk or a triangle 16 pixels across, at a random place on a
64x64 cluttered background. ``ema-hub finetune resnet18_ema --no-pretrained`` learns it; on the held-out images a
map's peak counts as a hit when it falls on the shape's box widened by 4 pixels on each side, which a peak placed
at random does with probability 24^2 / 64^2 = 14 %. At a 64-pixel input layer4 is a 2x2 map, too coarse to point
anywhere, so Grad-CAM is taken at layer3 (4x4); the gate shown is stage 2's first EMA (layer2.0.se). Stage 1's
first gate peaks on the bright shape even with random weights (a saliency effect, not learning), so it proves
nothing either way. The untrained model is resnet18_ema with random weights whose every EMA acts
(``support.models.acting``).
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.cli import run
from support.models import acting
from support.shapes import read_boxes, write_shapes

pytest.importorskip('pytorch_grad_cam')

CHANCE = 24 ** 2 / 64 ** 2
GRADCAM, GATE = 'gradcam layer3', 'ema layer2.0.se'


def _hit_rate(maps, boxes, margin: int = 4) -> float:
    """The share of ``boxes``' images whose map peaks on the shape (an image without a map counts as a miss)."""
    hits = 0
    for path, heat in maps.items():
        x0, y0, x1, y1 = boxes[path]
        y, x = np.unravel_index(np.argmax(heat), heat.shape)
        hits += x0 - margin <= x < x1 + margin and y0 - margin <= y < y1 + margin
    return hits / len(boxes)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    """The data, and resnet18_ema fine-tuned on it by the CLI (about a minute on two cores)."""
    root = write_shapes(tmp_path_factory.mktemp('shapes'), per_class=(300, 50))
    out = root / 'model'
    proc = run('ema-hub', 'finetune', 'resnet18_ema', str(root), '--no-pretrained', '--epochs', '12', '--img-size',
               '64', '--lr', '0.004', '--scale-min', '0.8', '--output', str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    val = {p: b for p, b in read_boxes(root).items() if '/val/' in p}
    return root, out, val


@pytest.fixture(scope='module')
def explained(shapes):
    """The CLI on the held-out images: overlays, the grid and the maps file."""
    root, model, val = shapes
    out = root / 'cams'
    proc = run('ema-hub', 'explain', f'local-dir:{model}', str(root / 'val'), '--output', str(out), '--method',
               'gradcam,ema', '--layer', 'layer3', '--layer', 'layer2.0.se', '--save-maps', str(root / 'maps.npz'),
               '--grid')
    return proc, out, np.load(root / 'maps.npz')


def test_maps_of_the_fine_tuned_model_fall_on_the_shape(shapes, explained):
    root, _, val = shapes
    proc, out, maps = explained
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((shapes[1] / 'metrics.json').read_text())
    assert metrics['top1'] >= 90, metrics
    rates = {column: _hit_rate({p: maps[f'{p}::{column}'] for p in val if f'{p}::{column}' in maps}, val)
             for column in (GRADCAM, GATE)}
    print(f'hit rates, fine-tuned: {rates} (chance {CHANCE:.3f})')
    assert rates[GRADCAM] >= 3 * CHANCE and rates[GATE] >= 3 * CHANCE, rates


def test_maps_of_an_untrained_model_do_not(shapes):
    import timm
    from ema_hub.explain import explain

    root, model, val = shapes
    torch.manual_seed(0)
    untrained = acting(timm.create_model('resnet18_ema', num_classes=2))
    untrained.pretrained_cfg = timm.create_model(f'local-dir:{model}').pretrained_cfg  # its input size and labels
    found = {GRADCAM: {}, GATE: {}}
    for item in explain(untrained, sorted(val), 'gradcam,ema', ['layer3', 'layer2.0.se']):
        for column in found:
            if item.maps[column] is not None:
                found[column][item.path] = item.maps[column]
    rates = {column: _hit_rate(maps, val) for column, maps in found.items()}
    print(f'hit rates, untrained: {rates} (chance {CHANCE:.3f})')
    assert all(rate <= 2 * CHANCE for rate in rates.values()), rates


def test_maps_file_overlays_and_grid(shapes, explained):
    root, _, val = shapes
    proc, out, maps = explained
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r['path'] for r in records] == sorted(val)  # the folder's images, in order
    # a map per image and column, but where a CAM is empty (no positive evidence: the record's note says so)
    expected = {f'{p}::{c}' for p in val for c in (GRADCAM, GATE)}
    empty = {f"{r['path']}::{c}" for r in records for c in r.get('notes', {})}
    assert set(maps.files) == expected - empty and len(empty) < 0.1 * len(expected), empty
    for key in maps.files:
        heat = maps[key]
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert heat.min() >= 0 and heat.max() <= 1 and heat.max() - heat.min() > 0.5
    first = records[0]
    assert first['label'] in ('disk', 'triangle') and 0 < first['score'] <= 1
    for column, file in first['files'].items():
        assert Image.open(file).size == (64, 64) and Path(file).name.endswith(f'{column.replace(" ", "-")}.png')
    grid = Image.open(out / 'grid.png')
    assert grid.size[1] > len(val) * 160 and grid.size[0] > 3 * 64  # a row per image, a column per map


def test_target_by_name_and_index_and_a_broken_image(shapes, tmp_path):
    root, model, val = shapes
    folder = tmp_path / 'in'
    folder.mkdir()
    for path in sorted(val)[:2]:
        (folder / Path(path).name).write_bytes(Path(path).read_bytes())
    (folder / 'zz-broken.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
    for target, index in (('triangle', 1), ('0', 0)):
        proc = run('ema-hub', 'explain', f'local-dir:{model}', str(folder), '-o', str(tmp_path / target),
                   '--target', target, '--method', 'gradcam++')
        assert proc.returncode == 1, proc.stderr  # one input failed; the others were drawn
        records = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r.get('index') for r in records] == [index, index, None]  # the broken one sorts last
        assert 'error' in records[2] and all(len(r['files']) == 1 for r in records[:2])
        assert proc.stderr.strip().splitlines()[-1] == '1 of 3 image(s) could not be explained'


@pytest.mark.parametrize('args,message', [
    (['--layer', 'layer9'], "error: 'layer9' is not a layer of the model"),
    (['--target', 'hexagon'], "error: target class 'hexagon' is not one of the model's 2 classes"),
    (['--target', '7'], 'error: target class 7 is out of range: the model has 2 classes'),
    (['--method', 'saliency'], 'error: unknown method saliency; use one or more of gradcam'),
    (['--save-maps', 'maps.json'], 'error: --save-maps maps.json: the maps are written as .npz'),
])
def test_bad_options_get_one_line(shapes, tmp_path, args, message):
    root, model, val = shapes
    proc = run('ema-hub', 'explain', f'local-dir:{model}', sorted(val)[0], '-o', str(tmp_path), *args)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(message), proc.stderr


def test_warm_start_gates_are_uniform_and_said_so(tmp_path):
    """Before fine-tuning every gate of a warm start is sigmoid(0): no picture, a note instead."""
    import timm
    import ema_hub
    from ema_hub.explain import explain

    image = tmp_path / 'x.png'
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(image)
    model = ema_hub.add_ema(acting(timm.create_model('resnet18')))
    item = next(explain(model, [image], 'ema', ['all']))
    assert len(item.maps) == 8 and all(heat is None for heat in item.maps.values())
    assert all('uniform' in note for note in item.notes.values())


def test_missing_grad_cam_names_the_extra(monkeypatch, tmp_path):
    import sys

    import timm
    from ema_hub.errors import MissingDependencyError
    from ema_hub.explain import explain

    monkeypatch.setitem(sys.modules, 'pytorch_grad_cam', None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'ema-hub\[explain\]'"):
        next(explain(timm.create_model('resnet18_ema'), [tmp_path / 'x.png'], 'gradcam'))


def test_the_docs_picture_is_what_the_command_draws(shapes, tmp_path):
    """docs/images/explain-grid.png (in the README) is this command's grid; EMA_HUB_UPDATE_DOCS=1 writes it anew.
    Training differs a little between machines, so the check is the layout: the same rows, columns and size."""
    import os

    from support.cli import ROOT

    root, model, val = shapes
    picks = sorted(p for p in val if p.endswith(('0000.png', '0001.png')))  # two disks, two triangles
    proc = run('ema-hub', 'explain', f'local-dir:{model}', *picks, '-o', str(tmp_path), '--method', 'gradcam,ema',
               '--layer', 'layer3', '--layer', 'layer2.0.se', '--grid')
    assert proc.returncode == 0, proc.stderr
    committed = ROOT / 'docs' / 'images' / 'explain-grid.png'
    if os.environ.get('EMA_HUB_UPDATE_DOCS') == '1':  # in 64 colours, to keep the repository small
        committed.parent.mkdir(exist_ok=True)
        Image.open(tmp_path / 'grid.png').quantize(64).save(committed, optimize=True)
    assert Image.open(committed).size == Image.open(tmp_path / 'grid.png').size
