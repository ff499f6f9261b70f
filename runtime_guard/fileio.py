"""File helpers: atomic replacement (readers see the old file or the new one, never a
torn write) and bounded reads of regular files that cannot block on special files."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

NONBLOCK_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


def read_regular_file(path: str | os.PathLike[str], max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Contents and ``fstat`` of a regular file of at most ``max_bytes``.

    Opened with ``O_NONBLOCK`` (a FIFO planted at a config path would otherwise block
    the open until a writer appears) and checked with ``fstat`` on that descriptor
    before any read. Raises ``OSError`` (``EINVAL`` "not a regular file", ``EFBIG``
    "file too large", or the open's own error)."""
    fd = os.open(Path(path), NONBLOCK_READ)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, "file too large", str(path))
        chunks, got = [], 0
        while got <= max_bytes:
            b = os.read(fd, max_bytes + 1 - got)
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > max_bytes:
            raise OSError(errno.EFBIG, "file too large", str(path))
        return b"".join(chunks), st
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], data: bytes | Iterable[bytes], mode: int = 0o600) -> None:
    """Write ``data`` (bytes, or an iterable of pieces written as they come) to a temp
    file beside ``path`` (created with ``mode``), fsync, rename, fsync the folder."""
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            if isinstance(data, (bytes, bytearray, memoryview)):
                f.write(data)
            else:
                for piece in data:
                    f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # persist the rename itself
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
