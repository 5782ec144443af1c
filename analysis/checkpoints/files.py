"""Reading a checkpoint's small files safely: a regular file only (a FIFO or a device is refused
before it is opened), JSON of bounded size, and the OS's words for what went wrong — each problem a
:class:`CheckpointError` of one line naming the file."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

from analysis.errors import LINE_BREAKS, SubnetscopeError, one_line

class CheckpointError(SubnetscopeError):
    """A checkpoint cannot be used; the message is one line naming the file and the problem."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(LINE_BREAKS))



MAX_JSON = 100_000_000  # config.json / index files larger than this are refused unread


def stat_path(path: Path) -> os.stat_result | None:
    """``os.stat`` (links followed), None when nothing is there; a dangling or looping link,
    a path too long or a directory that cannot be searched is a one-line error."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path}: broken symbolic link (its target does not exist)") from None
        return None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {os_reason(e)}") from None
    except ValueError:  # an embedded NUL byte
        raise CheckpointError(f"{str(path)!r}: not a valid path (it holds a NUL byte)") from None


def file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a plain file")


def os_reason(e: OSError) -> str:
    """The OS's words for an error (``Permission denied``), without Python's decoration."""
    if e.errno == errno.ELOOP:
        return "symbolic link loop (Too many levels of symbolic links)"
    return e.strerror or one_line(e) or type(e).__name__


def open_regular(path: Path):
    """Opens a regular file for reading: returns (binary file, size in bytes).

    Anything else is refused before a byte is read: the type is checked with ``stat`` before
    opening (opening a device can have effects) and again on the descriptor, which is opened
    non-blocking so that a FIFO swapped in meanwhile cannot hang the open.
    """
    st = stat_path(path)
    if st is None:
        raise CheckpointError(f"{path}: no such file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file: it is {file_kind(st.st_mode)}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {os_reason(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file: it is {file_kind(st.st_mode)}")
    return os.fdopen(fd, "rb"), st.st_size


def read_json_file(path: Path, what: str):
    """A small JSON file (config, index): regular, at most 100 MB, UTF-8, parsed."""
    f, size = open_regular(path)
    with f:
        if size > MAX_JSON:
            raise CheckpointError(f"{path}: {size:,} bytes, too large for a {what} (limit {MAX_JSON:,})")
        try:
            raw = f.read()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {os_reason(e)}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = "nested too deeply" if isinstance(e, RecursionError) else one_line(e)
        raise CheckpointError(f"{path}: malformed {what} ({detail})") from None

