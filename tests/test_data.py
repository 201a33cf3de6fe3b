"""The one dataset, loader and worker policy of every loop over files, and ImageFolder scanning
(ema_hub/engine/data.py), in-process on the generated images (the session fixture ``inputs``)."""
import pickle
import threading
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pytest
import torch
from PIL import Image

from ema_hub.engine.data import ImageDataset, ImageFolderData, Sample, decode_threads, decode_workers, make_loader, \
    scan_image_folder, stack
from ema_hub.engine.devices import available_cpus
from ema_hub.engine.images import InputEntry, load_image
from ema_hub.errors import DataError
from support.images import BAD, GOOD


def to_array(image: Image.Image) -> torch.Tensor:
    """The decoded pixels as they are (H, W, 3) uint8: what a transform receives."""
    assert image.mode == 'RGB'
    return torch.from_numpy(np.array(image))


def small(width: int = 32) -> Callable[[Image.Image], torch.Tensor]:
    return lambda image: torch.from_numpy(np.array(image.convert('RGB').resize((width, width))))


def test_dataset_decodes_like_load_image_and_never_raises(inputs: Dict[str, Path]) -> None:
    names = sorted(n for n in GOOD if n != 'large.jpg') + sorted(BAD)
    entries = [InputEntry(str(inputs[n])) for n in names] + [InputEntry('gone.jpg', 'no such file or directory')]
    dataset = ImageDataset(entries, to_array, targets=list(range(len(entries))))
    assert len(dataset) == len(entries)
    for i, name in enumerate(names):
        sample = dataset[i]
        assert (sample.index, sample.target) == (i, i), name
        if name in BAD:  # skipped, not raised: the reason instead of a tensor
            assert sample.tensor is None and BAD[name] in sample.error, (name, sample.error)
        else:
            assert sample.error is None
            assert np.array_equal(sample.tensor.numpy(), np.asarray(load_image(inputs[name]))), name
    assert dataset[len(names)] == Sample(len(names), None, 'no such file or directory', len(names))
    assert ImageDataset(entries[:1], to_array)[0].target == -1  # no targets: -1


def test_dataset_decodes_large_jpegs_in_draft_mode(inputs: Dict[str, Path]) -> None:
    entries = [InputEntry(str(inputs['large.jpg']))]
    assert ImageDataset(entries, to_array)[0].tensor.shape == (2000, 3000, 3)
    assert ImageDataset(entries, to_array, draft_size=235)[0].tensor.shape == (500, 750, 3)


def test_threaded_batches_equal_one_thread_in_order_failures_included(inputs: Dict[str, Path]) -> None:
    names = ['tiny.png', 'text.jpg', 'gray.png', 'bomb.png', 'rgba.png', 'cmyk.jpg', 'empty.jpg', 'exif6.jpg',
             'truncated.jpg', 'la.png', 'palette.png']
    entries = [InputEntry(str(inputs[n])) for n in names] + [InputEntry('gone.jpg', 'no such file or directory')]
    seen = set()

    def transform(image):
        seen.add(threading.current_thread().name)
        return small()(image)

    one = ImageDataset(entries, small(), targets=list(range(100, 112)))
    many = ImageDataset(entries, transform, targets=list(range(100, 112)), threads=3)
    order = [5, 0, 11, 3, 2, 1, 4, 10, 6, 9, 7, 8]  # any order the sampler asks for comes back in that order
    want, got = one.__getitems__(order), many.__getitems__(order)
    assert [s.index for s in got] == [s.index for s in want] == order
    for a, b in zip(got, want):
        assert (a.index, a.error, a.target) == (b.index, b.error, b.target)
        assert (a.tensor is None and b.tensor is None) or torch.equal(a.tensor, b.tensor)
    assert [s.tensor is None for s in got] == [names[i] in BAD if i < len(names) else True for i in order]
    assert seen and all(name.startswith('ema-hub-decode') for name in seen)  # decoded off the calling thread
    # A worker process gets the dataset without the parent's thread pool.
    copy = pickle.loads(pickle.dumps(ImageDataset(entries, to_array, threads=3)))
    assert copy.threads == 3 and copy._pool is None


