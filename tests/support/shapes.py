"""A localisation data set: the class is a shape (a disk or a triangle) drawn at a random place on a cluttered
background (random rectangles and lines in muted colours), as an ImageFolder with each image's shape box."""
import json
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ['CLASSES', 'write_shapes', 'read_boxes']

CLASSES = ('disk', 'triangle')


def _image(rng: np.random.Generator, kind: str, size: int, shape: int) -> Tuple[Image.Image, Tuple[int, ...]]:
    image = Image.fromarray(rng.integers(60, 140, (size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):  # clutter: boxes and lines as large as the shape, in muted colours
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(4, shape, 2)
        colour = tuple(int(c) for c in rng.integers(40, 170, 3))
        if rng.random() < 0.5:
            draw.rectangle([x, y, x + w, y + h], fill=colour)
        else:
            draw.line([x, y, x + w, y + h], fill=colour, width=int(rng.integers(1, 4)))
    x, y = (int(v) for v in rng.integers(0, size - shape, 2))
    colour = tuple(int(c) for c in rng.integers(180, 256, 3))
    box = (x, y, x + shape, y + shape)
    if kind == 'disk':
        draw.ellipse(box, fill=colour)
    else:
        draw.polygon([(x + shape // 2, y), (x, y + shape), (x + shape, y + shape)], fill=colour)
    return image, box


def write_shapes(root: Path, per_class: Tuple[int, int] = (200, 40), size: int = 64, shape: int = 16,
                 seed: int = 0) -> Path:
    """``root/{train,val}/<class>/<i>.png`` and ``root/boxes.json`` ({path: [x0, y0, x1, y1]}, the shape's box)."""
    rng = np.random.default_rng(seed)
    boxes: Dict[str, list] = {}
    for split, count in zip(('train', 'val'), per_class):
        for kind in CLASSES:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                image, box = _image(rng, kind, size, shape)
                path = folder / f'{i:04d}.png'
                image.save(path)
                boxes[str(path)] = list(box)
    (root / 'boxes.json').write_text(json.dumps(boxes))
    return root


def read_boxes(root: Path) -> Dict[str, Tuple[int, int, int, int]]:
    return {path: tuple(box) for path, box in json.loads((root / 'boxes.json').read_text()).items()}
