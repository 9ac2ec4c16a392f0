"""A local HTTP server that speaks as much of the Hugging Face hub's API as huggingface_hub uses
to plan and download a model (read from huggingface_hub's source: hf_api.model_info / repo_info /
list_repo_tree, file_download.get_hf_file_metadata / http_get, get_safetensors_metadata):

  GET  /api/models/{repo}[/revision/{rev}]     model info, siblings with sizes (`?blobs=true`)
  GET  /api/models/{repo}/tree/{rev}           the file list snapshot_download filters
  HEAD /{repo}/resolve/{rev}/{file}            X-Repo-Commit, ETag, Content-Length
  GET  /{repo}/resolve/{rev}/{file}            the bytes, honouring `Range: bytes=a-b` / `a-`

Every request is recorded (method, path, Range header); `drop_once` names files whose first
full GET is cut off half-way (the connection closed mid-body), as a flaky network would.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse


@dataclass
class HubFile:
    data: bytes
    size: int | None = None  # declared size when only a prefix is served (a header-only file)

    @property
    def nbytes(self) -> int:
        return self.size if self.size is not None else len(self.data)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass
class Seen:
    method: str
    repo: str
    file: str
    range: str | None
    auth: str | None = None  # the Authorization header (HF_TOKEN)


@dataclass
class FakeHub:
    repos: dict[str, dict[str, HubFile]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    drop_once: set[str] = field(default_factory=set)
    url: str = ""
    _server: Any = None

    def add_folder(self, repo: str, folder: Path, extra: dict[str, bytes] | None = None) -> None:
        files = {str(p.relative_to(folder)): HubFile(p.read_bytes())
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        files.update({k: HubFile(v) for k, v in (extra or {}).items()})
        self.repos[repo] = files

    def sha(self, repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()  # a 40-hex commit id

    def gets(self, suffix: str = "") -> list[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.file.endswith(suffix) and s.file]

    def start(self) -> FakeHub:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                hub._handle(self, head=True)

            def do_GET(self) -> None:  # noqa: N802
                hub._handle(self, head=False)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ---- request handling ----------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"]:
            self._api(h, parts[2:])
            return
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            self.seen.append(Seen("HEAD" if head else "GET", repo, file, h.headers.get("Range"),
                                  h.headers.get("Authorization")))
            self._resolve(h, repo, rev, file, head)
            return
        self._send(h, 404, b"{}", {"X-Error-Code": "RepoNotFound"})

    def _api(self, h: BaseHTTPRequestHandler, parts: list[str]) -> None:
        repo = "/".join(parts[:2])
        self.seen.append(Seen("GET", repo, "", None, h.headers.get("Authorization")))
        files = self.repos.get(repo)
        if files is None:
            self._send(h, 404, b'{"error": "Repository not found"}',
                       {"X-Error-Code": "RepoNotFound"})
            return
        rest = parts[2:]
        if rest[:1] in (["revision"], ["tree"]) and not self._rev_ok(repo, rest[1]):
            self._send(h, 404, b'{"error": "Revision not found"}',
                       {"X-Error-Code": "RevisionNotFound"})
            return
        if rest[:1] == ["tree"]:
            body: Any = [{"type": "file", "path": f, "size": hf.nbytes, "oid": hf.sha256[:40],
                          "lfs": {"oid": hf.sha256, "size": hf.nbytes, "pointerSize": 134}}
                         for f, hf in files.items()]
        else:
            body = {"id": repo, "modelId": repo, "sha": self.sha(repo), "private": False,
                    "siblings": [{"rfilename": f, "size": hf.nbytes, "blobId": hf.sha256[:40],
                                  "lfs": {"size": hf.nbytes, "sha256": hf.sha256,
                                          "pointerSize": 134}}
                                 for f, hf in files.items()]}
        self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def _rev_ok(self, repo: str, rev: str) -> bool:
        return rev in ("main", self.sha(repo))

    def _resolve(self, h: BaseHTTPRequestHandler, repo: str, rev: str, file: str,
                 head: bool) -> None:
        files = self.repos.get(repo)
        commit = {"X-Repo-Commit": self.sha(repo)}
        if files is None:
            self._send(h, 404, b"", {"X-Error-Code": "RepoNotFound"}, head)
            return
        if not self._rev_ok(repo, rev):
            self._send(h, 404, b"", {"X-Error-Code": "RevisionNotFound"}, head)
            return
        hf = files.get(file)
        if hf is None:
            self._send(h, 404, b"", {"X-Error-Code": "EntryNotFound", **commit}, head)
            return
        meta = {**commit, "ETag": f'"{hf.sha256}"', "Accept-Ranges": "bytes"}
        if head:
            self._send(h, 200, b"", {**meta, "Content-Length": str(hf.nbytes)}, head=True)
            return
        rng = h.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            start, end = int(a), min(int(b) if b else hf.nbytes - 1, hf.nbytes - 1)
            chunk = hf.data[start:end + 1]
            self._send(h, 206, chunk, {**meta, "Content-Range": f"bytes {start}-{end}/{hf.nbytes}"})
            return
        if file in self.drop_once:
            self.drop_once.discard(file)
            h.send_response(200)
            for k, v in {**meta, "Content-Length": str(len(hf.data))}.items():
                h.send_header(k, v)
            h.end_headers()
            h.wfile.write(hf.data[: len(hf.data) // 2])
            h.wfile.flush()
            h.close_connection = True  # the client sees the body end early
            return
        self._send(h, 200, hf.data, meta)

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, code: int, body: bytes,
              headers: dict[str, str] | None = None, head: bool = False) -> None:
        h.send_response(code)
        hdrs = {"Content-Length": str(len(body)), **(headers or {})}
        for k, v in hdrs.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)
