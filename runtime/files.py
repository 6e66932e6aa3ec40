"""Opening files a user names: regular files only.

A FIFO, character device or socket given where a file is expected (an image, a demonstrations
file, a JSON config, a file an export lists) would block `open`/`read` forever or stream without
end; a folder fails later with a less clear message. `open_regular` opens without blocking and
checks the opened file itself (no check-then-open race), so every reader refuses them alike.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import BinaryIO

__all__ = ["NotARegularFile", "open_regular", "read_regular"]


class NotARegularFile(OSError):
    """The path names a folder, FIFO, device or socket (an OSError: readers' OSError handling
    reports it with its `strerror`)."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`open(path, "rb")` for a regular file (symbolic links followed); NotARegularFile for
    anything else, checked on the opened descriptor."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = _kind(mode)
            code = errno.EISDIR if kind == "a folder" else errno.EINVAL
            raise NotARegularFile(code, f"is {kind}, not a regular file", os.fspath(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; NotARegularFile otherwise, and OSError(EFBIG) when it is
    larger than `max_bytes` (checked before reading)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise OSError(
                errno.EFBIG, f"is {size:,} bytes, more than the {max_bytes:,} allowed", str(path)
            )
        return f.read()
