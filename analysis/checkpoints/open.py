"""Opening a checkpoint: resolve the reference (a model directory, single or sharded safetensors,
``pytorch_model.bin``, a single ``.safetensors`` or ``.bin``/``.pt`` file, a hub id from the local
cache first), read its config and tensor metadata, and stream its tensors memory-mapped, one at a
time. No tensor data is read to open it and no remote code runs."""

from __future__ import annotations

import json
import math
import os
import re
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from analysis.checkpoints.files import CheckpointError, file_kind, os_reason, read_json_file, stat_path
from analysis.checkpoints.safetensors_header import safetensors_tensors
from analysis.checkpoints.structure import (KINDS, Architecture, architecture_from_config, config_mismatch,
                                            normalize_name, tensor_role)
from analysis.checkpoints.torch_bin import torch_load, torch_tensors
from analysis.errors import SubnetscopeError, one_line, quoted

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
                h = torch_load(Path(file))
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
        raise CheckpointError(f"{e.filename or ref_s}: cannot read: {os_reason(e)}") from None


def _open(ref_s: str, revision: str | None, trust_remote_code: bool, local_only: bool = False) -> Checkpoint:
    path = Path(ref_s).expanduser()
    source_suffix = ""
    st = stat_path(path)
    if st is None:
        if _looks_like_hub_id(ref_s):
            path = resolve_hub_id(ref_s, revision=revision, local_only=local_only)
            source_suffix = " (hub)"
            st = stat_path(path)
        if st is None:
            raise CheckpointError(f"{ref_s}: no such file or directory")
    if stat.S_ISDIR(st.st_mode):
        ck = _open_dir(ref_s, path, trust_remote_code)
    elif not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end: refused unopened
        raise CheckpointError(f"{path}: not a regular file: it is {file_kind(st.st_mode)}")
    elif path.suffix == ".safetensors":
        tensors = safetensors_tensors(path)
        ck = _make(ref_s, path, "safetensors", [path], None, tensors, trust_remote_code)
    elif path.suffix in (".bin", ".pt", ".pth"):
        ck = _make(ref_s, path, "torch", [path], None, torch_tensors(path), trust_remote_code)
    else:
        raise CheckpointError(f"{path}: not a checkpoint (expected a model directory, "
                              f".safetensors, .bin or .pt)")
    ck.source += source_suffix
    return ck



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
        raise CheckpointError(f"{repo_id}: cannot read the local hub cache ({where}): {os_reason(e)}") from None


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
        raise CheckpointError(f"{d}: cannot list the directory: {os_reason(e)}") from None
    if not entries:
        raise CheckpointError(f"{d}: empty directory, not a checkpoint")
    config = _read_config(d)
    # A name that is there but not a regular file (a directory called model.safetensors, a FIFO,
    # a broken link) is refused by the reader with its reason, never skipped for another file.
    if os.path.lexists(d / SAFE_INDEX):
        files, tensors = _sharded(d, d / SAFE_INDEX, safetensors_tensors)
    elif os.path.lexists(d / "model.safetensors"):
        files, tensors = [d / "model.safetensors"], safetensors_tensors(d / "model.safetensors")
    elif os.path.lexists(d / BIN_INDEX):
        files, tensors = _sharded(d, d / BIN_INDEX, torch_tensors)
    elif os.path.lexists(d / "pytorch_model.bin"):
        files, tensors = [d / "pytorch_model.bin"], torch_tensors(d / "pytorch_model.bin")
    else:
        shards = sorted(d.glob("*.safetensors"))
        if not shards:
            what = "has config.json but no weights" if config is not None else "holds no checkpoint"
            raise CheckpointError(f"{d}: {what} (expected model.safetensors, sharded safetensors "
                                  f"with {SAFE_INDEX}, or pytorch_model.bin)")
        files, tensors = shards, {}
        for s in shards:
            _merge_shard(tensors, safetensors_tensors(s), s)
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
    cfg = read_json_file(p, "config.json")
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
    doc = read_json_file(index, "index")
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
