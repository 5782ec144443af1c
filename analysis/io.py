"""Where outputs may go, and how they are written.

One place decides whether a command (or a page) may write a path:

- :func:`check_output_file` and :func:`check_output_dir` refuse, before any work, an output that
  is an input of the same command, lies inside an input checkpoint's directory, holds an input,
  is a special file (device, FIFO, socket) or a directory where a file is wanted, or cannot be
  written (read-only filesystem, no permission); a non-empty directory that is not ours is
  refused unless the caller says ``overwrite``;
- :func:`write_atomic` writes to a temporary sibling and renames it over the target, so a crash,
  a cancel or a full disk never leaves a half-written file: an existing symlink is followed (the
  file it points to is replaced, in its own directory; the link stays), anything but a regular
  file at the target is refused, and the temporary file is removed on every failure path.

Every refusal and every OS error is an :class:`OutputError`: one line naming the path and the
problem (the CLI prints it and exits 2; a page shows it with ``st.error``).
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from analysis.errors import SubnetscopeError, one_line


class OutputError(SubnetscopeError):
    """An output path that may not or cannot be written, in one line."""


_KIND = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
         stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFLNK: "a symlink"}


def os_error(path, e: Exception) -> OutputError:
    """The one line for an error while writing ``path`` (ENOSPC, EROFS, EACCES, EIO ...). Besides
    ``OSError`` it takes what writers built on other layers raise for the same causes
    (safetensors' ``SafetensorError``, torch's ``RuntimeError`` from its file writer)."""
    if isinstance(e, OSError):
        what = e.strerror or one_line(e)
        where = e.filename if getattr(e, "filename", None) else path
    else:
        what, where = one_line(e), path
    return OutputError(f"{where}: cannot write ({what})")


def write_errors() -> tuple[type, ...]:
    """The exception types a failed write of a model or a torch file may raise."""
    from safetensors import SafetensorError

    return (OSError, RuntimeError, SafetensorError)


def _real(path) -> Path:
    """The absolute path with every symlink resolved (a symlink loop is an OutputError)."""
    try:
        return Path(os.path.realpath(Path(path).expanduser(), strict=False))
    except OSError as e:
        raise OutputError(f"{path}: cannot resolve the path ({e.strerror or one_line(e)})") from None


def _stat(path, real: Path) -> os.stat_result | None:
    """``os.stat`` of the resolved target; None when nothing is there yet."""
    try:
        return os.stat(real)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise os_error(path, e) from None


def _kind(mode: int) -> str:
    return _KIND.get(stat.S_IFMT(mode), "not a regular file")


class Inputs:
    """The inputs of one command: files and directories no output may touch.

    Args:
        paths (iterable of str or PathLike): checkpoints (directories or files), mask files, data
            files, run directories. References that are not local paths (hub ids, ``demo``, a
            dataset name) are ignored; a hub id's cache folder is protected by the caller passing
            the resolved path.
    """

    def __init__(self, paths: Iterable = ()):
        self.files: set[Path] = set()
        self.dirs: set[Path] = set()
        for p in paths:
            self.add(p)

    def add(self, path) -> None:
        if path is None:
            return
        p = Path(str(path)).expanduser()
        try:
            if not p.exists():
                return
            real = _real(p)
            if real.is_dir():
                self.dirs.add(real)
                self.files.update(_real(f) for f in real.iterdir() if f.is_file())  # a checkpoint's files
            else:
                self.files.add(real)
        except OSError:
            return

    def _inside_dir(self, real: Path) -> Path | None:
        for d in self.dirs:
            if real == d or d in real.parents:
                return d
        return None

    def check_file(self, path, real: Path) -> None:
        if real in self.files:
            raise OutputError(f"{path}: is an input of this command; refusing to overwrite it")
        d = self._inside_dir(real)
        if d is not None:
            raise OutputError(f"{path}: lies inside the input {d}; refusing to write there")

    def check_dir(self, path, real: Path) -> None:
        for d in self.dirs:
            if real == d:
                raise OutputError(f"{path}: is an input of this command; refusing to write into it")
            if d in real.parents:
                raise OutputError(f"{path}: lies inside the input {d}; refusing to write there")
            if real in d.parents:
                raise OutputError(f"{path}: holds the input {d}; refusing to write there")
        for f in self.files:
            if real in f.parents:
                raise OutputError(f"{path}: holds the input {f}; refusing to write there")


def _writable_dir(path, d: Path) -> None:
    """The nearest existing ancestor of ``d`` must be a writable directory."""
    probe = d
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        ro = _read_only_fs(probe)
        raise OutputError(f"{path}: cannot write in {probe} ({'read-only file system' if ro else 'permission denied'})")


def _read_only_fs(d: Path) -> bool:
    try:
        return bool(os.statvfs(d).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def check_output_file(path, inputs: Inputs | Iterable = ()) -> Path:
    """Checks, before any work, that ``path`` may be written as an output file.

    Args:
        path (str or PathLike): the output (``--json``, ``--mask-out``, ``--scores-out``).
        inputs (Inputs or iterable of paths): the command's inputs.
    Returns:
        Path: the file that will be written (a symlink resolved to its target).
    Raises:
        OutputError: one line — an input, inside an input checkpoint, a directory or special
        file, or not writable.
    """
    inputs = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    real = _real(path)
    st = _stat(path, real)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    inputs.check_file(path, real)
    _writable_dir(path, real.parent)  # a read-only file in a writable directory is replaced by the rename
    return real


def check_output_dir(path, inputs: Inputs | Iterable = (), *, ours=None, overwrite: bool = False) -> Path:
    """Checks, before any work, that ``path`` may be used as an output directory.

    Args:
        path (str or PathLike): the directory (e.g. a fine-tune's ``--out``).
        inputs (Inputs or iterable of paths): the command's inputs.
        ours (callable, optional): ``ours(Path) -> bool``, True when a non-empty directory is one
            this kind of output wrote before (recognised by its own marker file). Default: None.
        overwrite (bool): allow a non-empty directory that is not ours. Default: False.
    Returns:
        Path: the resolved directory.
    Raises:
        OutputError: one line.
    """
    inputs = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    real = _real(path)
    st = _stat(path, real)
    if st is not None and not stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: exists and is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}, "
                          "not a directory")
    inputs.check_dir(path, real)
    if st is not None:
        try:
            used = any(real.iterdir())
        except OSError as e:
            raise OutputError(f"{path}: cannot list the directory ({e.strerror or one_line(e)})") from None
        if used and not overwrite and not (ours is not None and ours(real)):
            raise OutputError(f"{path}: a non-empty directory that Subnetscope did not write; "
                              "choose another, or pass --overwrite to write into it anyway")
        _writable_dir(path, real)
    else:
        _writable_dir(path, real.parent)
    return real


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Writes ``data`` to ``path`` via a temporary file in the target's directory and a rename.

    An existing symlink at ``path`` is followed and the file it points to replaced (the link
    stays); a directory, FIFO, socket or device there is refused. Any OS error (full disk,
    read-only filesystem, no permission) is an :class:`OutputError` and leaves no temporary file.

    Returns:
        Path: ``path`` as given.
    """
    path = Path(path)
    target = _real(path)
    st = _stat(path, target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600; a normal file respects the umask
        os.replace(tmp, target)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise os_error(path, e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    return path


_PROC_STATUS = "/proc/self/status"


def current_umask() -> int:
    """The process's umask, read without changing it.

    ``os.umask`` can only read the mask by setting a new one and back, and a file that another
    thread (Streamlit runs pages in threads) creates in between gets the wrong permissions. Linux
    (≥ 4.7) shows the mask on the ``Umask:`` line of ``/proc/self/status``; elsewhere it is read
    off a file created with mode 0o777 in a fresh private directory (``open`` applies the mask).

    Returns:
        int: the permission bits a new file loses, e.g. ``0o022``.
    """
    try:
        with open(_PROC_STATUS, encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with tempfile.TemporaryDirectory() as d:
        fd = os.open(os.path.join(d, "probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o777)
        try:
            return 0o777 & ~stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """``json.dumps`` (indented; NaN refused — callers write None) then :func:`write_atomic`."""
    return write_atomic(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")
