"""The README's promises: its set-up commands are what CI runs; and the docs' variants table is the registry's."""
import re
from pathlib import Path

from ema_hub import VARIANTS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / 'README.md').read_text(encoding='utf-8')
VARIANTS_PAGE = ROOT / 'docs' / 'pretrained.md'  # the variants table, in its Variants section


def _first_commands():
    block = re.search(r'```bash\n(.*?)```', README, re.S).group(1)
    return [line for line in block.splitlines() if line and not line.startswith('#')]


def test_readme_starts_with_the_two_setup_commands():
    classify, tests = _first_commands()
    assert 'pip install' in classify and 'ema-classify' in classify
    assert 'pip install' in tests and 'pytest' in tests


def test_ci_runs_the_readme_test_command():
    _, tests = _first_commands()
    ci = (ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    assert tests in ci.splitlines()


def test_readme_image_exists():
    classify, _ = _first_commands()
    image = classify.split('ema-classify', 1)[1].split()[0]
    assert (ROOT / image).is_file()


def test_variants_table_matches_registry():
    table = VARIANTS_PAGE.read_text(encoding='utf-8').split('## Variants', 1)[1]
    for v in VARIANTS.values():
        row = (f'| {v.name} | {v.base} | {v.params_m:.2f} | {v.base_params_m:.2f} | {v.gmacs:.2f} | '
               f'{v.base_gmacs:.2f} | {v.base_top1:.2f} |')
        assert row in table, f'{VARIANTS_PAGE.name} variants table is out of date for {v.name}: expected {row}'
