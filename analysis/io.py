"""Where outputs may go, and how they are written.

One place decides whether a command (or a page) may write a path:

- :func:`check_output_file` and :func:`check_output_dir` refuse, before any work, an output that
  is an input of the same command, lies inside an input checkpoint's directory, holds an input,
  is a directory, socket or block device where a file is wanted, lies in a virtual file system
  (``/proc``, ``/sys``), or cannot be written (read-only filesystem, no permission); a
  non-empty directory that is not ours is refused unless the caller says ``overwrite``. An
  output file is also refused when it resolves to a checkpoint's weights (recognised by their
  first bytes: safetensors, PyTorch, GGUF) or lies inside any checkpoint directory, an input of
  this command or not: a file that is a checkpoint's weights is never ours to replace;
- :func:`write_atomic` writes to a temporary sibling and renames it over the target, so a crash,
  a cancel or a full disk never leaves a half-written file: an existing symlink is followed (the
  file it points to is replaced, in its own directory; the link stays), and the temporary file
  is removed on every failure path. A stream — ``-`` (standard output), a path naming a file
  descriptor (``/dev/stdout``, ``/dev/fd/N``), a FIFO, a character device such as ``/dev/null``
  — is written directly, in one go.

Every refusal and every OS error is an :class:`OutputError`: one line naming the path and the
problem (the CLI prints it and exits 2; a page shows it with ``st.error``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
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


STDOUT = "-"  # an output given as "-" is the standard output
_VIRTUAL = (Path("/proc"), Path("/sys"))  # the kernel's file systems: a file there is a kernel setting
_TORCH_MAGIC = bytes.fromhex("6cfc9c46f9206aa85019")  # torch.save's legacy format pickles this number first
_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _descriptor(path) -> int | None:
    """The file descriptor of this process that ``path`` names — ``/dev/stdout``, ``/dev/fd/N``,
    ``/proc/self/fd/N``, or a symlink to one — or None. Such a path is written through the
    descriptor itself: a pipe, a terminal, or the file a shell redirected it to (at its offset,
    before what the command prints after it); ``realpath`` cannot follow these links."""
    fd_path = re.compile(rf"^/(?:dev/fd|proc/(?:self|thread-self|{os.getpid()})/fd)/(\d+)$")
    p = os.path.normpath(os.path.abspath(Path(path).expanduser()))
    for _ in range(40):  # the kernel's own limit on links followed
        m = fd_path.match(p)
        if m:
            return int(m.group(1))
        try:
            p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
        except (OSError, ValueError):  # not a link, or nothing there
            return None
    return None


def _check_descriptor(path, fd: int) -> None:
    import fcntl

    try:
        st = os.fstat(fd)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise OutputError(f"{path}: names file descriptor {fd}, which is not open") from None
    if stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path}: names file descriptor {fd}, a directory; refusing to write there")
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise OutputError(f"{path}: names file descriptor {fd}, which is open for reading only")


def _check_descriptor_file(path, fd: int, inputs: Inputs) -> None:
    """A descriptor open on a regular file (``--json /dev/fd/3 3>>FILE``) writes into that file: it
    gets the checks of a file output (an input, a checkpoint's weights, inside a checkpoint)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return  # a pipe, a terminal, /dev/null: a stream
    try:
        target = Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        target = None
    for f in inputs.files:
        try:
            fs = os.stat(f)
        except OSError:
            continue
        if (fs.st_dev, fs.st_ino) == (st.st_dev, st.st_ino):
            raise OutputError(f"{path}: names file descriptor {fd}, open on the input {f}; refusing to write there")
    if target is None or not target.is_absolute():
        return
    fmt = _weights_format(target)
    if fmt is not None:
        raise OutputError(f"{path}: names file descriptor {fd}, open on a checkpoint's weights ({target}, {fmt}); "
                          "refusing to write there")
    inputs.check_file(path, target)
    ck = _checkpoint_dir(target)
    if ck is not None:
        raise OutputError(f"{path}: names file descriptor {fd}, open on a file inside the checkpoint {ck}; "
                          "refusing to write there")


def _stream_stat(path) -> os.stat_result | None:
    """``os.stat`` of ``path`` as the kernel resolves it, when that is a stream (a FIFO or pipe, a
    character device): ``/dev/stdout`` reaches the pipe through ``/proc/self/fd/1``, which
    ``realpath`` cannot follow. None for anything else (or nothing there)."""
    try:
        st = os.stat(Path(path).expanduser())
    except (OSError, ValueError):
        return None
    return st if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) else None


