"""Input listing and decoding (ema_hub/engine/images.py): folders, globs, stdin, EXIF, every mode, JPEG draft, and
broken files, in-process. The images come from support/images.py (the session fixture ``inputs``)."""
import io
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from PIL import Image

from ema_hub.engine.images import DECODE_ERRORS, InputEntry, describe_error, iter_inputs, list_inputs, load_image, \
    require_inputs, to_rgb
from ema_hub.errors import UsageError
from support.images import BAD, GOOD


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
    assert list_inputs([str(folder)]) == list(iter_inputs([str(folder)]))


def test_an_argument_that_yields_no_image_is_an_error_entry_in_its_place(tmp_path: Path) -> None:
    for name in ['a.png', 'shot[1].png', 'empty/notes.txt', 'docs/readme.md']:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b'x')
    args = [str(tmp_path / 'missing[1].png'), str(tmp_path / 'a.png'), str(tmp_path / 'nomatch' / '*.png'),
            str(tmp_path / 'empty'), str(tmp_path / 'docs' / '*'), str(tmp_path / 'shot[1].png'), '-']
    assert list(iter_inputs(args, stdin=io.StringIO('\n'))) == [
        InputEntry(args[0], 'no such file, and no image file matches it as a pattern'),
        InputEntry(args[1]),
        InputEntry(args[2], 'no such file, and no image file matches it as a pattern'),
        InputEntry(args[3], 'no image files in this folder'),
        InputEntry(args[4], 'no such file, and no image file matches it as a pattern'),  # readme.md: not an image
        InputEntry(args[5]),  # a file whose name holds glob characters is that file, not a pattern
        InputEntry('-', 'no paths on stdin'),
    ]
    # a pattern that matches something is that something: shot[1].png as a pattern matches shot1.png
    (tmp_path / 'shot1.png').write_bytes(b'x')
    assert list(iter_inputs([str(tmp_path / 'sho[t]1.png')])) == [InputEntry(str(tmp_path / 'shot1.png'))]


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


def test_describe_os_errors(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        load_image(tmp_path / 'missing.png')
    assert describe_error(info.value) == 'no such file or directory'
    assert describe_error(PermissionError(13, 'Permission denied')) == 'permission denied'


def test_require_inputs_is_a_usage_error_only_without_any_input(tmp_path: Path, inputs: Dict[str, Path]) -> None:
    folder = inputs['gray.png'].parent
    assert require_inputs([str(folder)]) == list_inputs([str(folder)])
    missing = tmp_path / 'missing.jpg'  # a named file that does not exist is an input (its error is reported)
    assert require_inputs([str(missing)]) == [InputEntry(str(missing), 'no such file or directory')]
    (tmp_path / 'notes.txt').write_text('no images here')
    # no argument yields an image: each is an error entry in input order, not a usage error
    nothing = [str(tmp_path), str(tmp_path / 'none*.png'), '-']
    assert require_inputs(nothing, stdin=io.StringIO('')) == [
        InputEntry(str(tmp_path), 'no image files in this folder'),
        InputEntry(str(tmp_path / 'none*.png'), 'no such file, and no image file matches it as a pattern'),
        InputEntry('-', 'no paths on stdin')]
    assert require_inputs(['-'], stdin=io.StringIO(f'{tmp_path}\n')) == [
        InputEntry(str(tmp_path), 'no image files in this folder')]
    for args in ([], ['-'], ['-', '-']):  # no input at all
        with pytest.raises(UsageError, match='no input') as info:
            require_inputs(args, stdin=io.StringIO('\n  \n'))
        assert info.value.exit_code == 2 and '\n' not in str(info.value)
    # anything else found, or a file named: the arguments that found nothing are error entries, not a usage error
    both = require_inputs([str(tmp_path), str(missing)])
    assert both == [InputEntry(str(tmp_path), 'no image files in this folder'), *require_inputs([str(missing)])]
    assert require_inputs([str(tmp_path / 'none*.png'), str(folder)])[0].error is not None
