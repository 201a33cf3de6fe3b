"""Writers for classification records and feature files, and the stderr progress bar. No torch needed here.

Record formats (one record per input image, written as it arrives):

* ``table``: human-readable; the path on one line, then one aligned line per prediction
  (rank, score in %, label, class index), or ``error: <reason>``.
* ``jsonl``: one JSON object per line: ``{"path", "predictions": [{"index", "label", "score"}]}`` or
  ``{"path", "error"}``.
* ``json``: the same objects as one JSON array, written incrementally (valid JSON once the run ends).
* ``csv``: one row per image, columns ``path,index,label,score,predictions,error``: the top-1 class in
  ``index,label,score`` and the whole top-k list as JSON in ``predictions``; failures fill ``error`` only.

Feature files (``FeatureWriter``): ``.npz`` with arrays ``features`` (N x D float32) and ``paths`` (N strings),
or ``.safetensors`` with tensor ``features`` and the paths as a JSON list in the metadata key ``paths``.
Rows are spilled to a temporary file as they come and assembled at the end by streaming copies, so memory
stays flat however many images there are; the result appears whole or not at all (``ema_hub.files.atomic_path``).
"""
import csv
import json
import os
import struct
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, TextIO, Tuple, Union

import numpy as np

from ..errors import UsageError
from ..files import atomic_path

__all__ = ['FORMATS', 'RecordWriter', 'format_for_output', 'progress_bar', 'FeatureWriter', 'check_feature_output',
           'read_features', 'FEATURE_SUFFIXES']

FORMATS = ('table', 'json', 'jsonl', 'csv')
FEATURE_SUFFIXES = ('.npz', '.safetensors')
_CSV_COLUMNS = ['path', 'index', 'label', 'score', 'predictions', 'error']


def format_for_output(output: Optional[str], stream: TextIO) -> str:
    """The default format: by the output file's suffix, else ``table`` on a terminal and ``jsonl`` in a pipe."""
    if output:
        suffix = Path(output).suffix.lower()
        return {'.json': 'json', '.jsonl': 'jsonl', '.ndjson': 'jsonl', '.csv': 'csv', '.txt': 'table'}.get(
            suffix, 'jsonl')
    try:
        return 'table' if stream.isatty() else 'jsonl'
    except (AttributeError, ValueError):
        return 'jsonl'


class RecordWriter:
    """Write records to a text stream in one of ``FORMATS``; ``close()`` finishes the document (json)."""

    def __init__(self, stream: TextIO, fmt: str = 'jsonl'):
        if fmt not in FORMATS:
            raise ValueError(f'unknown format {fmt!r}; use one of {", ".join(FORMATS)}')
        self.stream, self.fmt, self.count = stream, fmt, 0
        self._csv = None
        if fmt == 'csv':
            self._csv = csv.writer(stream, lineterminator='\n')
            self._csv.writerow(_CSV_COLUMNS)
        elif fmt == 'json':
            stream.write('[')

    def write(self, record: Dict[str, object]) -> None:
        fmt = self.fmt
        if fmt == 'jsonl':
            self.stream.write(json.dumps(record, ensure_ascii=False) + '\n')
        elif fmt == 'json':
            self.stream.write(('\n  ' if self.count == 0 else ',\n  ') + json.dumps(record, ensure_ascii=False))
        elif fmt == 'csv':
            preds = record.get('predictions')
            if preds:
                top = preds[0]
                self._csv.writerow([record['path'], top['index'], top['label'], f"{top['score']:.6f}",
                                    json.dumps(preds, ensure_ascii=False), ''])
            else:
                self._csv.writerow([record['path'], '', '', '', '', record.get('error', '')])
        else:
            self.stream.write(_table_block(record))
        self.count += 1
        self.stream.flush()

    def close(self) -> None:
        if self.fmt == 'json':
            self.stream.write('\n]\n' if self.count else ']\n')
        self.stream.flush()


def _table_block(record: Dict[str, object]) -> str:
    lines = [str(record['path'])]
    preds = record.get('predictions')
    if preds:
        width = max(len(str(p['index'])) for p in preds)
        for rank, p in enumerate(preds, 1):
            lines.append(f"  {rank:>2}  {100 * p['score']:6.2f}%  [{str(p['index']):>{width}}]  {p['label']}")
    else:
        lines.append(f"  error: {record.get('error')}")
    return '\n'.join(lines) + '\n'


