"""Batched inference over image files (ema_hub/engine/inference.py): classification records in input order, the
model loop against timm's own recipe, and model batches regrouped around failures; in-process, on the session's
5-class resnet18_ema with random weights (``tiny_model``) and generated images (``inputs``)."""
from pathlib import Path
from typing import Dict

import pytest
import torch
from PIL import Image

from ema_hub.engine.images import InputEntry
from ema_hub.engine.inference import classify, default_batch_size, eval_transform, load_model, run_model
from support.models import LABELS


@pytest.mark.parametrize('workers', [0, 2])
def test_classify_keeps_order_and_errors(tiny_model, inputs: Dict[str, Path], workers: int) -> None:
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
    from timm.data import create_transform, resolve_data_config

    from ema_hub.engine.inference import _logits
    names = ['nonsquare.JPG', 'gray.png', 'tiny.png', 'palette.png']
    transform = create_transform(**resolve_data_config({}, model=tiny_model))
    with torch.inference_mode():
        x = torch.stack([transform(Image.open(inputs[n]).convert('RGB')) for n in names])
        want = tiny_model(x)
    got = torch.stack([row for batch in run_model([InputEntry(str(inputs[n])) for n in names], tiny_model, _logits,
                                                  batch_size=3, workers=0) for _, row, _ in batch])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_model_batches_hold_batch_size_readable_images(tiny_model, inputs: Dict[str, Path]) -> None:
    """Loader chunks are regrouped: each model batch has batch_size readable images, failures ride along in place."""
    names = ['empty.jpg', 'tiny.png', 'text.jpg', 'gray.png', 'la.png', 'bomb.png', 'palette.png', 'rgba.png',
             'truncated.jpg']
    entries = [InputEntry(str(inputs[n])) for n in names]
    forward = lambda model, x: x.mean(dim=(2, 3))  # noqa: E731  (no model needed to check the batching)
    seen = []
    batches = list(run_model(entries, tiny_model, forward, batch_size=2, workers=0, progress=seen.append))
    assert [[Path(e.path).name for e, _, _ in b] for b in batches] == [
        ['empty.jpg', 'tiny.png', 'text.jpg', 'gray.png'], ['la.png', 'bomb.png', 'palette.png'],
        ['rgba.png', 'truncated.jpg']]
    for batch in batches:
        assert sum(row is not None for _, row, _ in batch) <= 2
        for entry, row, error in batch:
            name = Path(entry.path).name
            assert (row is None) == (error is not None) == (name in {'empty.jpg', 'text.jpg', 'bomb.png',
                                                                    'truncated.jpg'}), name
            assert row is None or (row.shape == (3,) and row.dtype == torch.float32)
    assert sum(seen) == len(entries)
    # torchrun shards: rank 1 of 2 takes entries[1::2]
    shard = [e for b in run_model(entries, tiny_model, forward, workers=0, rank=1, world_size=2) for e, _, _ in b]
    assert shard == entries[1::2]


def test_load_model_eval_transform_and_labels(checkpoint: Path, inputs: Dict[str, Path]) -> None:
    model = load_model(f'local-dir:{checkpoint}', device=torch.device('cpu'), channels_last=True)
    assert not model.training and model.num_classes == 5
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    transform, resize, config = eval_transform(model)
    assert config['input_size'] == (3, 224, 224) and resize == int(224 / config['crop_pct'])
    assert transform(Image.new('RGB', (300, 400))).shape == (3, 224, 224)
    assert default_batch_size(torch.device('cpu')) == 16 and default_batch_size(torch.device('cuda')) == 64
    # Without labels, records name the checkpoint's classes; top_k is capped by the number of classes.
    records = list(classify([InputEntry(str(inputs['gray.png']))], model, top_k=9, workers=0, channels_last=True))
    preds = records[0]['predictions']
    assert sorted(p['label'] for p in preds) == LABELS and [LABELS[p['index']] for p in preds] == [
        p['label'] for p in preds]
    assert sum(p['score'] for p in preds) == pytest.approx(1.0, abs=1e-4)