def test_stack_separates_failures() -> None:
    good = [Sample(0, torch.zeros(3, 4, 4), None, 2), Sample(2, torch.ones(3, 4, 4), None, 0)]
    bad = [Sample(1, None, 'not an image', 1), Sample(3, None, 'truncated', -1)]
    images, targets, failed = stack([good[0], bad[0], good[1], bad[1]])
    assert images.shape == (2, 3, 4, 4) and torch.equal(images[1], good[1].tensor)
    assert targets.dtype == torch.long and targets.tolist() == [2, 0]
    assert failed == bad
    images, targets, failed = stack(bad)
    assert images is None and targets.tolist() == [] and failed == bad


def test_loader_batches_are_lists_of_samples_in_order(inputs: Dict[str, Path]) -> None:
    names = ['tiny.png', 'text.jpg', 'gray.png', 'bomb.png', 'rgba.png']
    dataset = ImageDataset([InputEntry(str(inputs[n])) for n in names], small(), threads=2)
    batches = list(make_loader(dataset, batch_size=2, workers=0))
    assert [[s.index for s in b] for b in batches] == [[0, 1], [2, 3], [4]]
    assert all(isinstance(s, Sample) for b in batches for s in b)
    assert [s.error is not None for b in batches for s in b] == [False, True, False, True, False]


def test_worker_policy() -> None:
    cpus = available_cpus()
    assert cpus >= 1
    assert decode_workers(torch.device('cpu')) == 0 and decode_workers(torch.device('cpu'), world_size=2) == 0
    beside_gpu = decode_workers(torch.device('cuda'))  # the object only: no GPU needed
    assert 1 <= beside_gpu <= 4 and beside_gpu == min(4, cpus)
    assert decode_workers(torch.device('cuda', 1), world_size=64) == 1  # each process its share, at least one
    # The main process decodes with a thread per core of its share when there are no worker processes.
    assert decode_threads(0) == cpus and decode_threads(0, world_size=cpus * 2) == 1
    assert decode_threads(2) == 1 and decode_threads(beside_gpu) == 1


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (8, 6), (10, 20, 30)).save(path)


def test_scan_image_folder_classes_in_natural_order(tmp_path: Path) -> None:
    for rel in ['10/a.png', '2/b.png', '2/sub/c.jpg', '2/a.png', 'x/1.png', '.hidden/h.png', '2/.d.png']:
        _image(tmp_path / rel)
    (tmp_path / 'x' / 'notes.txt').write_text('not an image')
    data = scan_image_folder(tmp_path)
    assert data.classes == ['2', '10', 'x'] and data.empty == []
    assert [(Path(p).relative_to(tmp_path).as_posix(), t) for p, t in data.samples] == [
        ('2/a.png', 0), ('2/b.png', 0), ('2/sub/c.jpg', 0), ('10/a.png', 1), ('x/1.png', 2)]
    assert data.counts() == {'2': 3, '10': 1, 'x': 1}


def test_image_folder_dataset_targets(tmp_path: Path) -> None:
    for rel in ['a/1.png', 'b/1.png', 'b/2.png']:
        _image(tmp_path / rel)
    data = scan_image_folder(tmp_path)
    dataset = data.dataset(small(8), threads=2)
    assert isinstance(dataset, ImageDataset) and dataset.threads == 2 and dataset.draft_size is None
    assert [e.path for e in dataset.entries] == [p for p, _ in data.samples]
    assert [s.target for s in dataset.__getitems__([0, 1, 2])] == [0, 1, 1]
    mapped = data.dataset(small(8), targets=[4, 2, 2])  # folder index -> the model's class index
    assert [mapped[i].target for i in range(3)] == [4, 2, 2]
    images, targets, failed = stack(mapped.__getitems__([0, 1, 2]))
    assert images.shape == (3, 8, 8, 3) and targets.tolist() == [4, 2, 2] and failed == []


def test_scan_image_folder_explains_bad_layouts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match='does not exist or is not a folder'):
        scan_image_folder(tmp_path / 'missing')
    _image(tmp_path / 'loose.png')
    with pytest.raises(DataError, match='no class folders .images must sit in one sub-folder per class'):
        scan_image_folder(tmp_path)
    _image(tmp_path / 'cat' / '1.png')
    (tmp_path / 'dog').mkdir()
    with pytest.raises(DataError, match='class folder.s. without images: dog'):
        scan_image_folder(tmp_path, what='training folder')
    data = scan_image_folder(tmp_path, allow_empty_classes=True)
    assert data.classes == ['cat', 'dog'] and data.empty == ['dog'] and data.counts() == {'cat': 1, 'dog': 0}
    assert isinstance(data, ImageFolderData)
