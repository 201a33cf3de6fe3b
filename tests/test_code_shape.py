"""The code's shape: no import cycle among the project's modules, no function over 100 lines, and the Layout
page of the docs (docs/layout.md) names every module."""
import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it installs as (pyproject's package-dir).
PACKAGES = {'ema_hub': 'ema_hub', 'cli': 'ema_hub_cli', 'benchmarks': 'ema_hub_benchmarks'}
MAX_FUNCTION_LINES = 100


def _modules() -> Dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob('*.py')):
            parts = list(path.relative_to(ROOT / folder).with_suffix('').parts)
            if parts[-1] == '__init__':
                parts = parts[:-1]
            out['.'.join([package] + parts)] = path
    return out


def _imports(module: str, path: Path, known: Set[str]) -> Iterator[str]:
    """The project's modules ``module`` imports anywhere in its file (inside functions too)."""
    package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')
                anchor = anchor[:len(anchor) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            # ``from pkg import submodule`` imports the submodule; ``from pkg import name``, the package itself
            names = [f'{base}.{a.name}' if f'{base}.{a.name}' in known else base for a in node.names]
        else:
            continue
        for name in names:
            if name in known and name != module:
                yield name


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One import cycle, as the modules along it, or [] if there is none."""
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycles():
    modules = _modules()
    graph = {m: set(_imports(m, p, set(modules))) for m, p in modules.items()}
    assert _cycle(graph) == []


def test_no_function_over_100_lines():
    long = []
    for folder in ('ema_hub', 'cli'):
        for path in sorted((ROOT / folder).rglob('*.py')):
            for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        long.append(f'{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)')
    assert long == []


def test_layout_page_names_every_module():
    layout = (ROOT / 'docs' / 'layout.md').read_text(encoding='utf-8')
    missing = [str(path.relative_to(ROOT)) for folder in PACKAGES for path in sorted((ROOT / folder).rglob('*.py'))
               if path.name != '__init__.py' and str(path.relative_to(ROOT)) not in layout]
    assert missing == []
