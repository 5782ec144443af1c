"""The safetensors header, checked as the format defines it before anything is read or allocated:
the 8-byte length, strict UTF-8 JSON without duplicate keys or constants, every entry's dtype, shape
and data offsets (contiguous, inside the file, no overlap), and the metadata's strings."""

from __future__ import annotations

import json
from pathlib import Path

from analysis.checkpoints.files import CheckpointError, open_regular, os_reason
from analysis.errors import one_line, quoted

# safetensors dtype tag -> bytes per element
ST_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
ST_NAME = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "F8_E5M2": "float8_e5m2",
            "F8_E4M3": "float8_e4m3fn", "F8_E8M0": "float8_e8m0fnu", "I16": "int16",
            "U16": "uint16", "F16": "float16", "BF16": "bfloat16", "I32": "int32",
            "U32": "uint32", "F32": "float32", "I64": "int64", "U64": "uint64",
            "F64": "float64", "C64": "complex64"}
_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the header size (bytes)
_USIZE = 2**64  # header numbers are unsigned 64-bit integers in the format


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
    f, size = open_regular(path)
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
            raise CheckpointError(f"{path}: cannot read: {os_reason(e)}") from None
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
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise CheckpointError(f"{where}: unsupported dtype {quoted(dtype)} (expected one of {', '.join(ST_ITEMSIZE)})")
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
    need = numel * ST_ITEMSIZE[dtype]
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


def safetensors_tensors(path: Path) -> dict[str, tuple]:
    header, _ = read_safetensors_header(path)
    return {name: (tuple(t["shape"]), ST_NAME[t["dtype"]], str(path)) for name, t in header.items()}

