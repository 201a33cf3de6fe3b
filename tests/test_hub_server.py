"""The real huggingface_hub client (and timm's hf-hub path) against `support.hub_server.FakeHub` (tests/support).

How the client is pointed at the server: huggingface_hub reads HF_ENDPOINT / HF_HOME into `huggingface_hub.constants`
once, at import, and pytest has imported it long before any test runs. So, in this process, the `fake_hub` fixture
(tests/conftest.py, cache under `hf_home`) calls `use_fake_hub`, which monkeypatches the constants the client reads at
call time (`ENDPOINT`, `HUGGINGFACE_CO_URL_TEMPLATE`, cache/token paths, offline and telemetry flags) plus the endpoint
of the module-level `huggingface_hub.hf_api.api` behind `huggingface_hub.model_info` & co. `monkeypatch` restores
everything after the test. A fresh subprocess instead gets plain environment variables (`client_env`), read when it
imports the client: the offline test uses that route, so both are covered.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, list_repo_files, model_info, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from support.hub_server import FakeHub, client_env

REPO = "acme/tiny"


def test_hf_hub_download_returns_bytes_and_pins_commit(fake_hub: FakeHub, hf_home: Path) -> None:
    fake_hub.add_file(REPO, "config.json", b'{"a": 1}')
    sha = "ab" * 20
    fake_hub.set_commit_sha(REPO, sha)

    path = Path(hf_hub_download(REPO, "config.json"))

    assert path.read_bytes() == b'{"a": 1}'
    assert path.is_relative_to(hf_home / "hub")
    assert path.parent.name == sha  # snapshots/<X-Repo-Commit>/config.json
    assert [m for m, _ in fake_hub.requests] == ["HEAD", "GET"]
    # revision given as the commit sha: served from cache without any request
    count = fake_hub.request_count
    assert Path(hf_hub_download(REPO, "config.json", revision=sha)).read_bytes() == b'{"a": 1}'
    assert fake_hub.request_count == count


def test_snapshot_download_model_info_and_list_files(fake_hub: FakeHub) -> None:
    files = {"config.json": b"{}", "weights/model.bin": os.urandom(3000), "weights/deep/x.txt": b"x"}
    for name, data in files.items():
        fake_hub.add_file(REPO, name, data)

    folder = Path(snapshot_download(REPO))

    assert folder.name == fake_hub.commit_sha(REPO)
    assert {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files
    info = model_info(REPO)  # module-level function: goes through the patched `hf_api.api`
    assert info.sha == fake_hub.commit_sha(REPO)
    assert sorted(s.rfilename for s in info.siblings or []) == sorted(files)
    assert sorted(list_repo_files(REPO)) == sorted(files)
    api = HfApi(endpoint=fake_hub.url)
    assert sorted(e.path for e in api.list_repo_tree(REPO)) == ["config.json", "weights"]
    assert sorted(e.path for e in api.list_repo_tree(REPO, "weights")) == ["weights/deep", "weights/model.bin"]


def test_unknown_repo_raises_repository_not_found(fake_hub: FakeHub) -> None:
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("acme/missing", "config.json")
    with pytest.raises(RepositoryNotFoundError):
        model_info("acme/missing")
    with pytest.raises(RepositoryNotFoundError):
        snapshot_download("acme/missing")


def test_missing_file_and_revision_raise(fake_hub: FakeHub) -> None:
    fake_hub.add_file(REPO, "config.json", b"{}")
    with pytest.raises(RemoteEntryNotFoundError) as excinfo:
        hf_hub_download(REPO, "nope.safetensors")
    assert isinstance(excinfo.value, EntryNotFoundError)  # the base class timm catches
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(REPO, "config.json", revision="v9")


def test_upload_folder_then_download_round_trip(fake_hub: FakeHub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    files = {"model.safetensors": os.urandom(3 * 1024 * 1024), "sub/notes.txt": b"hello", "README.md": b"# hi\n"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    api = HfApi(endpoint=fake_hub.url, token="test")

    api.create_repo("acme/up", exist_ok=True)
    api.create_repo("acme/up", exist_ok=True)  # 409 + url, tolerated by exist_ok
    commit = api.upload_folder(repo_id="acme/up", folder_path=src, commit_message="up")

    assert fake_hub.files("acme/up") == files
    assert commit.oid == fake_hub.commit_sha("acme/up")
    for name, data in files.items():
        assert Path(hf_hub_download("acme/up", name)).read_bytes() == data
    # single-file path (create_commit, not the hf_xet upload pipeline); README.md goes through /api/validate-yaml
    api.upload_file(path_or_fileobj=b"# changed\n", path_in_repo="README.md", repo_id="acme/up")
    assert fake_hub.files("acme/up")["README.md"] == b"# changed\n"
    assert Path(hf_hub_download("acme/up", "README.md")).read_bytes() == b"# changed\n"


def test_raw_protocol_range_and_error_headers() -> None:
    """What the client only needs in edge cases: Range (resumed downloads) and headers on a 404."""
    with FakeHub({"acme/raw": {"f.bin": b"0123456789"}}) as hub:
        ranged = urllib.request.Request(f"{hub.url}/acme/raw/resolve/main/f.bin", headers={"Range": "bytes=4-"})
        with urllib.request.urlopen(ranged) as resp:
            assert (resp.status, resp.read(), resp.headers["Content-Range"]) == (206, b"456789", "bytes 4-9/10")
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(f"{hub.url}/acme/raw/resolve/main/nope")
        assert excinfo.value.code == 404
        assert excinfo.value.headers["X-Error-Code"] == "EntryNotFound"
        assert excinfo.value.headers["X-Repo-Commit"] == hub.commit_sha("acme/raw")
        assert hub.request_count == 2


_SCRIPT = """
import sys
from huggingface_hub import constants, hf_hub_download
assert constants.ENDPOINT == sys.argv[1], constants.ENDPOINT
print(open(hf_hub_download("acme/tiny", sys.argv[2])).read())
"""


def _run_client(hub: FakeHub, hf_home: Path, filename: str, offline: bool) -> str:
    env = {**os.environ, **client_env(hub, hf_home), "HF_HUB_OFFLINE": "1" if offline else "0"}
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT, hub.url, filename], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_offline_subprocess_uses_cache_without_requests(fake_hub: FakeHub, hf_home: Path) -> None:
    fake_hub.add_file(REPO, "cached.txt", b"from cache")
    fake_hub.add_file(REPO, "online.txt", b"from server")
    hf_hub_download(REPO, "cached.txt")  # fills hf_home in this process

    before = fake_hub.request_count
    assert _run_client(fake_hub, hf_home, "cached.txt", offline=True) == "from cache"
    assert fake_hub.request_count == before

    # control: the same env without HF_HUB_OFFLINE really talks to the server
    assert _run_client(fake_hub, hf_home, "online.txt", offline=False) == "from server"
    assert fake_hub.request_count > before


def test_timm_create_model_from_fake_hub(fake_hub: FakeHub) -> None:
    timm = pytest.importorskip("timm")
    import torch
    from timm.models import push_to_hf_hub

    model = timm.create_model("resnet18", num_classes=10, pretrained=False)
    push_to_hf_hub(model, "acme/resnet18-test", token="test", safe_serialization=True)
    assert {"config.json", "model.safetensors"} <= set(fake_hub.files("acme/resnet18-test"))

    loaded = timm.create_model("hf-hub:acme/resnet18-test", pretrained=True)

    assert loaded.num_classes == 10
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, expected[key]), key
