"""Top-1/top-5 evaluation on an ImageFolder (ema_hub/engine/validate.py): `ema-hub validate` on the digits
fine-tuning run (the session fixture ``trained``, conftest.py), and ``validate`` in-process on small folders."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ema_hub.engine.validate import eval_data_config, format_result, validate
from ema_hub.errors import DataError
from support.cli import run_module as run_cli
from support.images import photo
from support.models import LABELS


def test_validate_json_equals_independent_evaluation(trained, digits, measured):
    out = trained[0]
    proc = run_cli(['validate', f'local-dir:{out}', str(digits / 'val'), '--format', 'json'], timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result['top1'] == pytest.approx(measured['top1'], abs=1e-9)
    assert result['top5'] == pytest.approx(measured['top5'], abs=1e-9)
    assert result['images'] == 360 and result['classes'] == [str(d) for d in range(10)]
    # A DATA folder (train/ + val/) is validated on its val/ split.
    proc = run_cli(['validate', f'local-dir:{out}', str(digits), '--format', 'json'], timeout=300)
    assert json.loads(proc.stdout)['top1'] == result['top1']


def _folder(root: Path, classes, per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(photo(40, 30, seed=10 * c + i)).save(root / name / f'{i}.png')
    return root


def test_folders_are_matched_to_label_names_by_name(checkpoint, tmp_path):
    """A checkpoint with label names: folder 'eel' is class 4 of the model whatever the folders' order."""
    import timm
    from timm.data import create_transform, resolve_data_config

    root = _folder(tmp_path / 'val', ['eel', 'ant', 'dog'])
    (root / 'ant' / 'broken.png').write_bytes(b'not an image')  # skipped and counted, not fatal
    result = validate(f'local-dir:{checkpoint}', root, workers=0, device='cpu', progress=False)
    assert result['classes'] == ['ant', 'dog', 'eel'] and result['num_classes'] == 5
    assert result['images'] == 6 and result['skipped'] == 1
    assert [Path(p).name for p in result['skipped_files']] == ['broken.png']

    model = timm.create_model(f'local-dir:{checkpoint}').eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    hits1, hits5 = 0, 0
    with torch.inference_mode():
        for name in result['classes']:
            for path in sorted((root / name).glob('[0-9].png')):
                logits = model(transform(Image.open(path).convert('RGB'))[None])[0]
                top = logits.topk(5).indices.tolist()
                hits1 += top[0] == LABELS.index(name)
                hits5 += LABELS.index(name) in top
    assert result['top1'] == pytest.approx(100.0 * hits1 / 6, abs=1e-9)
    assert result['top5'] == pytest.approx(100.0 * hits5 / 6, abs=1e-9) == 100.0  # 5 classes: top-5 is all of them
    line = format_result(result)
    assert '1 unreadable skipped' in line and '6 images, 3 classes' in line and '\n' not in line


def test_bad_folders_are_data_errors(tiny_model, tmp_path):
    empty = tmp_path / 'empty'
    (empty / 'a').mkdir(parents=True)
    with pytest.raises(DataError, match='holds no image files'):
        validate(tiny_model, empty, workers=0, device='cpu', progress=False)
    many = _folder(tmp_path / 'many', [f'c{i}' for i in range(6)], per_class=1)
    with pytest.raises(DataError, match='6 class folders but the model has 5 classes'):
        validate(tiny_model, many, workers=0, device='cpu', progress=False)
    with pytest.raises(DataError, match='does not exist'):
        validate(tiny_model, tmp_path / 'missing', workers=0, device='cpu', progress=False)


def test_eval_data_config_at_another_size(tiny_model):
    cfg = eval_data_config(tiny_model)
    assert cfg['input_size'] == (3, 224, 224) and 'test_input_size' not in cfg
    assert eval_data_config(tiny_model, img_size=64)['input_size'] == (3, 64, 64)
    assert np.isclose(cfg['crop_pct'], eval_data_config(tiny_model, 64)['crop_pct'])
