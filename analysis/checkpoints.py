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

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from analysis.errors import SubnetscopeError
from analysis.structure import KINDS, Architecture, architecture_from_config, normalize_name, tensor_role


class CheckpointError(SubnetscopeError):
    """A checkpoint cannot be used; the message is one line naming the file and the problem."""


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
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit on the header size

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
        handle = self._handle(info.file)
        try:
            if isinstance(handle, dict):
                return handle[name]
            return handle.get_tensor(name)
        except Exception as e:  # a file changed or damaged since it was opened
            raise CheckpointError(f"{info.file}: cannot read tensor {name}: {_one_line(e)}") from None

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
                    trust_remote_code: bool = False) -> Checkpoint:
    """Resolves a reference and reads its metadata (no tensor data is read).

    Args:
        ref (str or PathLike): local HF directory, ``.safetensors`` file, ``.bin``/``.pt``
            state dict, or hub id (``org/name``).
        revision (str, optional): hub revision. Default: None (the cache's ``main``).
        trust_remote_code (bool): allow a config that needs remote code. Default: False.
    Returns:
        Checkpoint
    Raises:
        CheckpointError: one line naming the file and the problem.
    """
    ref_s = str(ref)
    path = Path(ref_s).expanduser()
    source_suffix = ""
    if not path.exists():
        if _looks_like_hub_id(ref_s):
            path = resolve_hub_id(ref_s, revision=revision)
            source_suffix = " (hub)"
        else:
            raise CheckpointError(f"{ref_s}: no such file or directory")
    if path.is_dir():
        ck = _open_dir(ref_s, path, trust_remote_code)
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


def fingerprint(ref: str | os.PathLike) -> tuple:
    """A cheap identity of a reference for caches: (path, [(file, size, mtime_ns)]) of the
    path and, for a directory, the files directly in it. Reads no tensor data."""
    p = Path(str(ref)).expanduser()
    if not p.exists():
        return (str(ref), ())
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    return (str(p.resolve()), tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def _looks_like_hub_id(ref: str) -> bool:
    return bool(_HUB_ID.match(ref)) and not ref.startswith(".") and not ref.endswith(
        (".safetensors", ".bin", ".pt", ".pth", ".json"))


def resolve_hub_id(repo_id: str, *, revision: str | None = None) -> Path:
    """Finds a hub model in the local HF cache, downloading only when online.

    Only config, tokenizer and weight files are fetched. Raises CheckpointError when the
    id is neither cached nor reachable.
    """
    from huggingface_hub import constants, snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=True))
    except Exception:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(f"{repo_id}: hub id not in the local cache ({constants.HF_HUB_CACHE}) "
                              f"and HF_HUB_OFFLINE is set") from None
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise CheckpointError(f"{repo_id}: hub id not in the local cache ({constants.HF_HUB_CACHE}) "
                              f"and the hub cannot be reached: {_one_line(e)}") from None


def _open_dir(ref: str, d: Path, trust_remote_code: bool) -> Checkpoint:
    entries = list(d.iterdir())
    if not entries:
        raise CheckpointError(f"{d}: empty directory, not a checkpoint")
    config = _read_config(d)
    if (d / SAFE_INDEX).is_file():
        files, tensors = _sharded(d, d / SAFE_INDEX, _safetensors_tensors)
    elif (d / "model.safetensors").is_file():
        files, tensors = [d / "model.safetensors"], _safetensors_tensors(d / "model.safetensors")
    elif (d / BIN_INDEX).is_file():
        files, tensors = _sharded(d, d / BIN_INDEX, _torch_tensors)
    elif (d / "pytorch_model.bin").is_file():
        files, tensors = [d / "pytorch_model.bin"], _torch_tensors(d / "pytorch_model.bin")
    else:
        shards = sorted(d.glob("*.safetensors"))
        if not shards:
            what = "has config.json but no weights" if config is not None else "holds no checkpoint"
            raise CheckpointError(f"{d}: {what} (expected model.safetensors, sharded safetensors "
                                  f"with {SAFE_INDEX}, or pytorch_model.bin)")
        files, tensors = shards, {}
        for s in shards:
            tensors.update(_safetensors_tensors(s))
    return _make(ref, d, "hf-dir", files, config, tensors, trust_remote_code)


def _make(ref, path, source, files, config, raw: dict[str, tuple], trust_remote_code) -> Checkpoint:
    """Builds the Checkpoint once names are known: config -> architecture -> roles."""
    cfg_obj = _config_object(path, config, trust_remote_code) if config is not None else None
    arch = architecture_from_config(cfg_obj, names=raw.keys())
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
    if not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: malformed config.json ({_one_line(e)})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{p}: malformed config.json (top level is {type(cfg).__name__}, not an object)")
    return cfg


