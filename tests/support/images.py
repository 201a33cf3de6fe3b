"""Images of every kind the CLI and the engine must read, plus broken files (``make_inputs``).

``GOOD`` names readable images; ``BAD`` maps each broken file to a fragment of the reason it is reported with.
"""
import io
import struct
import zlib
from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image

__all__ = ['GOOD', 'BAD', 'make_inputs', 'bomb_png', 'photo']


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
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
    rgb = photo(96, 64, 1)
    Image.fromarray(rgb).save(p['exif6.jpg'], exif=_exif_orientation(6), quality=90)
    Image.fromarray(rgb[..., 0]).save(p['gray.png'])
    if large:
        Image.fromarray(photo(3000, 2000, 2)).save(p['large.jpg'], quality=85)
    else:
        Image.fromarray(photo(120, 80, 2)).save(p['large.jpg'], quality=85)
    Image.fromarray(photo(300, 100, 3)).save(p['nonsquare.JPG'], format='JPEG')
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
    Image.fromarray(photo(200, 150, 4)).save(buf, format='JPEG', quality=90)
    p['truncated.jpg'].write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    p['bomb.png'].write_bytes(bomb_png())
    (folder / 'notes.txt').write_text('not an image, skipped when listing a folder')
    return p
