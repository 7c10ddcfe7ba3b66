"""A small offline stand-in for the Hugging Face Hub HTTP API, for tests.

It implements what the installed `huggingface_hub` (2.x) calls for `model.push_to_hub(...)`, then
`from_pretrained(...)`, `snapshot_download(...)`, `list_repo_files(...)` and `ModelCard.load(...)`:

    POST      /api/repos/create                            create_repo (409 with its url if the repo exists)
    POST      /api/validate-yaml                           README metadata check (always valid)
    GET       /api/models/{repo_id}[/revision/{rev}]       model_info / repo_info / repo_exists / resolve_revision
    GET       /api/models/{repo_id}/tree/{rev}[/{path}]    list_repo_tree / list_repo_files (see below)
    POST      /api/models/{repo_id}/preupload/{rev}        upload mode of each file: "lfs" if binary or > 10 MB
    POST      /{repo_id}.git/info/lfs/objects/batch        LFS batch API, "basic" transfer
    PUT       /lfs/{sha256}                                upload of one LFS object (the href the batch API gives)
    POST      /api/models/{repo_id}/commit/{rev}           NDJSON commit of "file" and "lfsFile" operations
    GET|HEAD  /{repo_id}/resolve/{rev}/{path}              download, with the ETag, X-Repo-Commit, Content-Length
                                                           and, for LFS files, X-Linked-Etag / X-Linked-Size headers

Errors carry the `X-Error-Code` header (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) that huggingface_hub
turns into `RepositoryNotFoundError`, `RevisionNotFoundError` and `EntryNotFoundError`. A route the fake does not
know answers a plain 404 naming the request, and every request is logged to stderr.

Not implemented: datasets and Spaces (model repos only); history and branches (a repo is its latest commit, and
a revision is `main` or that commit's hash); authentication (any token works, but repo ids need a namespace since
there is no `whoami`); Xet storage (clients need `HF_HUB_DISABLE_XET=1`, which `FakeHub.env()` sets); multipart LFS
uploads, deletions, copies, pull requests, pagination and ranged downloads. Tree listings are always recursive
and list files only.

`huggingface_hub` reads `HF_ENDPOINT` when it is first imported, so run clients in a subprocess with
`env=hub.env()`.

Files are stored by content hash in the hub's directory; which path of which repo holds which object is kept in
memory.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple
from urllib.parse import parse_qs, unquote, urlsplit

import pytest


LFS_THRESHOLD = 10 * 1024 * 1024  # the Hub stores files above this size with LFS, as well as binary files


class _Entry(NamedTuple):
    oid: str  # what clients cache and compare by: the git blob sha1 of a regular file, the sha256 of an LFS file
    size: int
    lfs: bool


class _Commit(NamedTuple):
    sha: str
    files: dict[str, _Entry]


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra or {}


class FakeHub:
    """The server and its state; `start()` serves on a free port of 127.0.0.1 until `stop()`."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self.url = ""
        self._repos: dict[str, _Commit] = {}  # repo_id -> latest commit, replaced whole on each commit
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> FakeHub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.daemon_threads = True
        self._server.hub = self
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self) -> dict[str, str]:
        """Environment for a client process: this process's, without its Hub settings, pointed at the fake.

        Each call gets an empty cache of its own, so a client downloads everything it reads from the fake.
        """
        home = tempfile.mkdtemp(prefix="hf_home_", dir=self.root)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        return {
            **env,
            "HF_ENDPOINT": self.url,
            "HF_HOME": home,  # nothing is read from or written to the real cache
            "HF_TOKEN": "hf_fake_token",
            "HF_HUB_DISABLE_XET": "1",  # else weight uploads ask for a Xet write token
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "HF_HUB_OFFLINE": "0",
            "NO_PROXY": "127.0.0.1",
            "no_proxy": "127.0.0.1",
        }

    def files(self, repo_id: str) -> list[str]:
        return sorted(self._repos[repo_id].files)

    def object_path(self, oid: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", oid):
            raise _HubError(400, f"Invalid object id {oid!r}")
        return self.root / "objects" / oid

    def latest_commit(self, repo_id: str, revision: str) -> _Commit:
        commit = self._repos.get(repo_id)
        if commit is None:
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        if revision not in ("main", commit.sha):
            raise _HubError(404, f"Revision {revision} not found", "RevisionNotFound")
        return commit


_REPO = r"(?P<repo_id>[^/]+/[^/]+)"
_REV = r"(?P<revision>[^/]+)"
# (methods, pattern on the still-quoted path, handler); the named groups, unquoted, are the handler's arguments
_ROUTES = [
    (("POST",), r"/api/repos/create", "create_repo"),
    (("POST",), r"/api/validate-yaml", "validate_yaml"),
    (("GET",), rf"/api/models/{_REPO}(?:/revision/{_REV})?", "repo_info"),
    (("GET",), rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?", "tree"),
    (("POST",), rf"/api/models/{_REPO}/preupload/{_REV}", "preupload"),
    (("POST",), rf"/api/models/{_REPO}/commit/{_REV}", "commit"),
    (("POST",), rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    (("PUT",), r"/lfs/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    (("GET", "HEAD"), rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    @property
    def hub(self) -> FakeHub:
        return self.server.hub

    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        try:
            for methods, pattern, name in _ROUTES:
                match = re.fullmatch(pattern, url.path)
                if self.command in methods and match:
                    kwargs = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                    return getattr(self, name)(**kwargs)
            raise _HubError(404, f"The fake hub has no route for {self.command} {url.path}")
        except _HubError as error:
            headers = {"X-Error-Message": error.message}
            if error.code:
                headers["X-Error-Code"] = error.code
            self._send_json({"error": error.message, **error.extra}, error.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def _send(self, data: bytes, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(data)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _send_json(self, payload, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(json.dumps(payload).encode(), status, {"Content-Type": "application/json", **(headers or {})})

    # Repos

    def create_repo(self) -> None:
        payload = json.loads(self.body)
        if payload.get("type", "model") != "model" or not payload.get("organization"):
            raise _HubError(400, "The fake hub only has model repos, with a namespace ('user/name')")
        repo_id = f"{payload['organization']}/{payload['name']}"
        with self.hub._lock:
            if repo_id in self.hub._repos:  # as on the real Hub, the 409 names the url (create_repo(exist_ok=True))
                url = f"{self.hub.url}/{repo_id}"
                raise _HubError(409, "You already created this model repo", extra={"url": url})
            self.hub._repos[repo_id] = _Commit(hashlib.sha1(repo_id.encode()).hexdigest(), {})
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})

    def validate_yaml(self) -> None:
        self._send_json({"errors": [], "warnings": []})

    def repo_info(self, repo_id: str, revision: str = "main") -> None:
        commit = self.hub.latest_commit(repo_id, revision)
        siblings = [{"rfilename": path, "size": entry.size} for path, entry in sorted(commit.files.items())]
        self._send_json({"id": repo_id, "sha": commit.sha, "private": False, "siblings": siblings})

    def tree(self, repo_id: str, revision: str, path: str = "") -> None:
        commit = self.hub.latest_commit(repo_id, revision)
        prefix = f"{path.rstrip('/')}/" if path else ""
        listing = []
        for name, entry in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            item = {"type": "file", "path": name, "size": entry.size, "oid": entry.oid}
            if entry.lfs:  # pointerSize: the size of the git-lfs pointer file that stands for the object in git
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.oid}\nsize {entry.size}\n"
                item["lfs"] = {"oid": entry.oid, "size": entry.size, "pointerSize": len(pointer)}
            listing.append(item)
        self._send_json(listing)

    # Uploads: preupload, then LFS batch + PUT of each LFS object, then the commit itself

    def preupload(self, repo_id: str, revision: str) -> None:
        commit = self.hub.latest_commit(repo_id, revision)
        files = []
        for file in json.loads(self.body)["files"]:
            binary = b"\0" in base64.b64decode(file["sample"])  # git's heuristic, on the first 512 bytes
            current = commit.files.get(file["path"])  # its oid lets the client skip a file that did not change
            files.append(
                {
                    "path": file["path"],
                    "uploadMode": "lfs" if binary or file["size"] > LFS_THRESHOLD else "regular",
                    "shouldIgnore": False,
                    "oid": current and current.oid,
                }
            )
        self._send_json({"files": files})

    def lfs_batch(self, repo_id: str) -> None:
        self.hub.latest_commit(repo_id, "main")
        objects = []
        for obj in json.loads(self.body)["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not self.hub.object_path(obj["oid"]).exists():  # no "actions" tells the client it is already stored
                item["actions"] = {"upload": {"href": f"{self.hub.url}/lfs/{obj['oid']}"}}
            objects.append(item)
        self._send_json({"transfer": "basic", "objects": objects})

    def lfs_upload(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise _HubError(400, f"Uploaded content does not match its sha256 {oid}")
        self.hub.object_path(oid).write_bytes(self.body)
        self._send(b"")

    def commit(self, repo_id: str, revision: str) -> None:
        if "create_pr" in self.query or revision != "main":
            raise _HubError(400, "The fake hub only commits to 'main'")
        with self.hub._lock:
            parent = self.hub.latest_commit(repo_id, revision)
            files = dict(parent.files)
            for line in self.body.splitlines():
                operation = json.loads(line)
                key, value = operation["key"], operation["value"]
                if key == "file":
                    data = base64.b64decode(value["content"])
                    oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id
                    self.hub.object_path(oid).write_bytes(data)
                    files[value["path"]] = _Entry(oid, len(data), lfs=False)
                elif key == "lfsFile":
                    path = self.hub.object_path(value["oid"])
                    if not path.exists():
                        raise _HubError(400, f"LFS object {value['oid']} of {value['path']} was not uploaded")
                    files[value["path"]] = _Entry(value["oid"], path.stat().st_size, lfs=True)
                elif key != "header":
                    raise _HubError(400, f"The fake hub does not support {key!r} commit operations")
            sha = hashlib.sha1(parent.sha.encode() + self.body).hexdigest()
            self.hub._repos[repo_id] = _Commit(sha, files)
        self._send_json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha})

    # Downloads

    def resolve(self, repo_id: str, revision: str, path: str) -> None:
        commit = self.hub.latest_commit(repo_id, revision)
        entry = commit.files.get(path)
        if entry is None:
            raise _HubError(404, f"{path} not found in {repo_id}", "EntryNotFound")
        headers = {"Content-Type": "application/octet-stream", "ETag": f'"{entry.oid}"', "X-Repo-Commit": commit.sha}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.oid}"', "X-Linked-Size": str(entry.size)})
        self._send(self.hub.object_path(entry.oid).read_bytes(), headers=headers)


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A running `FakeHub`, shared by the tests of a module."""
    hub = FakeHub(tmp_path_factory.mktemp("fake_hub")).start()
    yield hub
    hub.stop()
