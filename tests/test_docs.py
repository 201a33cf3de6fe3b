"""The docs name what exists: every repository path and every ``ema_hub.`` name that README.md or a page of docs/
cites in backticks is a file, or a module or attribute that imports."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / 'README.md', *sorted((ROOT / 'docs').glob('*.md'))]
PATH = re.compile(r'(?:ema_hub|cli|tests|benchmarks)/[\w./]*')  # a token that is a repository path, whole
DOTTED = re.compile(r'ema_hub(?:\.\w+)+')  # a token that is a dotted name, whole (arguments cut off at '(')


def _cited(page: Path):
    text = re.sub(r'```.*?```', '', page.read_text(encoding='utf-8'), flags=re.S)  # inline code only
    return re.findall(r'`([^`\n]+)`', text)


def _imports(name: str) -> bool:
    parts = name.split('.')
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module('.'.join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_paths_exist(page):
    paths = [t for t in _cited(page) if PATH.fullmatch(t)]
    assert [p for p in paths if not (ROOT / p).exists()] == []


@pytest.mark.parametrize('page', PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_cited_names_import(page):
    names = {m.group(0) for t in _cited(page) for m in [DOTTED.fullmatch(t.split('(', 1)[0])] if m}
    assert sorted(n for n in names if not _imports(n)) == []


def test_pages_cite_something():
    """The patterns above still match what the pages write (a guard against a test that checks nothing)."""
    cited = [t for page in PAGES for t in _cited(page)]
    assert sum(bool(PATH.fullmatch(t)) for t in cited) > 20
    assert sum(bool(DOTTED.fullmatch(t.split('(', 1)[0])) for t in cited) > 5


def test_readme_links_to_pages_that_exist():
    """mkdocs checks the links between pages; the README is outside the site, so its links are checked here."""
    links = re.findall(r'\]\(([^)#\s]+)(?:#[^)]*)?\)', PAGES[0].read_text(encoding='utf-8'))
    local = [link for link in links if '://' not in link]
    assert local and [link for link in local if not (ROOT / link).exists()] == []
