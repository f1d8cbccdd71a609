"""Safe extraction of one member (a file, or a folder's files) from a wheel (zip) or an sdist (tar).

Every target path is checked before anything is written: a member whose name is absolute, holds ``..``,
a drive letter or a backslash, or that is a link or a special file, stops the extraction with its name.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import stat
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from lorapipe.errors import PipelineError

_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Entry:
    """One archive entry: its name and what it is (``file``, ``dir``, ``link`` or ``special``)."""

    name: str
    kind: str


def _zip_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "link"
    if info.is_dir():
        return "dir"
    # Zip writers often record permissions without a file type: no type bits means a regular file.
    return "file" if stat.S_IFMT(mode) == 0 or stat.S_ISREG(mode) else "special"


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.issym() or info.islnk():
        return "link"
    if info.isdir():
        return "dir"
    return "file" if info.isfile() else "special"


@contextlib.contextmanager
def open_archive(archive: Path) -> Iterator[tuple[list[Entry], Callable[[str], IO[bytes]]]]:
    """The entries of a zip or tar archive and a function that opens a regular file among them."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            yield [Entry(i.filename, _zip_kind(i)) for i in zf.infolist()], zf.open
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            by_name = {m.name: m for m in members}

            def open_member(name: str) -> IO[bytes]:
                handle = tf.extractfile(by_name[name])
                assert handle is not None  # only regular files are opened
                return handle

            yield [Entry(m.name, _tar_kind(m)) for m in members], open_member
    else:
        raise PipelineError(f"{archive.name}: neither a zip (wheel) nor a tar (sdist) archive")


def _safe_target(dest: Path, relative: str, archive: Path, entry: Entry, field: str) -> Path:
    """``dest / relative`` if it stays inside ``dest``; otherwise an error naming the member."""

    def refuse(why: str) -> PipelineError:
        return PipelineError(f"{archive.name}: member {entry.name!r} ({field}) {why}; nothing was extracted")

    if entry.kind in ("link", "special"):
        raise refuse(f"is a {'link' if entry.kind == 'link' else 'special file'}, not a regular file")
    parts = PurePosixPath(relative).parts
    if (
        not relative
        or relative.startswith(("/", "\\"))
        or "\\" in relative
        or _DRIVE.match(relative)
        or ".." in parts
        or "//" in relative
    ):
        raise refuse("has an unsafe path that could land outside the destination")
    target = dest / relative
    root = dest.resolve()
    if not target.resolve().is_relative_to(root):
        raise refuse("would be written outside the destination")
    return target


def extract_member(archive: Path, member: str, dest: Path, field: str) -> Path:
    """Extract one file to ``dest`` itself, or every file under a folder ``member/`` to below ``dest``."""
    prefix = member.rstrip("/") + "/"
    with open_archive(archive) as (entries, open_member):
        exact = [e for e in entries if e.name == member and e.kind != "dir"]
        if exact:
            plan = [(exact[0], _safe_target(dest.parent, dest.name, archive, exact[0], field))]
        else:
            inside = [e for e in entries if e.name.startswith(prefix) and e.kind != "dir"]
            plan = [(e, _safe_target(dest, e.name[len(prefix) :], archive, e, field)) for e in inside]
        if not plan:
            raise PipelineError(f"{archive.name}: member {member!r} ({field}) not found in the archive")
        for entry, target in plan:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open_member(entry.name) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
    return dest
