"""A loopback fake of the Hugging Face Hub HTTP API, good enough for the real `huggingface_hub` (2.4.0) client.

The server itself is stdlib only (`http.server` + `threading`). Every route and header below was taken from the
client's source; the function that needs it is named in a comment. Only model repos exist, each holding
`{filename: bytes}` plus a fake 40-hex commit sha. Uploads never use LFS or Xet: `preupload` answers "regular" for
every file, so the client sends file contents base64-encoded inside the ndjson body of the commit request.

`use_fake_hub` / `client_env` point the client at a running `FakeHub`: the first for this process (pytest
`monkeypatch`), the second for a fresh subprocess (environment variables).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    import pytest

Response = tuple[int, dict[str, str], bytes]

# `/{repo_id}/resolve/{revision}/{filename}`: `hf_hub_url` quotes the revision with safe="", so it has no "/".
_RESOLVE = re.compile(r"^/(?P<repo>.+?)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
# `/api/models/{repo_id}[/{op}/{revision}[/{path}]]`, see `HfApi.model_info`, `_iter_repo_tree_pages`,
# `_fetch_upload_modes` (preupload) and `_send_commit` (commit).
_API = re.compile(
    r"^/api/models/(?P<repo>[^/]+(?:/[^/]+)?)(?:/(?P<op>revision|tree|preupload|commit)/(?P<rev>[^/]+)(?P<rest>/.*)?)?$"
)


class _HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
        super().__init__(message)
        # `hf_raise_for_status` maps X-Error-Code to the exception class (RepoNotFound -> RepositoryNotFoundError,
        # EntryNotFound -> RemoteEntryNotFoundError, RevisionNotFound -> RevisionNotFoundError). `_format` takes
        # the message from X-Error-Message (the only place a HEAD answer can carry it) and from the JSON "error".
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code is not None:
            headers["X-Error-Code"] = code
        self.response: Response = (status, headers, json.dumps({"error": message}).encode())


def _json(obj: Any, status: int = 200) -> Response:
    return status, {"Content-Type": "application/json"}, json.dumps(obj).encode()


def git_oid(data: bytes) -> str:
    """Git blob sha1 of `data`: the Hub's ETag/oid for regular files (compared by `CommitOperationAdd._local_oid`)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """In-memory Hub: `{repo_id: {filename: bytes}}`, a commit sha per repo, and a count of requests received."""

    def __init__(self, repos: dict[str, dict[str, bytes]] | None = None, host: str = "127.0.0.1", port: int = 0):
        self._lock = threading.Lock()
        self._repos: dict[str, dict[str, bytes]] = {}
        self._shas: dict[str, str] = {}
        self._log: list[tuple[str, str]] = []
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        for repo_id, files in (repos or {}).items():
            for name, data in files.items():
                self.add_file(repo_id, name, data)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """Base URL to use as `HF_ENDPOINT` / `HfApi(endpoint=...)`, e.g. `http://127.0.0.1:41234`."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        # A short poll interval keeps `stop()` (which waits for the serve loop to notice) fast.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state, for tests ---------------------------------------------------------------------------------------
    def create_repo(self, repo_id: str, sha: str | None = None) -> None:
        """Create an empty repo (no-op if it exists, except that `sha` is applied when given)."""
        with self._lock:
            self._repos.setdefault(repo_id, {})
            self._shas[repo_id] = sha or self._shas.get(repo_id) or self._tree_sha(repo_id)

    def add_file(self, repo_id: str, filename: str, data: bytes) -> None:
        """Add/replace a file (creating the repo if needed); like a git commit, this gives the repo a new sha."""
        with self._lock:
            self._repos.setdefault(repo_id, {})[filename] = bytes(data)
            self._shas[repo_id] = self._tree_sha(repo_id)

    def set_commit_sha(self, repo_id: str, sha: str) -> None:
        """Force the repo's current commit sha (40 lowercase hex), e.g. to pin a known revision in a test."""
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            raise ValueError(f"not a 40-hex sha: {sha!r}")
        with self._lock:
            self._repos[repo_id]  # KeyError for an unknown repo
            self._shas[repo_id] = sha

    def commit_sha(self, repo_id: str) -> str:
        with self._lock:
            return self._shas[repo_id]

    def files(self, repo_id: str) -> dict[str, bytes]:
        """A copy of the repo's files; KeyError if the repo does not exist."""
        with self._lock:
            return dict(self._repos[repo_id])

    @property
    def request_count(self) -> int:
        """Number of HTTP requests received so far (any method, any path, including errors)."""
        with self._lock:
            return len(self._log)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """`(method, path?query)` of every request received, oldest first."""
        with self._lock:
            return list(self._log)

    def _tree_sha(self, repo_id: str) -> str:
        listing = "".join(f"{n}\0{git_oid(d)}\n" for n, d in sorted(self._repos[repo_id].items()))
        return hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    def _lookup(self, repo_id: str, revision: str) -> tuple[dict[str, bytes], str]:
        if repo_id not in self._repos:
            raise _HubError(404, "RepoNotFound", f"Repository Not Found: {repo_id}")
        sha = self._shas[repo_id]
        if revision not in ("main", sha):  # only the head commit exists here
            raise _HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return self._repos[repo_id], sha

    # -- HTTP ---------------------------------------------------------------------------------------------------
    def _handle(self, method: str, target: str, headers: Message, body: bytes) -> Response:
        parts = urlsplit(target)
        with self._lock:
            self._log.append((method, target))
            try:
                return self._route(method, parts.path, parse_qs(parts.query), headers, body)
            except _HubError as err:
                return err.response
            except Exception as exc:  # a FakeHub bug or a request it cannot parse: 400, which the client never
                # retries (a 5xx would be retried with backoff by `http_backoff`), and the error text shows `exc`.
                return _HubError(400, None, f"FakeHub failed on {method} {target}: {exc!r}").response

    def _route(self, method: str, path: str, query: dict[str, list[str]], headers: Message, body: bytes) -> Response:
        if path == "/api/agent-harnesses":  # `utils/_detect_agent._fetch_registry`, unless telemetry is disabled
            return _json({"standardEnvVars": [], "harnesses": {}})
        if path == "/api/validate-yaml" and method == "POST":  # `HfApi._validate_yaml` (create_commit of README.md)
            return _json({"errors": [], "warnings": []})
        if path == "/api/repos/create" and method == "POST":  # `HfApi.create_repo`
            return self._create(json.loads(body))
        if (m := _RESOLVE.match(path)) and method in ("GET", "HEAD"):
            repo_id, rev, name = unquote(m["repo"]), unquote(m["rev"]), unquote(m["file"])
            return self._resolve(repo_id, rev, name, headers.get("Range"))
        if m := _API.match(path):
            repo_id, op, rev = unquote(m["repo"]), m["op"], unquote(m["rev"] or "main")
            if op in (None, "revision") and method == "GET":
                return self._info(repo_id, rev)
            if op == "tree" and method == "GET":
                recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
                return self._tree(repo_id, rev, unquote(m["rest"] or "").strip("/"), recursive)
            if op == "preupload" and method == "POST":
                return self._preupload(repo_id, rev, json.loads(body))
            if op == "commit" and method == "POST":
                if "create_pr" in query:
                    raise _HubError(400, None, "FakeHub does not support pull requests (create_pr)")
                return self._commit(repo_id, rev, body)
        raise _HubError(404, None, f"FakeHub has no route for {method} {path}")

    def _resolve(self, repo_id: str, rev: str, name: str, range_header: str | None) -> Response:
        files, sha = self._lookup(repo_id, rev)
        if name not in files:
            # X-Repo-Commit on the 404 lets `_get_metadata_or_catch_error` cache the miss under `.no_exist/<sha>`.
            raise _HubError(404, "EntryNotFound", f"Entry not found: {name}", {"X-Repo-Commit": sha})
        data = files[name]
        headers = {
            # `get_hf_file_metadata` reads X-Repo-Commit (commit hash: snapshot folder and refs/<rev>; a HEAD answer
            # without it raises FileMetadataError) and ETag (blob file name in the cache; X-Linked-Etag/-Size are for
            # LFS redirects, not used here). Content-Length is the expected size (checked by `http_get`). There is no
            # X-Xet-Hash, so `parse_xet_file_data_from_response` returns None and the client downloads by plain GET.
            "X-Repo-Commit": sha,
            "ETag": f'"{git_oid(data)}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        # `http_get` sends `Range: bytes=<n>-` only to resume an interrupted download; it reads Content-Range.
        if range_header and (m := re.fullmatch(r"bytes=(\d+)-(\d*)", range_header.strip())):
            start, end = int(m[1]), min(int(m[2] or len(data) - 1), len(data) - 1)
            if start >= len(data) or end < start:
                raise _HubError(416, None, f"Range not satisfiable: {range_header}")
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return 206, headers, data[start : end + 1]
        return 200, headers, data

    def _info(self, repo_id: str, rev: str) -> Response:
        # `HfApi.model_info` -> ModelInfo: `sha` is read by snapshot_download, `siblings` by `model_info` users.
        files, sha = self._lookup(repo_id, rev)
        siblings = [{"rfilename": n, "size": len(d), "blobId": git_oid(d)} for n, d in sorted(files.items())]
        return _json({"id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "siblings": siblings})

    def _tree(self, repo_id: str, rev: str, prefix: str, recursive: bool) -> Response:
        # `HfApi.list_repo_tree` (used by snapshot_download and list_repo_files): one page (no `Link: next` header),
        # entries parsed by RepoFile(path, size, oid) / RepoFolder(path, oid).
        files, _ = self._lookup(repo_id, rev)
        base = prefix + "/" if prefix else ""
        entries: list[dict[str, Any]] = []
        folders: set[str] = set()
        for name, data in sorted(files.items()):
            if not name.startswith(base):
                continue
            parts = name[len(base) :].split("/")  # non-recursive: direct children only
            depth = len(parts) if recursive else min(2, len(parts))
            folders.update(base + "/".join(parts[:i]) for i in range(1, depth))
            if recursive or len(parts) == 1:
                entries.append({"type": "file", "path": name, "size": len(data), "oid": git_oid(data)})
        if prefix and not entries and not folders:
            raise _HubError(404, "EntryNotFound", f"Entry not found: {prefix}")
        entries += [{"type": "directory", "path": f, "oid": git_oid(f.encode())} for f in sorted(folders)]
        return _json(entries)

    def _create(self, payload: dict[str, Any]) -> Response:
        if payload.get("type", "model") not in (None, "model"):
            raise _HubError(400, None, "FakeHub only supports model repos")
        repo_id = f"{payload.get('organization') or 'test-user'}/{payload['name']}"
        exists = repo_id in self._repos
        if not exists:
            self._repos[repo_id] = {}
            self._shas[repo_id] = self._tree_sha(repo_id)
        # `HfApi.create_repo` reads `url` from the body, also on 409 when exist_ok=True.
        return _json({"url": f"{self.url}/{repo_id}", "name": repo_id}, 409 if exists else 200)

    def _preupload(self, repo_id: str, rev: str, payload: dict[str, Any]) -> Response:
        # `_fetch_upload_modes` requires path/uploadMode/shouldIgnore per file. "regular" for every file keeps the
        # client off LFS batch and Xet uploads (`_upload_files`, `pipelined_upload`) and makes it inline the bytes in
        # the commit. `oid` (git sha1 of the current remote file) lets it skip files that did not change.
        files, _ = self._lookup(repo_id, rev)
        answer = [
            {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_oid(files[f["path"]]) if f["path"] in files else None}
            for f in payload["files"]
        ]
        return _json({"files": answer})

    def _commit(self, repo_id: str, rev: str, body: bytes) -> Response:
        # `_send_commit` posts ndjson: a "header" line, then file / deletedFile / deletedFolder / lfsFile lines.
        files, old_sha = self._lookup(repo_id, rev)
        new = dict(files)
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "file":
                new[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if new.pop(value["path"], None) is None:
                    raise _HubError(404, "EntryNotFound", "A file with this name doesn't exist")
            elif key == "deletedFolder":
                new = {n: d for n, d in new.items() if not n.startswith(value["path"].rstrip("/") + "/")}
            elif key != "header":
                raise _HubError(400, None, f"FakeHub cannot store {key!r} operations (only regular uploads)")
        self._repos[repo_id] = new
        sha = hashlib.sha1(old_sha.encode() + body).hexdigest()
        self._shas[repo_id] = sha
        # `_send_commit` builds CommitInfo from commitUrl and commitOid (pullRequestUrl only with create_pr).
        return _json({"commitUrl": f"{self.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})


class _Handler(BaseHTTPRequestHandler):
    """Reads the request, asks `FakeHub._handle` for the answer, writes it. HTTP/1.0: one request per connection."""

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        hub: FakeHub = self.server.hub  # type: ignore[attr-defined]
        status, headers, payload = hub._handle(self.command, self.path, self.headers, body)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))  # also on HEAD: it is the file size there
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep pytest output quiet
        pass


def client_env(hub: FakeHub, hf_home: Path) -> dict[str, str]:
    """Environment variables that point a *fresh* Python process's huggingface_hub at `hub`, with its cache in
    `hf_home` (`constants.py` reads them once, at import). Merge into `os.environ` for `subprocess.run(env=...)`."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        # Else the first `build_hf_headers` call fetches `/api/agent-harnesses` (`utils/_headers.py: detect_agent`).
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }


def use_fake_hub(monkeypatch: pytest.MonkeyPatch, hub: FakeHub, hf_home: Path) -> None:
    """Point the huggingface_hub already imported in *this* process at `hub` for one test (undone by `monkeypatch`).

    Setting HF_ENDPOINT is not enough once huggingface_hub is imported: `constants.ENDPOINT`,
    `constants.HUGGINGFACE_CO_URL_TEMPLATE` (used by `hf_hub_url`, hence by `hf_hub_download` and timm) and the cache
    paths are computed at import, and `huggingface_hub.hf_api.api` (behind the module-level `model_info`,
    `list_repo_files`, ...) captured the endpoint when it was built. All of them are read at call time, so patching
    them here works; env vars are set too, for code that reads them and for subprocesses.
    """
    from huggingface_hub import constants, hf_api

    for key, value in client_env(hub, hf_home).items():
        monkeypatch.setenv(key, value)
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    patched = {
        "ENDPOINT": hub.url,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.url + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HOME": str(hf_home),
        "HF_HUB_CACHE": str(hf_home / "hub"),
        "HF_XET_CACHE": str(hf_home / "xet"),
        "HF_TOKEN_PATH": str(hf_home / "token"),  # never send (or read) the developer's real token
        "HF_STORED_TOKENS_PATH": str(hf_home / "stored_tokens"),
        "HF_HUB_OFFLINE": False,  # read by `constants.is_offline_mode()` in the request hook
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    for name, value in patched.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.url)
