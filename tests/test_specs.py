"""Model specs as users write them (ema_hub/specs.py): parsed in one place, nothing looked up."""
from pathlib import Path

import pytest

from ema_hub.specs import CHECKPOINT_SOURCES, HF_HUB, LOCAL_DIR, ModelSpec, parse_spec


def test_prefixes() -> None:
    assert (HF_HUB, LOCAL_DIR) == ('hf-hub:', 'local-dir:') and CHECKPOINT_SOURCES == ('hf-hub', 'local-dir')


@pytest.mark.parametrize('text, name, tag, repo_id, folder', [
    ('resnet50_ema', 'resnet50_ema', '', None, None),
    ('resnet50_ema.warm_a1_in1k', 'resnet50_ema', 'warm_a1_in1k', None, None),
    ('resnet50_ema.a.b', 'resnet50_ema', 'a.b', None, None),  # the tag is everything after the first dot
    ('resnet51_nope', 'resnet51_nope', '', None, None),  # not looked up: hub.resolve_model checks names
    ('hf-hub:org/tiny-ema', '', '', 'org/tiny-ema', None),
    ('hf-hub:org/model.v2', '', '', 'org/model.v2', None),  # a dot in a repo id is not a tag
    ('local-dir:/tmp/run/r18', '', '', None, Path('/tmp/run/r18')),
    ('local-dir:relative/dir.v1', '', '', None, Path('relative/dir.v1')),
])
def test_parse_spec(text: str, name: str, tag: str, repo_id, folder) -> None:
    spec = parse_spec(text)
    assert spec == ModelSpec(text, name=name, tag=tag, repo_id=repo_id, folder=folder)
    assert str(spec) == text and spec.is_checkpoint == (repo_id is not None or folder is not None)
    assert parse_spec(spec) is spec  # already parsed: as it is
