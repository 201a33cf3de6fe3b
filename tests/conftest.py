"""Shared fixtures: a loopback Hugging Face Hub the real client and timm talk to, with a per-test cache."""
import os
from pathlib import Path
from typing import Dict, Iterator

import pytest

from support.hub_server import FakeHub, client_env, use_fake_hub


@pytest.fixture(autouse=True, scope='session')
def _no_real_hub(tmp_path_factory) -> Iterator[None]:
    """No test may reach the real Hub or the developer's cache: point both at a dead end unless a test asks."""
    import huggingface_hub.constants as hc
    saved = hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE
    hc.ENDPOINT = 'http://127.0.0.1:9'  # discard port: nothing listens
    hc.HUGGINGFACE_CO_URL_TEMPLATE = hc.ENDPOINT + '/{repo_id}/resolve/{revision}/{filename}'
    hc.HF_HUB_CACHE = str(tmp_path_factory.mktemp('hf_cache'))
    yield
    hc.ENDPOINT, hc.HUGGINGFACE_CO_URL_TEMPLATE, hc.HF_HUB_CACHE = saved


@pytest.fixture
def hf_home(tmp_path: Path) -> Path:
    return tmp_path / 'hf_home'


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, hf_home: Path) -> Iterator[FakeHub]:
    """The real huggingface_hub client and timm talk to an in-memory Hub; cache under tmp; undone after the test."""
    with FakeHub() as hub:
        use_fake_hub(monkeypatch, hub, hf_home)
        yield hub


@pytest.fixture
def hub_env(fake_hub: FakeHub, hf_home: Path) -> Dict[str, str]:
    """Environment for subprocesses (the CLI) that talk to ``fake_hub``; add HF_HUB_OFFLINE='1' for offline runs."""
    return {**os.environ, **client_env(fake_hub, hf_home), 'HF_HUB_OFFLINE': '0'}