def progress_bar(total: int, desc: Optional[str] = None, unit: str = 'images', enabled: Optional[bool] = None,
                 stream: Optional[TextIO] = None):
    """The progress bar of every long loop here (classify, features, validate, fine-tune): huggingface_hub's
    tqdm on stderr, so HF_HUB_DISABLE_PROGRESS_BARS=1 silences it as it does the Hub's downloads.

    ``enabled=None`` draws it only when the stream is a terminal (quiet when piped); it appears after half a
    second (short runs print nothing) and is erased when closed. A disabled bar takes the same calls.
    """
    from huggingface_hub.utils import tqdm
    disable = None if enabled is None else not enabled  # tqdm's None: off unless the stream is a terminal
    return tqdm(total=total, desc=desc, unit=unit, file=stream or sys.stderr, disable=disable, delay=0.5,
                leave=False, dynamic_ncols=True, mininterval=0.1)


def check_feature_output(out: Union[str, Path]) -> Path:
    """``out`` as a Path if a feature file can be written there (by its suffix), else UsageError."""
    out = Path(out)
    if out.suffix.lower() not in FEATURE_SUFFIXES:
        raise UsageError(f'--output must end in .npz or .safetensors, not {out.name!r}')
    return out


def read_features(path: Union[str, Path]) -> Tuple[np.ndarray, List[str], Dict[str, str]]:
    """What ``FeatureWriter`` (and so ``ema-hub features``) wrote: the features (N x D float32), the N paths, and
    the metadata (.safetensors only; empty for .npz)."""
    path = check_feature_output(path)
    if path.suffix.lower() == '.npz':
        with np.load(path) as data:
            return data['features'], [str(p) for p in data['paths'].tolist()], {}
    from safetensors import safe_open
    with safe_open(str(path), framework='np') as f:
        metadata = dict(f.metadata())
        return f.get_tensor('features'), json.loads(metadata.pop('paths')), metadata


class FeatureWriter:
    """Stream feature rows to ``.npz`` or ``.safetensors`` with flat memory; use as a context manager.

    ``add(paths, features)`` appends rows; ``close()`` assembles the file (``abort()`` removes the spill file).
    """

    def __init__(self, out: Union[str, Path], metadata: Optional[Dict[str, str]] = None):
        self.out = check_feature_output(out)
        self.kind = self.out.suffix.lower()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.metadata = dict(metadata or {})
        self.paths: List[str] = []
        self.dim: Optional[int] = None
        fd, self._spill = tempfile.mkstemp(prefix='.features-', suffix='.raw', dir=self.out.parent)
        self._raw = os.fdopen(fd, 'wb')

    def __enter__(self) -> 'FeatureWriter':
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add(self, paths: Sequence[str], features: np.ndarray) -> None:
        features = np.ascontiguousarray(features, dtype='<f4')
        if features.ndim != 2 or features.shape[0] != len(paths):
            raise ValueError(f'features must be (len(paths), D), got {features.shape} for {len(paths)} paths')
        if len(paths) == 0:
            self.dim = self.dim if self.dim is not None else features.shape[1]
            return
        if self.dim is None:
            self.dim = features.shape[1]
        elif features.shape[1] != self.dim:
            raise ValueError(f'feature width changed from {self.dim} to {features.shape[1]}')
        self._raw.write(features.tobytes())
        self.paths.extend(str(p) for p in paths)

    def _copy_raw(self, dst, chunk: int = 16 << 20) -> None:
        with open(self._spill, 'rb') as src:
            while True:
                block = src.read(chunk)
                if not block:
                    break
                dst.write(block)

    def close(self) -> Path:
        self._raw.close()
        n, d = len(self.paths), self.dim or 0
        try:
            with atomic_path(self.out) as tmp:
                if self.kind == '.npz':
                    self._write_npz(tmp, n, d)
                else:
                    self._write_safetensors(tmp, n, d)
        finally:
            if os.path.exists(self._spill):
                os.remove(self._spill)
        return self.out

    def abort(self) -> None:
        self._raw.close()
        if os.path.exists(self._spill):
            os.remove(self._spill)

    def _write_npz(self, tmp: Path, n: int, d: int) -> None:
        header = {'descr': np.lib.format.dtype_to_descr(np.dtype('<f4')), 'fortran_order': False, 'shape': (n, d)}
        with zipfile.ZipFile(tmp, 'w', compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open('features.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                self._copy_raw(f)
            with zf.open('paths.npy', 'w', force_zip64=True) as f:
                np.lib.format.write_array(f, np.array(self.paths, dtype=str) if n else np.zeros(0, dtype='<U1'))

    def _write_safetensors(self, tmp: Path, n: int, d: int) -> None:
        meta = {**self.metadata, 'paths': json.dumps(self.paths, ensure_ascii=False)}
        header = {'__metadata__': meta,
                  'features': {'dtype': 'F32', 'shape': [n, d], 'data_offsets': [0, n * d * 4]}}
        blob = json.dumps(header, ensure_ascii=False, separators=(',', ':')).encode('utf-8')
        blob += b' ' * (-len(blob) % 8)
        with open(tmp, 'wb') as f:
            f.write(struct.pack('<Q', len(blob)))
            f.write(blob)
            self._copy_raw(f)

