"""scikit-learn's handwritten digits as an ImageFolder (fine-tuning and validation data), and an evaluation of a
saved checkpoint that shares no code with ema-hub's own loops."""
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

__all__ = ['write_digits', 'independent_eval']


def write_digits(root: Path, per_class: Optional[Tuple[int, int]] = None, size: int = 32) -> Path:
    """sklearn's digits as ``root/{train,val}/<digit>/<index>.png`` (32x32 RGB); ``per_class`` caps each split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx = np.arange(len(digits.target))
    train, val = train_test_split(idx, test_size=0.2, stratify=digits.target, random_state=0)
    for split, ids, cap in (('train', train, per_class and per_class[0]), ('val', val, per_class and per_class[1])):
        seen: Dict[int, int] = {}
        for i in sorted(ids):
            label = int(digits.target[i])
            if cap is not None and seen.get(label, 0) >= cap:
                continue
            seen[label] = seen.get(label, 0) + 1
            img = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
            image = Image.fromarray(img, 'L').resize((size, size), Image.BILINEAR).convert('RGB')
            path = root / split / str(label) / f'{i:04d}.png'
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path)
    return root


def independent_eval(folder: Path, val_dir: Path) -> Dict[str, float]:
    """Load ``local-dir:folder`` with timm, preprocess as its saved config says, count top-1/top-5 hits."""
    import timm
    import ema_hub  # noqa: F401  (registers the variants)
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(f'local-dir:{folder}').eval()
    cfg = resolve_data_config({}, model=model)
    transform = create_transform(**cfg)
    classes = sorted((p.name for p in val_dir.iterdir() if p.is_dir()), key=int)
    images, targets = [], []
    for t, name in enumerate(classes):
        for path in sorted((val_dir / name).glob('*.png')):
            images.append(transform(Image.open(path).convert('RGB')))
            targets.append(t)
    x, y = torch.stack(images), torch.tensor(targets)
    with torch.inference_mode():
        logits = torch.cat([model(x[i:i + 100]) for i in range(0, len(x), 100)])
    top5 = logits.topk(5, dim=1).indices
    return {'top1': 100.0 * (top5[:, 0] == y).sum().item() / len(y),
            'top5': 100.0 * (top5 == y[:, None]).any(dim=1).sum().item() / len(y),
            'input_size': tuple(cfg['input_size']), 'n': len(y)}
