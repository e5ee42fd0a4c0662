"""Every file crossgrad writes goes through here: never through a link, atomically, with one-line errors.

A run directory, a report folder or a cache may hold links planted by someone else (`.lock` ->
`~/.bashrc`); following one would truncate or overwrite a file outside the directory. So files are
created with O_NOFOLLOW (and temporary files with O_EXCL), a link at the destination (or a hard link,
for a file written in place) is refused, and complete files are renamed into place (a rename replaces the link
itself, never its target). Problems with the destination (not a directory, name too long, no
permission, disk full) become an `OutputError`, one line naming the path, exit code 2 in the CLI.
"""
from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from crossgrad.errors import ConfigError


class OutputError(ConfigError):
    """A file or folder crossgrad should write cannot be written (or is a link it refuses to follow)."""


def describe(e: BaseException) -> str:
    """An OSError (or a torch writer's RuntimeError) as a short reason, without the path."""
    if not isinstance(e, OSError) and isinstance(e.__context__, OSError):
        e = e.__context__  # torch.save reports the file's OSError as an opaque RuntimeError raised while handling it
    if isinstance(e, OSError):
        if e.errno == errno.ELOOP:
            return "it is a symbolic link; refusing to follow it"
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            return f"{os.strerror(e.errno).lower()} (disk full or file size limit)"
        return os.strerror(e.errno).lower() if e.errno else str(e)
    return " ".join(str(e).split())[:200]


def make_dir(path: Path) -> Path:
    """`path` and its parents as directories, or an OutputError."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create folder {path}: a file of that name exists") from None
    except OSError as e:
        raise OutputError(f"cannot create folder {path}: {describe(e)}") from None
    return path


def refuse_link(path: Path, hard: bool = True) -> None:
    """An OutputError if `path` exists as a symbolic link, not a regular file, or (`hard`) a hard link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise OutputError(f"cannot write {path}: {describe(e)}") from None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"refusing to write {path}: it is a symbolic link (remove it; crossgrad never follows links)")
    if not stat.S_ISREG(st.st_mode):
        raise OutputError(f"cannot write {path}: it exists and is not a regular file")
    if hard and st.st_nlink > 1:
        raise OutputError(f"refusing to write {path}: it is a hard link to another file (remove it)")


def open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """os.open without following a link at `path`; a hard-linked or non-regular file is refused too."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            refuse_link(path)  # the clearer message
        raise OutputError(f"cannot write {path}: {describe(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        refuse_link(path)
        raise OutputError(f"cannot write {path}: it changed while being opened")
    return fd


def append_text(path: Path, text: str) -> None:
    """Append to `path` (created if missing), never through a link; all of `text` or nothing.

    A write cut short (disk full) is cut off again: a torn last line would read as a corrupt record.
    """
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        size, data = os.fstat(fd).st_size, memoryview(text.encode("utf-8"))
        try:
            while data:
                data = data[os.write(fd, data):]
        except OSError as e:
            os.ftruncate(fd, size)
            raise OutputError(f"cannot write {path}: {describe(e)}") from None
    finally:
        os.close(fd)


def open_append(path: Path, newline: str | None = None) -> IO[str]:
    """`path` opened for appending text (a log, a CSV file), never through a link."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding="utf-8", newline=newline)


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any], *, what: str = "") -> None:
    """`write(f)` into a new temporary file, fsync, then rename onto `path`.

    Readers see the old file or the whole new one, never half; when writing fails (disk full) the
    old file is untouched and the error says so. `what` names the old file in that message.
    """
    refuse_link(path, hard=False)  # a rename replaces a hard link's name, never the other file
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{secrets.token_hex(3)}")
    try:
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         0o644)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {describe(e)}") from None
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())  # on disk before it takes the name: a crash never leaves half a file
            os.replace(tmp, path)
        except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
            kept = f"; the previous {what or path.name} is untouched" if path.exists() else ""
            raise OutputError(f"cannot write {path}: {describe(e)}{kept}") from None
    finally:
        if os.path.lexists(tmp):
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