def _virtual(real: Path) -> Path | None:
    return next((v for v in _VIRTUAL if real == v or v in real.parents), None)


def _ours(meta: dict) -> bool:
    """A safetensors file Subnetscope wrote (a mask, ``importance --scores-out``): a rerun replaces it."""
    return str(meta.get("format", "")).startswith("subnetscope.") or {"selector", "granularity"} <= set(meta)


def _weights_format(real: Path) -> str | None:
    """The format of the checkpoint weights held by the existing regular file ``real`` — by its
    first bytes, not its name: "safetensors" (not a mask or scores file of ours), "PyTorch" (a
    zip archive with ``data.pkl``, or the legacy pickle format) or "GGUF"; None otherwise."""
    try:
        fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None  # unreadable: not something we can tell apart, and the write check says why
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return None
            head = f.read(16)
            if head[:4] == b"GGUF":
                return "GGUF"
            if head[:1] == b"\x80" and _TORCH_MAGIC in head:
                return "PyTorch"
            if head[:4] == b"PK\x03\x04":
                f.seek(0)
                with zipfile.ZipFile(f) as z:
                    names = z.namelist()
                return "PyTorch" if any(n == "data.pkl" or n.endswith("/data.pkl") for n in names) else None
            n = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
            if not (2 <= n <= st.st_size - 8 and head[8:9] == b"{"):
                return None
            if n > 100_000_000:  # the format's limit on a header: a file claiming more is not ours either
                return "safetensors"
            f.seek(8)
            try:
                meta = json.loads(f.read(n).decode("utf-8")).get("__metadata__") or {}
            except (ValueError, AttributeError, RecursionError):
                return "safetensors"  # a damaged header of someone's weights is still theirs
            return None if isinstance(meta, dict) and _ours(meta) else "safetensors"
        except (OSError, zipfile.BadZipFile, ValueError):
            return None


def _model_config(p: Path) -> bool:
    """Whether ``p`` is a model's ``config.json`` (it names ``model_type`` or ``architectures``), not
    another tool's (a fine-tune run's ``config.json`` is its options)."""
    try:
        if p.stat().st_size > 16 * 2**20:
            return False
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg)


