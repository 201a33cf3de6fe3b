"""Input images: the lazy listing of paths and the decoding users expect (EXIF orientation, RGB, draft mode).

Both are free of torch, so the listing can run before any model is loaded and decoding can be tested alone.

Listing rules (``iter_inputs``):

* a file given by name is always tried, whatever its extension (the user asked for it);
* a directory is walked recursively in sorted order; only files with an image extension (case-insensitive)
  are taken, other files and hidden entries (names starting with ``.``, e.g. macOS ``._IMG.jpg`` stubs)
  are skipped silently;
* an argument that is not an existing path but holds ``*``, ``?`` or ``[`` is a glob pattern (``**``
  recursive); its matches are sorted and filtered by extension like a directory's files (an existing file
  named ``a[1].png`` is that file);
* ``-`` reads one path (or directory, or pattern) per line from stdin;
* an argument that yields no image (a path that does not exist, a folder without images, a pattern that
  matches none, an empty stdin) yields an error entry in its place, so it gets an error record like a broken
  file, even when no argument yields any image; ``require_inputs`` makes it a usage error only when there is
  no input at all (no argument, or only ``-`` and nothing on stdin).

Decoding rules (``load_image``): EXIF orientation is applied; every mode becomes RGB: grayscale ``L``/``LA``,
palette ``P`` (with or without transparency), ``RGBA``, ``CMYK`` (inverted Adobe CMYK included, as PIL reads
it), 16-bit ``I;16*``, 32-bit ``I`` and float ``F``. Transparent images are composited on white (what a
viewer shows), not merely stripped of alpha. High-bit-depth images are scaled to 8 bits by their actual
range, not clipped. Large JPEGs are decoded at a reduced DCT scale (PIL's ``draft``) when the result
stays at least ``draft_factor`` times the size the transform resizes to, which keeps results equal to a
full decode in practice while cutting decode time several-fold.
"""
import glob
import os
import struct
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, TextIO, Tuple, Union

from PIL import Image, ImageFile, ImageOps

__all__ = [
    'IMAGE_EXTENSIONS', 'InputEntry', 'iter_inputs', 'list_inputs', 'require_inputs', 'is_image_file', 'load_image', 'to_rgb',
    'describe_error', 'DECODE_ERRORS',
]

IMAGE_EXTENSIONS = frozenset({
    '.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.apng', '.bmp', '.dib', '.gif', '.tif', '.tiff', '.webp',
    '.ppm', '.pgm', '.pbm', '.pnm', '.tga', '.ico', '.jp2', '.j2k', '.avif', '.qoi',
})
_GLOB_CHARS = ('*', '?', '[')
# The error entries of arguments that yield no image to try (a named file that is missing is itself an input).
_EMPTY_FOLDER = 'no image files in this folder'
_NO_MATCH = 'no such file, and no image file matches it as a pattern'
_EMPTY_STDIN = 'no paths on stdin'
# What ``load_image`` raises for a file that cannot be used (missing, unreadable, not an image, truncated,
# malformed, a decompression bomb): callers that skip such files catch exactly these.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)


@dataclass(frozen=True)
class InputEntry:
    """One input: a path to decode, or a path that already failed (``error`` set) during listing."""
    path: str
    error: Optional[str] = None


def is_image_file(name: Union[str, Path]) -> bool:
    return os.path.splitext(str(name))[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: str) -> Iterator[str]:
    for root, dirs, files in os.walk(folder, onerror=None):
        dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
        for name in sorted(files):
            if not name.startswith('.') and is_image_file(name):
                yield os.path.join(root, name)


def _expand(arg: str) -> Iterator[InputEntry]:
    if os.path.isdir(arg):
        yield from _or_error(arg, (InputEntry(path) for path in _walk(arg)), _EMPTY_FOLDER)
    elif os.path.lexists(arg):  # before globbing: a file named missing[1].png is that file
        yield InputEntry(arg)
    elif any(c in arg for c in _GLOB_CHARS):
        matches = (InputEntry(m) for m in sorted(glob.iglob(arg, recursive=True))
                   if not os.path.isdir(m) and is_image_file(m))
        yield from _or_error(arg, matches, _NO_MATCH)
    else:
        yield InputEntry(arg, 'no such file or directory')


def _or_error(arg: str, entries: Iterable[InputEntry], reason: str) -> Iterator[InputEntry]:
    """``entries``, or one error entry for ``arg`` when there are none: an argument never vanishes silently."""
    found = False
    for entry in entries:
        found = True
        yield entry
    if not found:
        yield InputEntry(arg, reason)


def _stdin_lines(stream: TextIO) -> Iterator[InputEntry]:
    for line in stream:
        line = line.rstrip('\r\n')
        if line.strip():
            yield from _expand(line)


