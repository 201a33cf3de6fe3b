"""Python run in a fresh process, for what must be in place before an import (TRITON_INTERPRET, an empty kernel
cache, a thread count), with tests/ on the path so that the script uses the same helpers (``support.models``)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Optional

__all__ = ['run_script']

_TESTS = Path(__file__).resolve().parents[1]


def run_script(source: str, env: Optional[Dict[str, str]] = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``source`` (dedented) with ``python -c``; ``env`` replaces the environment (default: this one's)."""
    environ = dict(os.environ if env is None else env)
    environ['PYTHONPATH'] = os.pathsep.join(p for p in (str(_TESTS), environ.get('PYTHONPATH')) if p)
    return subprocess.run([sys.executable, '-c', textwrap.dedent(source)], capture_output=True, text=True,
                          timeout=timeout, env=environ)
