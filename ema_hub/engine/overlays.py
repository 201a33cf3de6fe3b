"""Explanations drawn and saved: heatmap overlays (pytorch-grad-cam's colouring), a contact sheet of many images,
and the raw maps in one .npz written as they come."""
import re
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..files import atomic_path

__all__ = ['overlay', 'column_slug', 'ContactSheet', 'MapWriter']


def overlay(image: Image.Image, heat: np.ndarray) -> Image.Image:
    """``heat`` (H, W) in [0, 1] over ``image`` in a jet colour map, as pytorch-grad-cam draws it."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heat, use_rgb=True))


def column_slug(column: str) -> str:
    """A column's name as a file-name part: ``gradcam layer4`` -> ``gradcam-layer4``."""
    return re.sub(r'[^A-Za-z0-9_.+-]+', '-', column).strip('-')


class ContactSheet:
    """One picture: an image per row (its class and score beside it), its maps in the columns; blank cells where
    a map is missing (uniform gates) or the image failed."""

    def __init__(self, columns: Sequence[str], cell: int = 160):
        self.columns, self.cell = list(columns), cell
        self.rows: List[tuple] = []

    def add(self, image: Optional[Image.Image], cells: Dict[str, Optional[Image.Image]], caption: str) -> None:
        def thumb(picture):  # fitted to the cell, enlarged too (small inputs stay legible)
            return None if picture is None else ImageOps.contain(picture, (self.cell, self.cell))
        self.rows.append((caption, thumb(image), [thumb(cells.get(c)) for c in self.columns]))

    def render(self) -> Image.Image:
        cell, pad, head = self.cell, 4, 18
        width = (len(self.columns) + 1) * (cell + pad) + pad
        height = head + len(self.rows) * (cell + head + pad) + pad
        sheet = Image.new('RGB', (width, height), 'white')
        draw = ImageDraw.Draw(sheet)
        for j, name in enumerate(['image'] + self.columns):
            draw.text((pad + j * (cell + pad), 3), name, fill='black')
        for i, (caption, image, cells) in enumerate(self.rows):
            top = head + i * (cell + head + pad)
            draw.text((pad, top + 2), caption, fill='black')
            for j, picture in enumerate([image] + cells):
                if picture is not None:
                    sheet.paste(picture, (pad + j * (cell + pad), top + head))
        return sheet


class MapWriter:
    """The raw maps in one .npz (``numpy.load`` reads it), an array per image and column, written as they come:
    keyed by the input's path, or ``path::column`` when a run draws several columns. A context manager: the file
    appears whole when the block ends, or not at all."""

    def __init__(self, path: str, columns: Sequence[str]):
        self.path, self.columns, self.count = Path(path), list(columns), 0

    def __enter__(self) -> 'MapWriter':
        self._stack = ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._zip = self._stack.enter_context(zipfile.ZipFile(tmp, 'w', allowZip64=True))
        return self

    def __exit__(self, *exc) -> bool:
        return self._stack.__exit__(*exc)

    def add(self, path: str, maps: Dict[str, Optional[np.ndarray]]) -> None:
        for column, heat in maps.items():
            if heat is None:
                continue
            key = path if len(self.columns) == 1 else f'{path}::{column}'
            with self._zip.open(f'{key}.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(heat, dtype=np.float32))
            self.count += 1