def iter_inputs(args: Iterable[str], stdin: Optional[TextIO] = None) -> Iterator[InputEntry]:
    """Lazily expand CLI arguments (files, folders, globs, ``-``) into entries, in input order."""
    for arg in args:
        if arg == '-':
            yield from _or_error(arg, _stdin_lines(stdin if stdin is not None else sys.stdin), _EMPTY_STDIN)
        else:
            yield from _expand(arg)


def list_inputs(args: Iterable[str], stdin: Optional[TextIO] = None) -> List[InputEntry]:
    """``iter_inputs`` as a list (sharding for torchrun is ``inference.run_model``'s)."""
    return list(iter_inputs(args, stdin))


def require_inputs(args: Sequence[str], stdin: Optional[TextIO] = None) -> List[InputEntry]:
    """``list_inputs``, or UsageError when there is no input at all: no argument, or only ``-`` and an empty stdin.

    Arguments that yield no image (missing paths, folders without images, patterns that match none) are error
    entries in their place even when none yields an image: the run reports them and exits 1, not 2.
    """
    from ..errors import UsageError

    entries = list_inputs(args, stdin)
    if all(e.error == _EMPTY_STDIN for e in entries):  # only '-' arguments yield _EMPTY_STDIN
        raise UsageError('no input: give image files, folders or patterns, or - with paths on stdin')
    return entries


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale 16/32-bit integer or float image -> ``L``, using the image's own value range."""
    import numpy as np

    array = np.asarray(image, dtype=np.float64)
    if image.mode.startswith('I;16') or (image.mode == 'I' and array.size and array.min() >= 0
                                         and array.max() <= 65535 and array.max() > 255):
        array = array / 257.0  # 16-bit range: 65535 -> 255
    elif image.mode == 'F' and array.size and array.min() >= 0 and array.max() <= 1.0:
        array = array * 255.0  # float images in [0, 1]
    array = np.nan_to_num(array, nan=0.0, posinf=255.0, neginf=0.0)
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), 'L')


def to_rgb(image: Image.Image, background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB: alpha composited on ``background``, high bit depths scaled, CMYK converted."""
    mode = image.mode
    if mode == 'RGB':
        return image
    if mode == 'P':
        image = image.convert('RGBA' if 'transparency' in image.info else 'RGB')
        mode = image.mode
        if mode == 'RGB':
            return image
    elif mode == 'PA':
        image = image.convert('RGBA')
        mode = 'RGBA'
    if mode.startswith('I') or mode == 'F':
        return _scale_to_8bit(image).convert('RGB')
    if mode in ('RGBA', 'LA', 'RGBa', 'La'):
        rgba = image.convert('RGBA')
        canvas = Image.new('RGB', rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel('A'))
        return canvas
    return image.convert('RGB')  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def load_image(path: Union[str, Path], draft_size: Optional[int] = None, draft_factor: float = 2.0,
               background: Tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open and fully decode ``path`` as an upright RGB image.

    Args:
        draft_size: the shorter side the eval transform resizes to; a JPEG is then decoded at the smallest
            DCT scale (1/2, 1/4, 1/8) whose shorter side is still >= ``draft_factor * draft_size``.
            None decodes at full size.

    Raises OSError (unreadable, empty, truncated, not an image), PIL's DecompressionBombError (declared
    size above twice ``Image.MAX_IMAGE_PIXELS``), ValueError, SyntaxError, EOFError or struct.error for
    malformed files (all in ``DECODE_ERRORS``): callers turn them into error records with ``describe_error``
    or skip the file.
    """
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if draft_size and image.format == 'JPEG':
                width, height = image.size
                target = draft_factor * draft_size
                if min(width, height) >= 2 * target:
                    k = target / min(width, height)
                    # draft() picks the largest reduction that keeps both sides >= the requested size
                    image.draft('RGB', (max(1, int(width * k + 0.999)), max(1, int(height * k + 0.999))))
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image, background)


def describe_error(error: BaseException) -> str:
    """One line saying why an image could not be used (no traceback, no PIL internals)."""
    if isinstance(error, Image.DecompressionBombError):
        detail = str(error).split(', could be decompression bomb')[0]
        return f'refused as a possible decompression bomb ({detail})'
    if isinstance(error, FileNotFoundError):
        return 'no such file or directory'
    if isinstance(error, IsADirectoryError):
        return 'is a directory'
    if isinstance(error, PermissionError):
        return 'permission denied'
    text = ' '.join(str(error).split()) or type(error).__name__
    if 'cannot identify image file' in text:
        return 'not an image, or an unsupported format (cannot identify image file)'
    if 'truncated' in text or 'broken data stream' in text:
        return f'truncated or corrupt image ({text})'
    return f'cannot decode image ({type(error).__name__}: {text[:200]})'


# Explicitly the default: truncated files are errors, not silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False