def _config_object(path: Path, cfg: dict, trust_remote_code: bool):
    """A transformers config (for its defaults and aliases), or None for unknown model types."""
    from transformers import CONFIG_MAPPING

    where = path / "config.json"
    if cfg.get("auto_map") and not trust_remote_code and cfg.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(f"{where}: this model needs remote code (auto_map); "
                              f"pass trust_remote_code only if you trust its author")
    model_type = cfg.get("model_type")
    if model_type not in CONFIG_MAPPING:
        return None if model_type is None else _PlainConfig(cfg)
    try:
        return CONFIG_MAPPING[model_type].from_dict(dict(cfg))
    except Exception as e:
        raise CheckpointError(f"{where}: invalid {model_type} config ({_one_line(e)})") from None


class _PlainConfig:
    """Attribute view of a config.json whose model_type transformers does not know."""

    def __init__(self, d: dict):
        self.__dict__.update(d)


def _sharded(d: Path, index: Path, reader):
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        assert isinstance(weight_map, dict)
    except Exception as e:
        raise CheckpointError(f"{index}: malformed index ({_one_line(e) or 'no weight_map'})") from None
    files, tensors = [], {}
    for shard in dict.fromkeys(weight_map.values()):
        p = d / shard
        if not p.is_file():
            raise CheckpointError(f"{p}: shard listed in {index.name} is missing")
        files.append(p)
        tensors.update(reader(p))
    absent = [n for n in weight_map if n not in tensors]
    if absent:
        raise CheckpointError(f"{index}: {len(absent)} tensor(s) listed in the index are not in their "
                              f"shard (first: {absent[0]} in {weight_map[absent[0]]})")
    return files, tensors


def read_safetensors_header(path: Path) -> tuple[dict, dict]:
    """Parses and validates a safetensors header without reading tensor data.

    Written here rather than using ``safe_open`` alone because safetensors' own errors
    (``MetadataIncompleteBuffer``, ``HeaderTooLarge``) do not say which file or by how much;
    the checks are the format's own (header length, JSON, offsets within the file).

    Returns:
        (tensors, metadata): ``{name: {"dtype", "shape", "data_offsets"}}`` and ``__metadata__``.
    """
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, shorter than its 8-byte header length)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise CheckpointError(f"{path}: not a valid safetensors file (header length {n} "
                                  f"exceeds the file's {size} bytes): truncated or not safetensors")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except Exception:
        raise CheckpointError(f"{path}: not a valid safetensors file (header is not JSON)") from None
    meta = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    end = 0
    for name, t in header.items():
        try:
            dtype, shape, (b, e) = t["dtype"], [int(s) for s in t["shape"]], t["data_offsets"]
            need = math.prod(shape) * _ST_ITEMSIZE[dtype]
        except Exception:
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if e - b != need or b < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} declares {e - b} bytes "
                                  f"for shape {shape} {dtype} ({need} expected)")
        end = max(end, e)
    if end > data_len:
        raise CheckpointError(f"{path}: truncated: the header declares {end} bytes of tensor data "
                              f"but the file holds {data_len}")
    return header, meta


def _safetensors_tensors(path: Path) -> dict[str, tuple]:
    header, _ = read_safetensors_header(path)
    return {name: (tuple(t["shape"]), _ST_NAME[t["dtype"]], str(path)) for name, t in header.items()}


def _torch_load(path: Path) -> dict:
    """``torch.load(weights_only=True)``, memory-mapped when the file is a zip archive.

    weights_only refuses any pickled object other than tensors and plain containers, so a
    payload that would run code is rejected before anything executes.
    """
    import pickle
    import zipfile

    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        detail = str(e).splitlines()
        hint = next((ln.strip() for ln in detail if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise CheckpointError(f"{path}: refused to unpickle: the file holds objects other than "
                              f"tensors (torch.load weights_only=True){': ' + hint if hint else ''}") from None
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({_one_line(e)})") from None
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a dict of tensors)")
    return obj


def _torch_tensors(path: Path) -> dict[str, tuple]:
    sd = _torch_load(path)
    return {n: (tuple(t.shape), str(t.dtype).replace("torch.", ""), str(path)) for n, t in sd.items()}


def _one_line(e: BaseException) -> str:
    s = " ".join(str(e).split())
    return s[:300] + ("…" if len(s) > 300 else "")


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
    keyed = [{t.key: t for t in ck.tensors.values()} for ck in checkpoints]
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
