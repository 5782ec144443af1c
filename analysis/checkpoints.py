"""Open, resolve and align checkpoints; stream their tensors one at a time.

A checkpoint reference is a local Hugging Face model directory (single or sharded
safetensors, or pytorch_model.bin), a single ``.safetensors`` file, a ``.bin``/``.pt``
state dict (read with ``torch.load(weights_only=True)`` only), or a hub id resolved
through ``huggingface_hub`` (local cache first). Nothing is unpickled otherwise and no
remote code runs. Tensors are memory-mapped and read one at a time, never two whole
models at once. Every problem is a :class:`CheckpointError` whose message is one line
naming the file and the problem.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Iterator

from analysis.errors import LINE_BREAKS, SubnetscopeError, one_line, quoted
from analysis.structure import (KINDS, Architecture, architecture_from_config, config_mismatch, normalize_name,
                                tensor_role)


class CheckpointError(SubnetscopeError):
    """A checkpoint cannot be used; the message is one line naming the file and the problem."""

    def __init__(self, message: str):
        super().__init__(str(message).translate(LINE_BREAKS))


# safetensors dtype tag -> bytes per element
_ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
_ST_NAME = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
            "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
            "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
            "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
            "F64": "float64", "C64": "complex64"}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the header size (bytes)
_USIZE = 2**64  # header numbers are unsigned 64-bit integers in the format
_MAX_JSON = 100_000_000  # config.json / index files larger than this are refused unread

SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class TensorInfo:
    """One stored tensor (metadata only)."""

    name: str  # as stored
    key: str  # prefix-normalized name used to align checkpoints
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    file: str  # weight file that holds it
    layer: int | None
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Checkpoint:
    """A resolved checkpoint: its files, config, architecture and tensor metadata.

    Tensors are read lazily with :meth:`tensor` / :meth:`iter_tensors` (memory-mapped).
    """

    ref: str  # what the user gave
    path: Path  # resolved directory or file
    source: str  # "hf-dir" | "safetensors" | "torch" (+ " (hub)" when resolved from the hub)
    files: list[Path]  # weight files
    config: dict | None  # raw config.json
    arch: Architecture
    tensors: dict[str, TensorInfo]  # by stored name, in file order
    _handles: dict = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        return self.path.name or str(self.path)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def dtype_counts(self) -> dict[str, int]:
        """Element count per stored dtype."""
        c: Counter = Counter()
        for t in self.tensors.values():
            c[t.dtype] += t.numel
        return dict(c)

    def identity(self) -> tuple:
        """What changes when the checkpoint's files change (for caches)."""
        files = list(self.files)
        if (self.path / "config.json").is_file():
            files.append(self.path / "config.json")
        return (str(self.path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))

    def tensor(self, name: str):
        """Reads one tensor (memory-mapped file, one tensor materialized).

        Args:
            name (str): the stored name (a key of ``tensors``).
        Returns:
            torch.Tensor in its stored dtype.
        """
        info = self.tensors[name]
        try:
            handle = self._handle(info.file)
            if isinstance(handle, dict):
                return handle[name]
            return handle.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # a file changed or damaged since it was opened
            raise CheckpointError(f"{info.file}: cannot read tensor {quoted(name)}: {one_line(e)}") from None

    def iter_tensors(self, names=None) -> Iterator[tuple[str, object]]:
        """Yields (stored name, tensor) one at a time, grouped by file."""
        for n in (names if names is not None else self.tensors):
            yield n, self.tensor(n)

    def close(self) -> None:
        self._handles.clear()

    def _handle(self, file: str):
        h = self._handles.get(file)
        if h is None:
            if file.endswith(".safetensors"):
                from safetensors import safe_open

                h = safe_open(file, framework="pt")
            else:
                h = _torch_load(Path(file))
            self._handles[file] = h
        return h


# ---------------------------------------------------------------------------- opening

def open_checkpoint(ref: str | os.PathLike, *, revision: str | None = None,
                    trust_remote_code: bool = False, local_only: bool = False) -> Checkpoint:
    """Resolves a reference and reads its metadata (no tensor data is read).

    Args:
        ref (str or PathLike): local HF directory, ``.safetensors`` file, ``.bin``/``.pt``
            state dict, or hub id (``org/name``).
        revision (str, optional): hub revision. Default: None (the cache's ``main``).
        trust_remote_code (bool): allow a config that needs remote code. Default: False.
        local_only (bool): a hub id is read from the local cache only, never downloaded
            (:class:`HubNotCachedError` when it is not there). Default: False.
    Returns:
        Checkpoint
    Raises:
        CheckpointError: one line naming the file and the problem.
    """
    ref_s = str(ref)
    try:
        return _open(ref_s, revision, trust_remote_code, local_only)
    except OSError as e:  # anything the specific checks did not foresee, still one line
        raise CheckpointError(f"{e.filename or ref_s}: cannot read: {_os_reason(e)}") from None


