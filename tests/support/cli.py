"""Running the CLI as users do: the installed console scripts (or the same entry point) in a subprocess.

``run`` is for ``ema-classify`` / ``ema-hub`` by entry-point name; ``run_module`` runs ``python -m ema_hub_cli.app``
from the repository root (what torchrun launches too). Neither may reach the real Hub: HF_HUB_OFFLINE=1 unless
the caller's environment says otherwise.
"""
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ['ROOT', 'CLI', 'command', 'run', 'run_module']

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, '-m', 'ema_hub_cli.app']


def command(entry: str) -> List[str]:
    """The command line of a console script: the installed script next to python, else its function."""
    script = Path(sys.executable).parent / entry
    if script.is_file():
        return [str(script)]
    func = 'classify_main' if entry == 'ema-classify' else 'main'
    return [sys.executable, '-c', f'from ema_hub_cli.app import {func}; {func}()']


def run(entry: str, *args: str, env: Optional[Dict[str, str]] = None, stdin: Optional[str] = None,
        cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    """Run a console script; whatever it answers, it never prints a traceback."""
    env = dict(env or os.environ)
    env.setdefault('HF_HUB_OFFLINE', '1')  # no test may reach the real Hub
    proc = subprocess.run(command(entry) + list(args), capture_output=True, text=True, env=env, input=stdin,
                          cwd=cwd, timeout=600)
    assert 'Traceback' not in proc.stderr, proc.stderr
    return proc


def run_module(args: List[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """``python -m ema_hub_cli.app ARGS`` from the repository root, offline, warnings off."""
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, **kwargs)
