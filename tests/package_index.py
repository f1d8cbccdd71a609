"""Package files made in the test (wheels, sdists) and a PEP 503 index on loopback that serves them."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import io
import re
import shutil
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_wheel(folder: Path, members: dict[str, bytes], name: str = "tinypkg", version: str = "0.1.0") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
        info = f"{name}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def make_sdist(folder: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """tinypkg-0.1.0.tar.gz with the given files (names as given) and symbolic links (name -> target)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tinypkg-0.1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tf.addfile(info)
    return path


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
