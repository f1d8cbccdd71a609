"""A PEP 503 package index on loopback, served from a folder made in the test."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import re
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Index:
    """Files published under ``root/files``; one ``root/simple/<project>/index.html`` page per project."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url

    def publish(self, path: Path, project: str, listed_sha256: str | None = "actual") -> Path:
        """Add ``path`` to ``project``'s page; ``listed_sha256`` is the hash the page states (None: no hash)."""
        files = self.root / "files"
        files.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, files / path.name)
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if listed_sha256 == "actual" else listed_sha256
        page = self.root / "simple" / re.sub(r"[-_.]+", "-", project).lower() / "index.html"
        page.parent.mkdir(parents=True, exist_ok=True)
        fragment = f"#sha256={digest}" if digest else ""
        link = f'<a href="../../files/{html.escape(path.name)}{fragment}">{html.escape(path.name)}</a><br/>\n'
        page.write_text((page.read_text() if page.exists() else "<html><body>\n") + link)
        return files / path.name


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format, *args) -> None:
        pass


@contextlib.contextmanager
def serve_index(root: Path) -> Iterator[Index]:
    root.mkdir(parents=True, exist_ok=True)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Index(root, f"http://127.0.0.1:{server.server_address[1]}/simple")
    finally:
        server.shutdown()
        server.server_close()