def _checkpoint_dir(path: Path) -> Path | None:
    """The nearest directory above ``path`` that is a model directory (a model's ``config.json``
    beside a file that holds weights, by content: a mask or scores file of ours is no weights), or
    None."""
    for d in path.parents:
        try:
            if not ((d / "config.json").is_file() and _model_config(d / "config.json")):
                continue
            if any(os.path.lexists(d / w) for w in _WEIGHT_NAMES) or any(
                    _weights_format(f) is not None for f in d.glob("*.safetensors")):
                return d
        except OSError:
            continue
    return None


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

    ``-`` is the standard output; a path naming a file descriptor (``/dev/stdout``,
    ``/dev/fd/3``), a FIFO or a character device (``/dev/null``) is a stream, written directly by
    :func:`write_atomic`.

    Args:
        path (str or PathLike): the output (``--json``, ``--mask-out``, ``--scores-out``).
        inputs (Inputs or iterable of paths): the command's inputs.
    Returns:
        Path: the file that will be written (a symlink resolved to its target; a descriptor as
        ``/dev/fd/N``; a stream as given).
    Raises:
        OutputError: one line — an input, a checkpoint's weights, inside a checkpoint directory
        (an input or not), in ``/proc`` or ``/sys``, a directory, socket or block device, or not
        writable.
    """
    inputs = inputs if isinstance(inputs, Inputs) else Inputs(inputs)
    if str(path) == STDOUT:
        return Path("/dev/fd/1")
    fd = _descriptor(path)
    if fd is not None:
        _check_descriptor(path, fd)
        _check_descriptor_file(path, fd, inputs)
        return Path(f"/dev/fd/{fd}")
    if _stream_stat(path) is not None:
        return Path(path)
    if str(path).endswith(os.sep) and not os.path.isdir(path):
        raise OutputError(f"{path}: names a directory (it ends with {os.sep}), not an output file")
    real = _real(path)
    virtual = _virtual(real)
    if virtual is not None:
        raise OutputError(f"{path}: lies in {virtual}, the kernel's virtual file system; refusing to write there")
    st = _stat(path, real)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    inputs.check_file(path, real)
    if st is not None:
        fmt = _weights_format(real)
        if fmt is not None:
            via = "" if Path(path).expanduser().absolute() == real else f" ({real})"
            raise OutputError(f"{path}: is a checkpoint's weights{via}, {fmt}; refusing to replace it")
    given = Path(os.path.normpath(Path(path).expanduser().absolute()))
    ck = _checkpoint_dir(real) or _checkpoint_dir(given)  # a hub snapshot's files link into blobs/
    if ck is not None:
        raise OutputError(f"{path}: lies inside the checkpoint {ck}; refusing to write there")
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
    stays); a directory, socket or block device there is refused. A stream — ``-`` (standard
    output), a path naming a file descriptor (``/dev/stdout``), a FIFO, a character device — is
    written directly: it has no directory to hold a temporary file, and a reader sees the bytes
    as they come. Any OS error (full disk,
    read-only filesystem, no permission, no reader on a FIFO) is an :class:`OutputError` and
    leaves no temporary file.

    Returns:
        Path: ``path`` as given.
    """
    raw = data.encode() if isinstance(data, str) else data
    if str(path) == STDOUT:
        _write_stdout(raw)
        return Path(path)
    path = Path(path)
    fd = _descriptor(path)
    if fd is not None:
        _write_descriptor(path, fd, raw)
        return path
    if _stream_stat(path) is not None:
        _write_stream(path, raw)
        return path
    target = _real(path)
    st = _stat(path, target)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{path}: is {_kind(st.st_mode)}, not a regular file; refusing to replace it")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
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


def _write_descriptor(path: Path, fd: int, raw: bytes) -> None:
    """Writes through one of this process's descriptors (``/dev/stdout``), after what Python has
    buffered for stdout and stderr, so that the output keeps its place among what is printed."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise os_error(path, e) from None


def _write_stream(path: Path, raw: bytes) -> None:
    """Writes to a FIFO, pipe or character device. The open does not block: a FIFO that no
    process reads is an error (ENXIO), not a hang; the writes then block as a pipe's do."""
    import fcntl

    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        if e.errno == errno.ENXIO:
            raise OutputError(f"{path}: no process is reading the FIFO; start the reader first") from None
        raise os_error(path, e) from None
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
    except OSError as e:
        raise os_error(path, e) from None
    finally:
        os.close(fd)


_stdout = None  # the standard output "-" writes to while a command's summary goes to stderr


@contextlib.contextmanager
def stdout_reserved():
    """While an output goes to ``-``: standard output holds that output alone (``--json - | jq``),
    and what the command prints meanwhile goes to stderr."""
    global _stdout
    saved = _stdout
    _stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        _stdout = saved


def _write_stdout(raw: bytes) -> None:
    out = _stdout or sys.stdout
    try:
        out.flush()
        buf = getattr(out, "buffer", None)
        if buf is not None:
            buf.write(raw)
            buf.flush()
        else:
            out.write(raw.decode())
        out.flush()
    except OSError as e:  # a closed pipe (EPIPE), a full disk behind a redirect
        raise OutputError(f"standard output: cannot write ({e.strerror or one_line(e)})") from None


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


def replace_dir(tmp: Path, out_dir: Path) -> None:
    """Moves the finished directory ``tmp`` to ``out_dir`` (a sibling of it); an existing ``out_dir`` is
    renamed away first and removed after (a directory is never half-written in place)."""
    os.chmod(tmp, 0o755)  # mkdtemp made it private
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old)  # renaming a directory over an empty one is allowed
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