def _open(ref_s: str, revision: str | None, trust_remote_code: bool, local_only: bool = False) -> Checkpoint:
    path = Path(ref_s).expanduser()
    source_suffix = ""
    st = _stat(path)
    if st is None:
        if _looks_like_hub_id(ref_s):
            path = resolve_hub_id(ref_s, revision=revision, local_only=local_only)
            source_suffix = " (hub)"
            st = _stat(path)
        if st is None:
            raise CheckpointError(f"{ref_s}: no such file or directory")
    if stat.S_ISDIR(st.st_mode):
        ck = _open_dir(ref_s, path, trust_remote_code)
    elif not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end: refused unopened
        raise CheckpointError(f"{path}: not a regular file: it is {_file_kind(st.st_mode)}")
    elif path.suffix == ".safetensors":
        tensors = _safetensors_tensors(path)
        ck = _make(ref_s, path, "safetensors", [path], None, tensors, trust_remote_code)
    elif path.suffix in (".bin", ".pt", ".pth"):
        ck = _make(ref_s, path, "torch", [path], None, _torch_tensors(path), trust_remote_code)
    else:
        raise CheckpointError(f"{path}: not a checkpoint (expected a model directory, "
                              f".safetensors, .bin or .pt)")
    ck.source += source_suffix
    return ck


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` (links followed), None when nothing is there; a dangling or looping link,
    a path too long or a directory that cannot be searched is a one-line error."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise CheckpointError(f"{path}: broken symbolic link (its target does not exist)") from None
        return None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {_os_reason(e)}") from None
    except ValueError:  # an embedded NUL byte
        raise CheckpointError(f"{str(path)!r}: not a valid path (it holds a NUL byte)") from None


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"))
    return next((what for test, what in kinds if test(mode)), "not a plain file")


def _os_reason(e: OSError) -> str:
    """The OS's words for an error (``Permission denied``), without Python's decoration."""
    if e.errno == errno.ELOOP:
        return "symbolic link loop (Too many levels of symbolic links)"
    return e.strerror or one_line(e) or type(e).__name__


def _open_regular(path: Path):
    """Opens a regular file for reading: returns (binary file, size in bytes).

    Anything else is refused before a byte is read: the type is checked with ``stat`` before
    opening (opening a device can have effects) and again on the descriptor, which is opened
    non-blocking so that a FIFO swapped in meanwhile cannot hang the open.
    """
    st = _stat(path)
    if st is None:
        raise CheckpointError(f"{path}: no such file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file: it is {_file_kind(st.st_mode)}")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {_os_reason(e)}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise CheckpointError(f"{path}: not a regular file: it is {_file_kind(st.st_mode)}")
    return os.fdopen(fd, "rb"), st.st_size


def _read_json_file(path: Path, what: str):
    """A small JSON file (config, index): regular, at most 100 MB, UTF-8, parsed."""
    f, size = _open_regular(path)
    with f:
        if size > _MAX_JSON:
            raise CheckpointError(f"{path}: {size:,} bytes, too large for a {what} (limit {_MAX_JSON:,})")
        try:
            raw = f.read()
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {_os_reason(e)}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        detail = "nested too deeply" if isinstance(e, RecursionError) else one_line(e)
        raise CheckpointError(f"{path}: malformed {what} ({detail})") from None


def fingerprint(ref: str | os.PathLike) -> tuple:
    """A cheap identity of a reference for caches: (path, [(file, size, mtime_ns)]) of the
    path and, for a directory, the files directly in it. Reads no tensor data."""
    p = Path(str(ref)).expanduser()
    try:
        if not p.exists():
            return (str(ref), ())
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        return (str(p.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    except (OSError, ValueError):  # unreadable: open_checkpoint reports why, in one line
        return (str(ref), ())


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith(".") and not ref.endswith(
        (".safetensors", ".bin", ".pt", ".pth", ".json"))


def is_hub_id(ref) -> bool:
    """True when ``ref`` would be looked up on the hub: it names nothing on the local disk and has
    a hub id's form (``org/name``)."""
    ref_s = str(ref)
    try:
        if os.path.lexists(Path(ref_s).expanduser()):
            return False
    except (OSError, ValueError):
        return False
    return _looks_like_hub_id(ref_s)


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]  # config, tokenizer and weights only


class HubNotCachedError(CheckpointError):
    """A hub id that is not in the local cache, where only the cache may be read (the app's links and picker)."""


def cached_hub_id(repo_id: str, *, revision: str | None = None) -> Path | None:
    """The local HF cache's snapshot of a hub model, or None when it is not (completely) cached.
    Reads the cache only: no network, no token.

    Raises:
        CheckpointError: an id that is not a valid hub id, or a cache that cannot be read (a
        damaged cache is not reported as a missing entry).
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS,
                                      local_files_only=True))
    except LocalEntryNotFoundError:
        return None  # not in the cache (or cached only in part)
    except HFValidationError as e:
        raise CheckpointError(f"{repo_id}: not a valid hub id: {one_line(e)}") from None
    except OSError as e:  # the cache is there but unreadable (permissions, a damaged entry)
        where = getattr(e, "filename", None) or constants.HF_HUB_CACHE
        raise CheckpointError(f"{repo_id}: cannot read the local hub cache ({where}): {_os_reason(e)}") from None


def download_hub_id(repo_id: str, *, revision: str | None = None) -> Path:
    """Downloads a hub model's config, tokenizer and weight files into the local HF cache (what
    the app does only when the user clicks its download button). Raises CheckpointError."""
    from huggingface_hub import constants, snapshot_download

    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{repo_id}: hub id not in the local cache ({constants.HF_HUB_CACHE}) "
                              f"and HF_HUB_OFFLINE is set")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as e:
        raise CheckpointError(f"{repo_id}: hub id not in the local cache ({constants.HF_HUB_CACHE}) "
                              f"and the hub cannot be reached: {one_line(e)}") from None


def resolve_hub_id(repo_id: str, *, revision: str | None = None, local_only: bool = False) -> Path:
    """Finds a hub model in the local HF cache, downloading only when online.

    Only config, tokenizer and weight files are fetched. Raises CheckpointError when the
    id is neither cached nor reachable, and when the cache cannot be read (saying why: a
    damaged cache is not reported as a missing entry).

    Args:
        local_only (bool): read the cache only; an id not cached is a :class:`HubNotCachedError`
            (the network and the token file are never touched). Default: False.
    """
    from huggingface_hub import constants

    path = cached_hub_id(repo_id, revision=revision)
    if path is not None:
        return path
    if local_only:
        raise HubNotCachedError(f"{repo_id}: hub id not in the local cache ({constants.HF_HUB_CACHE})")
    return download_hub_id(repo_id, revision=revision)


def _open_dir(ref: str, d: Path, trust_remote_code: bool) -> Checkpoint:
    try:
        entries = list(d.iterdir())
    except OSError as e:
        raise CheckpointError(f"{d}: cannot list the directory: {_os_reason(e)}") from None
    if not entries:
        raise CheckpointError(f"{d}: empty directory, not a checkpoint")
    config = _read_config(d)
    # A name that is there but not a regular file (a directory called model.safetensors, a FIFO,
    # a broken link) is refused by the reader with its reason, never skipped for another file.
    if os.path.lexists(d / SAFE_INDEX):
        files, tensors = _sharded(d, d / SAFE_INDEX, _safetensors_tensors)
    elif os.path.lexists(d / "model.safetensors"):
        files, tensors = [d / "model.safetensors"], _safetensors_tensors(d / "model.safetensors")
    elif os.path.lexists(d / BIN_INDEX):
        files, tensors = _sharded(d, d / BIN_INDEX, _torch_tensors)
    elif os.path.lexists(d / "pytorch_model.bin"):
        files, tensors = [d / "pytorch_model.bin"], _torch_tensors(d / "pytorch_model.bin")
    else:
        shards = sorted(d.glob("*.safetensors"))
        if not shards:
            what = "has config.json but no weights" if config is not None else "holds no checkpoint"
            raise CheckpointError(f"{d}: {what} (expected model.safetensors, sharded safetensors "
                                  f"with {SAFE_INDEX}, or pytorch_model.bin)")
        files, tensors = shards, {}
        for s in shards:
            _merge_shard(tensors, _safetensors_tensors(s), s)
    return _make(ref, d, "hf-dir", files, config, tensors, trust_remote_code)


def _merge_shard(tensors: dict, shard_tensors: dict, shard: Path) -> None:
    """Adds one shard's tensors; a name held by two shards would make one of them unreachable."""
    for name, info in shard_tensors.items():
        if name in tensors:
            raise CheckpointError(f"{shard}: tensor {quoted(name)} is also in {Path(tensors[name][2]).name} "
                                  f"(each tensor must be in exactly one shard)")
        tensors[name] = info


def _make(ref, path, source, files, config, raw: dict[str, tuple], trust_remote_code) -> Checkpoint:
    """Builds the Checkpoint once names are known: config -> architecture -> roles."""
    cfg_obj = _config_view(path, config, trust_remote_code) if config is not None else None
    try:
        arch = architecture_from_config(cfg_obj, names=raw.keys())
    except ValueError as e:  # a size field that is not a positive integer
        raise CheckpointError(f"{path / 'config.json'}: invalid config ({one_line(e)})") from None
    if config is not None and "quantization_config" not in config:  # quantized weights are stored packed
        problem = config_mismatch(arch, ((name, shape) for name, (shape, _, _) in raw.items()))
        if problem:
            raise CheckpointError(f"{path / 'config.json'}: does not match the weights: {problem}")
    tensors = {}
    for name, (shape, dtype, file) in raw.items():
        role = tensor_role(name, arch.family)
        tensors[name] = TensorInfo(name, normalize_name(name), tuple(shape), dtype, str(file),
                                   role.layer, role.kind)
    if not tensors:
        raise CheckpointError(f"{path}: the checkpoint holds no tensors")
    ordered = dict(sorted(tensors.items(), key=lambda kv: _model_order(kv[1])))
    return Checkpoint(ref, path, source, list(files), config, arch, ordered)


def _model_order(t: TensorInfo) -> tuple:
    """Embeddings, then blocks in layer order, then final norm and heads (files store A-Z)."""
    section = 1 if t.layer is not None else (0 if t.kind in ("embed", "pos_embed", "type_embed",
                                                              "embed_norm") else 2)
    return section, t.layer or 0, KINDS.index(t.kind), t.key


def _read_config(d: Path) -> dict | None:
    p = d / "config.json"
    if not os.path.lexists(p):
        return None
    cfg = _read_json_file(p, "config.json")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: malformed config.json (top level is {type(cfg).__name__}, not an object)")
    return cfg


# the fields architecture_from_config reads from a transformers config (aliases included), and the
# version of a cache entry's layout; both are part of the entry's key
_CONFIG_CACHE_VERSION = 1
_ARCH_FIELDS = ("model_type", "hidden_size", "n_embd", "d_model", "num_attention_heads", "n_head",
                "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "ffn_dim", "num_hidden_layers",
                "n_layer", "vocab_size", "tie_word_embeddings", "dtype")


def _config_view(path: Path, cfg: dict, trust_remote_code: bool):
    """The architecture fields of :func:`_config_object`'s answer, remembered on disk by the
    config's content, the transformers version and ``trust_remote_code``: importing transformers
    for its config classes costs ~2 s, so a command that reads only headers (a diff, inspect)
    answers without it once a config of the same content was read. A config transformers refuses
    is never remembered (the error comes again); an unreadable or damaged cache entry is ignored."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    from analysis.paths import subnetscope_home

    try:
        tv = version("transformers")
    except PackageNotFoundError:
        tv = "none"
    try:
        text = json.dumps(cfg, sort_keys=True, allow_nan=True, default=str)
    except (TypeError, ValueError):
        return _config_object(path, cfg, trust_remote_code)
    layout = f"{_CONFIG_CACHE_VERSION}:{','.join(_ARCH_FIELDS)}"  # a new field makes old entries miss
    key = hashlib.sha256(f"{layout}\0{tv}\0{int(bool(trust_remote_code))}\0{text}".encode()).hexdigest()
    entry = subnetscope_home() / "cache" / "configs" / f"{key}.json"
    try:
        saved = json.loads(entry.read_text(encoding="utf-8"))
        if isinstance(saved, dict) and saved.get("key") == key and isinstance(saved.get("fields"), dict):
            return None if saved["fields"].get("__none__") else _PlainConfig(saved["fields"])
    except (OSError, ValueError):
        pass
    obj = _config_object(path, cfg, trust_remote_code)
    fields = {"__none__": True} if obj is None else {f: _plain_value(getattr(obj, f, None)) for f in _ARCH_FIELDS}
    if obj is not None and "torch_dtype" in vars(obj):
        fields["torch_dtype"] = _plain_value(vars(obj)["torch_dtype"])
    try:
        from analysis.io import write_json_atomic

        write_json_atomic(entry, {"key": key, "fields": fields})
    except (OSError, SubnetscopeError):
        pass  # a read-only or full home: the next command imports transformers again, nothing else
    return obj


def _plain_value(v):
    return v if v is None or isinstance(v, (bool, int, float, str)) else str(v)


def _config_object(path: Path, cfg: dict, trust_remote_code: bool):
    """A transformers config (for its defaults and aliases), or None for unknown model types."""
    from transformers import CONFIG_MAPPING

    where = path / "config.json"
    if not isinstance(cfg.get("model_type", ""), str):
        raise CheckpointError(f"{where}: invalid config (model_type is {quoted(cfg['model_type'])}, not a string)")
    if cfg.get("auto_map") and not trust_remote_code and cfg.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"{where}: this model needs remote code (auto_map); "
                              f"pass trust_remote_code only if you trust its author")
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None if model_type is None else _PlainConfig(cfg)
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(cfg))
    except Exception as e:
        raise CheckpointError(f"{where}: invalid {model_type} config ({one_line(e)})") from None


class _PlainConfig:
    """Attribute view of a config.json whose model_type transformers does not know."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def _sharded(d: Path, index: Path, reader):
    """Reads an index's shards. The index must map every name to the shard that holds it."""
    doc = _read_json_file(index, "index")
    if not isinstance(doc, dict):
        raise CheckpointError(f"{index}: malformed index (top level is a {type(doc).__name__}, not an object)")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        got = "no weight_map" if weight_map is None else f"weight_map is a {type(weight_map).__name__}"
        raise CheckpointError(f"{index}: malformed index ({got}; expected an object of tensor name -> shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: malformed index (weight_map[{quoted(name)}] is {quoted(shard)}, "
                                  f"not a shard file name)")
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(f"{index}: malformed index (shard {quoted(shard)} for {quoted(name)} points "
                                  f"outside the checkpoint directory)")
    files, tensors = [], {}
    for p in dict.fromkeys(d / shard for shard in weight_map.values()):
        if not os.path.lexists(p):
            raise CheckpointError(f"{p}: shard listed in {index.name} is missing")
        files.append(p)
        _merge_shard(tensors, reader(p), p)
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} tensor(s) listed in the index are not in their "
                              f"shard (first: {quoted(absent[0])} in {weight_map[absent[0]]})")
    return files, tensors


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Parses and fully validates a safetensors header without reading tensor data.

    The one place where a safetensors file is checked (checkpoints and masks), with the
    format's own rules, so that a file accepted here is one ``safe_open`` reads and every
    number in its header is consistent with the file before anything is sized from it:

    - a regular file (never a FIFO or device), at least 8 bytes; header length ≤ 100,000,000
      bytes and within the file;
    - the header is UTF-8 JSON starting with ``{``, padded after the object with spaces only;
      no duplicate keys, no NaN/Infinity, no lone surrogates (``"\\udc80"``);
    - ``__metadata__`` (optional, may be null) maps strings to strings;
    - every tensor entry is an object with exactly ``dtype`` (a known tag), ``shape`` (a list
      of integers in [0, 2⁶⁴)) and ``data_offsets`` (two integers, begin ≤ end), whose byte
      count is numel × itemsize without overflow (an empty tensor may not claim a dimension
      larger than the file either);
    - sorted by offsets, the tensors tile the data section exactly: the first starts at 0,
      each starts where the previous ends, and the last ends at the end of the file.

    Where ``safe_open`` is more lenient than the format's description (a name given twice,
    extra fields in an entry, whitespace other than trailing spaces around the JSON), the
    file is refused: a header open to two readings is not read. Written here rather than
    relying on ``safe_open`` because its errors (``InvalidOffset``, ``MetadataIncompleteBuffer``
    ...) say neither which file nor what is wrong.

    Args:
        path (Path): a ``.safetensors`` file.
    Returns:
        (tensors, metadata): ``{name: {"dtype", "shape", "data_offsets"}}`` in header order,
        and the ``__metadata__`` strings (``{}`` when absent).
    Raises:
        CheckpointError: one line naming the file and the first problem found.
    """
    f, size = _open_regular(path)
    with f:
        if size < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its "
                                  f"8-byte header length)")
        try:
            n = int.from_bytes(f.read(8), "little")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} exceeds "
                                      f"the format's limit of {_MAX_HEADER:,} bytes)")
            if n > size - 8:
                raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} "
                                      f"exceeds the file's {size} bytes): truncated or not safetensors")
            raw = f.read(n)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {_os_reason(e)}") from None
    if len(raw) != n:
        raise CheckpointError(f"{path}: truncated while reading its header ({len(raw)} of {n} bytes)")
    header = _parse_header(path, raw)
    meta = header.pop("__metadata__", None)
    if meta is None:
        meta = {}
    elif not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        bad = meta if not isinstance(meta, dict) else next(v for v in meta.values() if not isinstance(v, str))
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must map strings to "
                              f"strings (found {type(bad).__name__} {quoted(bad)})")
    spans = sorted((_check_entry(path, name, t, size), name) for name, t in header.items())
    end = 0
    for (b, e), name in spans:
        if b != end:
            what = ("overlaps the previous tensor's data" if b < end else
                    f"leaves {b - end} bytes unused before it")
            after = "the previous tensor's data ends at" if end else "the data section starts at"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {quoted(name)} starts at byte {b} "
                                  f"but {after} {end} ({what})")
        end = e
    data_len = size - 8 - n
    if end > data_len:
        raise CheckpointError(f"{path}: truncated: the header declares {end} bytes of tensor data "
                              f"but the file holds {data_len}")
    if end < data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_len - end} bytes after the "
                              f"last tensor's data (the header covers {end} of {data_len})")
    return header, meta


def _parse_header(path: Path, raw: bytes) -> dict:
    """The header bytes as a dict, held to the format's JSON rules (see read_safetensors_header)."""
    bad = f"{path}: not a valid safetensors file"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{bad} (header is not UTF-8: byte {e.start})") from None
    if not text.startswith("{"):
        raise CheckpointError(f"{bad} (header does not start with '{{': {quoted(text[:20])})")
    try:
        header, stop = _HEADER_JSON.raw_decode(text)
    except RecursionError:
        raise CheckpointError(f"{bad} (header is not JSON: nested too deeply)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{bad} (header is not JSON: {e.msg} at character {e.pos})") from None
    except ValueError as e:  # raised by the hooks below, or an integer too long to convert
        raise CheckpointError(f"{bad} (header: {one_line(e)})") from None
    rest = text[stop:]
    if rest.strip(" "):
        kind = "NUL bytes" if not rest.strip(" \0") else quoted(rest.strip(" ")[:20])
        raise CheckpointError(f"{bad} (header has {kind} after its JSON object; the format pads "
                              f"the header with spaces only)")
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (header is not a JSON object)")
    return header


def _strict_pairs(pairs: list) -> dict:
    """json object hook: no duplicate keys, no lone surrogates (serde_json refuses them too)."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError(f"duplicate key {quoted(k)}")
        for x in (k, v):
            if isinstance(x, str) and not _is_utf8(x):
                raise ValueError(f"lone surrogate in the string {quoted(x)}")
        d[k] = v
    return d


def _is_utf8(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


# serde_json reads "-0" as a float, which the format's integers refuse; Python would read 0
_HEADER_JSON = json.JSONDecoder(object_pairs_hook=_strict_pairs, parse_constant=_no_constant,
                                parse_int=lambda s: -0.0 if s == "-0" else int(s))
_ENTRY_FIELDS = ("data_offsets", "dtype", "shape")


def _check_entry(path: Path, name: str, t, file_size: int) -> tuple[int, int]:
    """Checks one tensor entry of a header; returns its (begin, end) data offsets."""
    where = f"{path}: corrupt safetensors header entry for {quoted(name)}"
    if not isinstance(t, dict):
        raise CheckpointError(f"{where}: a {type(t).__name__}, not an object")
    if sorted(t) != list(_ENTRY_FIELDS):
        missing = [k for k in _ENTRY_FIELDS if k not in t]
        extra = [k for k in t if k not in _ENTRY_FIELDS]
        problem = f"no {missing[0]!r}" if missing else f"unexpected field {quoted(extra[0])}"
        raise CheckpointError(f"{where}: {problem} (expected exactly dtype, shape, data_offsets)")
    dtype, shape, offsets = t["dtype"], t["shape"], t["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_ITEMSIZE:
        raise CheckpointError(f"{where}: unsupported dtype {quoted(dtype)} (expected one of {', '.join(_ST_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise CheckpointError(f"{where}: shape {quoted(shape)} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise CheckpointError(f"{where}: data_offsets {quoted(offsets)} is not two non-negative integers")
    b, e = offsets
    if e < b:
        raise CheckpointError(f"{where}: data_offsets [{b}, {e}] end before they begin")
    numel = 1
    for d in shape:  # left to right like the format's checked multiplication: no bignum blow-up
        numel *= d
        if numel >= _USIZE:
            raise CheckpointError(f"{where}: shape {quoted(shape)} overflows 64 bits")
    need = numel * _ST_ITEMSIZE[dtype]
    if need >= _USIZE:
        raise CheckpointError(f"{where}: shape {quoted(shape)} {dtype} overflows 64 bits")
    if e - b != need:
        raise CheckpointError(f"{path}: corrupt safetensors header: {quoted(name)} declares {e - b} bytes "
                              f"for shape {shape} {dtype} ({need} expected)")
    if numel == 0 and shape and max(shape) > file_size:  # per-row arrays are sized from dimensions
        raise CheckpointError(f"{where}: dimension {max(shape)} of an empty tensor exceeds the file's "
                              f"{file_size} bytes")
    return b, e


def _is_u64(x) -> bool:
    return type(x) is int and 0 <= x < _USIZE


def _safetensors_tensors(path: Path) -> dict[str, tuple]:
    header, _ = read_safetensors_header(path)
    return {name: (tuple(t["shape"]), _ST_NAME[t["dtype"]], str(path)) for name, t in header.items()}


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive.

    weights_only refuses any pickled object other than tensors and plain containers, so a
    payload that would run code is rejected before anything executes. The file is first
    opened here (a regular file only, non-blocking), so that a FIFO or an unreadable file is
    a one-line error rather than a hang or a traceback from inside torch.
    """
    import pickle

    import torch

    f, _ = _open_regular(path)
    with f:
        try:
            is_zip = f.read(4) == b"PK\x03\x04"  # the test torch.load itself applies
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read: {_os_reason(e)}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        refused = next((ln for ln in lines if "GLOBAL" in ln), None)
        if refused is not None:  # a real pickle naming a callable: never run
            what = refused.split("WeightsUnpickler error:")[-1].split(". Please")[0]
            raise CheckpointError(f"{path}: refused to unpickle: the file holds objects other than "
                                  f"tensors (torch.load weights_only=True): {one_line(what)}") from None
        problem = next((ln for ln in lines if ln.startswith("Unsupported")), lines[-1] if lines else "")
        raise CheckpointError(f"{path}: not a readable PyTorch state dict (not a pickle torch reads: "
                              f"{one_line(problem)})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {_os_reason(e)}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({one_line(e)})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors)")
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise CheckpointError(f"{path}: not a state dict (key {quoted(bad[0])} is a {type(bad[0]).__name__}, "
                              f"not a name)")
    return obj


def _torch_tensors(path: Path) -> dict[str, tuple]:
    sd = _torch_load(path)
    return {n: (tuple(t.shape), str(t.dtype).replace("torch.", ""), str(path)) for n, t in sd.items()}


# ---------------------------------------------------------------------------- alignment

@dataclass(frozen=True)
class AlignedTensor:
    """One tensor present in every checkpoint of an alignment."""

    key: str  # normalized name
    names: tuple[str, ...]  # stored name in each checkpoint
    shapes: tuple[tuple[int, ...], ...]  # shape in each checkpoint
    compare_shape: tuple[int, ...]  # shape compared (shared rows when the vocabulary was resized)
    layer: int | None
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.compare_shape)

    @property
    def resized(self) -> bool:
        return any(s != self.compare_shape for s in self.shapes)


@dataclass
class Alignment:
    """How the tensors of two or more checkpoints pair up. Nothing is dropped silently:
    every tensor not in ``tensors`` is in ``missing`` or ``mismatched`` with its reason."""

    refs: list[str]
    tensors: list[AlignedTensor]
    missing: list[dict]  # {key, present_in: [i], missing_in: [i]}
    mismatched: list[dict]  # {key, shapes: [...], reason}
    resized: list[dict]  # {key, shapes, compared_rows}

    @property
    def compared_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    def to_dict(self) -> dict:
        return {
            "refs": self.refs,
            "aligned": len(self.tensors),
            "compared_params": self.compared_params,
            "missing": self.missing,
            "shape_mismatches": self.mismatched,
            "resized": self.resized,
            "tensors": [{"key": t.key, "names": list(t.names), "shapes": [list(s) for s in t.shapes],
                         "compare_shape": list(t.compare_shape), "layer": t.layer, "kind": t.kind}
                        for t in self.tensors],
        }


_VOCAB_KINDS = ("embed", "lm_head")


def align(checkpoints: list[Checkpoint]) -> Alignment:
    """Pairs the tensors of two or more checkpoints by prefix-normalized name.

    A vocabulary resized between checkpoints (embedding / lm_head rows differ, the rest
    equal) is compared on the shared rows and reported in ``resized``.

    Args:
        checkpoints (list of Checkpoint): the first is the reference (the base).
    Returns:
        Alignment
    Raises:
        CheckpointError: fewer than two checkpoints, or different architectures.
    """
    if len(checkpoints) < 2:
        raise CheckpointError("align needs at least two checkpoints")
    _check_same_architecture(checkpoints)
    keyed = [_by_key(ck) for ck in checkpoints]
    order = list(dict.fromkeys(k for m in keyed for k in m))
    tensors, missing, mismatched, resized = [], [], [], []
    for key in order:
        present = [i for i, m in enumerate(keyed) if key in m]
        if len(present) < len(keyed):
            missing.append({"key": key, "present_in": present,
                            "missing_in": [i for i in range(len(keyed)) if i not in present]})
            continue
        infos = [m[key] for m in keyed]
        shapes = tuple(t.shape for t in infos)
        compare = shapes[0]
        if len(set(shapes)) > 1:
            same_tail = len({s[1:] for s in shapes}) == 1 and len({len(s) for s in shapes}) == 1
            if infos[0].kind in _VOCAB_KINDS and same_tail:
                compare = (min(s[0] for s in shapes),) + shapes[0][1:]
                resized.append({"key": key, "shapes": [list(s) for s in shapes], "compared_rows": compare[0]})
            else:
                mismatched.append({"key": key, "shapes": [list(s) for s in shapes],
                                   "reason": "shape differs between checkpoints"})
                continue
        tensors.append(AlignedTensor(key, tuple(t.name for t in infos), shapes, compare,
                                     infos[0].layer, infos[0].kind))
    if not tensors:
        raise CheckpointError(f"{checkpoints[1].path}: no tensor names in common with {checkpoints[0].path}")
    return Alignment([c.ref for c in checkpoints], tensors, missing, mismatched, resized)


def _by_key(ck: Checkpoint) -> dict[str, TensorInfo]:
    """Tensors by prefix-normalized name; two stored names on one key would lose one of them."""
    keyed: dict[str, TensorInfo] = {}
    for t in ck.tensors.values():
        if t.key in keyed:
            raise CheckpointError(f"{ck.path}: tensors {quoted(keyed[t.key].name)} and {quoted(t.name)} are the same "
                                  f"tensor once wrapper prefixes are removed ({quoted(t.key)}); cannot align them")
        keyed[t.key] = t
    return keyed


def _check_same_architecture(checkpoints: list[Checkpoint]) -> None:
    a = checkpoints[0]
    for b in checkpoints[1:]:
        if a.arch.family and b.arch.family and a.arch.family != b.arch.family:
            raise CheckpointError(f"{b.path}: different architecture from {a.path} "
                                  f"({b.arch.model_type or b.arch.family} vs {a.arch.model_type or a.arch.family})")
        if a.config is not None and b.config is not None:
            diff = [f for f, x, y in zip(("family", "num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                          "head_dim", "intermediate_size"),
                                         a.arch.signature(), b.arch.signature()) if x != y]
            if diff:
                fields = ", ".join(f"{f} {getattr(b.arch, f)} vs {getattr(a.arch, f)}" for f in diff)
                raise CheckpointError(f"{b.path}: different architecture from {a.path} ({fields})")


def summarize(ck: Checkpoint) -> dict:
    """JSON-ready summary of one checkpoint: architecture, exact counts, files, tensors.

    Returns:
        dict with ``total_params`` (exact element count over all stored tensors),
        ``tensors`` ([{name, shape, dtype, numel, layer, kind}]), the architecture fields,
        ``dtypes`` (elements per dtype), ``params_by_kind``, ``params_by_layer``,
        ``files`` ([{file, bytes}]) and ``size_bytes``.
    """
    by_kind: Counter = Counter()
    by_layer: Counter = Counter()
    for t in ck.tensors.values():
        by_kind[t.kind] += t.numel
        by_layer["none" if t.layer is None else t.layer] += t.numel
    layers = sorted(k for k in by_layer if k != "none")
    return {
        "ref": ck.ref,
        "path": str(ck.path),
        "source": ck.source,
        **ck.arch.to_dict(),
        "total_params": ck.total_params,
        "dtypes": ck.dtype_counts(),
        "size_bytes": ck.size_bytes,
        "files": [{"file": str(f), "bytes": f.stat().st_size} for f in ck.files],
        "params_by_kind": {k: by_kind[k] for k in KINDS if k in by_kind},
        "params_by_layer": [{"layer": k, "params": by_layer[k]} for k in layers]
        + ([{"layer": None, "params": by_layer["none"]}] if "none" in by_layer else []),
        "tensors": [{"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "numel": t.numel,
                     "layer": t.layer, "kind": t.kind} for t in ck.tensors.values()],
    }


def iter_aligned(alignment: Alignment, checkpoints: list[Checkpoint]) -> Iterator[tuple[AlignedTensor, list]]:
    """Streams aligned tensors: yields (AlignedTensor, [tensor per checkpoint]) one key at a
    time; resized tensors are cut to their shared rows."""
    for t in alignment.tensors:
        values = [ck.tensor(n) for ck, n in zip(checkpoints, t.names)]
        if t.resized:
            values = [v[: t.compare_shape[0]] for v in values]
        yield t, values
