"""Run one of timm's scripts (or any script) with the EMA variants registered: ``python -m ema_hub.run train.py
--model resnet50_ema ...``.

timm's ``train.py``, ``validate.py``, ``inference.py``, ``benchmark.py`` and ``onnx_export.py`` find models by
name in timm's registry, which holds the variants once ``ema_hub`` is imported; only ``train.py`` has an option to
import a package first (``--device-modules``). This imports it, then runs the script as ``python SCRIPT ARGS``
would: as ``__main__``, with ``sys.argv`` set and the script's folder first on ``sys.path``.
"""
import runpy
import sys
from pathlib import Path
from typing import List, Optional

__all__ = ['main']

_USAGE = 'usage: python -m ema_hub.run SCRIPT.py [ARGS...]'


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ('-h', '--help'):
        print(_USAGE + '\n\n' + __doc__.split('\n\n')[1], file=sys.stderr)
        raise SystemExit(0 if argv else 2)
    script = Path(argv[0])
    if not script.is_file():
        print(f'error: {script}: no such script; give the path of a Python file, e.g. timm\'s train.py '
              '(in timm\'s repository, not in its wheel)', file=sys.stderr)
        raise SystemExit(2)
    import ema_hub  # noqa: F401  (registers the variants with timm)

    sys.argv = [str(script)] + list(argv[1:])
    sys.path.insert(0, str(script.resolve().parent))
    runpy.run_path(str(script), run_name='__main__')


if __name__ == '__main__':
    main()
