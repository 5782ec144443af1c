"""Property-based: the readers either read a file exactly as its own library does, or refuse it
with one line naming the file. Never another exception, a hang, or memory sized from a header.

Cases start from valid files (safetensors.torch.save, torch.save, save_mask) and are mutated
structurally (header JSON fields, names, metadata, offsets, lengths, padding) so that most of
them reach the deep checks, plus raw byte flips, truncations and random bytes. Fixed seed.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import struct
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from analysis.checkpoints import open_checkpoint, summarize
from analysis.errors import SubnetscopeError
from analysis.sparsity.masks import FORMAT, load_mask, save_mask

SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))
MAX_RSS_GROWTH = 512 * 2**20  # bytes; a header that sized an allocation would need far more


def _valid_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 3, generator=g),
        "model.layers.0.mlp.up_proj.weight": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "model.norm.weight": torch.ones(3, dtype=torch.float16),
        "model.embed_tokens.weight": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(7, dtype=torch.int32),
        "flags": torch.tensor([True, False, True]),
    }


VALID = save(_valid_tensors(), metadata={"format": "pt", "note": "fuzz"})
_N = struct.unpack("<Q", VALID[:8])[0]
HEADER = json.loads(VALID[8:8 + _N])
DATA = VALID[8 + _N:]
NAMES = [k for k in HEADER if k != "__metadata__"]


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _address_space() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    except (OSError, StopIteration):
        return None


@contextmanager
def _bounded(seconds: int = 20, extra_bytes: int = 2 * 2**30):
    """One case runs bounded: blocking fails it (SIGALRM) instead of hanging the suite, and an
    allocation sized from a hostile header fails it (MemoryError under an address-space limit
    of the current size + 2 GiB) instead of exhausting a shared machine's memory."""
    def fire(signum, frame):
        raise TimeoutError(f"a reader blocked for {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, fire)
    old_limit = resource.getrlimit(resource.RLIMIT_AS)
    vm = _address_space()
    if vm is not None:
        cap = vm + extra_bytes
        resource.setrlimit(resource.RLIMIT_AS, (cap if old_limit[1] == resource.RLIM_INFINITY
                                                else min(cap, old_limit[1]), old_limit[1]))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_handler)
        resource.setrlimit(resource.RLIMIT_AS, old_limit)


def _assert_one_line(err: SubnetscopeError, path) -> None:
    msg = str(err)
    assert msg.splitlines() == [msg] and msg, repr(msg)
    assert str(path) in msg, msg


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def _check_safetensors(path) -> str:
    """The property for one .safetensors file; returns "read" or "refused"."""
    with _bounded():
        try:
            ck = open_checkpoint(path)
            s = summarize(ck)
        except SubnetscopeError as e:
            _assert_one_line(e, path)
            return "refused"
        with safe_open(str(path), framework="pt") as f:  # accepted: safetensors must read it too
            names = list(f.keys())
            assert sorted(names) == sorted(ck.tensors)
            total = 0
            for n in names:
                ref = f.get_tensor(n)
                assert _same_bytes(ck.tensor(n), ref), n
                total += ref.numel()
        assert s["total_params"] == total >= 0
        assert sorted(t["name"] for t in s["tensors"]) == sorted(names)
    return "read"


# ------------------------------------------------------------------ structural header mutations

_INTS = st.one_of(st.integers(0, 16), st.integers(-3, -1), st.sampled_from([2**31, 2**40, 2**63, 2**64, 2**70]))
_JUNK = st.one_of(st.none(), st.booleans(), st.floats(allow_nan=False, allow_infinity=False, width=32),
                  st.text(max_size=3), st.just([]), st.just({}), st.just([[1]]))
_DTYPES = st.sampled_from(["F32", "BF16", "F16", "I64", "I32", "BOOL", "U8", "F64", "C64", "F8_E4M3",
                           "F4", "F6_E2M3", "f32", "F128", "", "float32"])
_SHAPES = st.one_of(st.lists(_INTS, max_size=4), st.lists(st.integers(0, 6), max_size=3), _JUNK,
                    st.lists(st.one_of(st.integers(0, 4), st.floats(0, 4), st.booleans(), st.text(max_size=1)),
                             max_size=3))
_OFFSETS = st.one_of(st.lists(_INTS, min_size=2, max_size=2), st.lists(_INTS, max_size=3), _JUNK,
                     st.lists(st.floats(0, 64, width=32), min_size=2, max_size=2))
_NAMES = st.one_of(st.sampled_from(NAMES), st.sampled_from(["", "__metadata__", "\udc80", "a\nb", "\ud83d"]),
                   st.text(max_size=4))


_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "BOOL": 1}
# What a valid file may vary without becoming invalid, and what breaks it (or may not).
_BENIGN = ["reshape", "rename_plain", "metadata_ok", "reorder", "drop_empty"]
_HARMFUL = ["dtype", "shape", "offsets", "shift", "swap", "drop_field", "extra_field", "drop_tensor",
            "rename", "duplicate", "metadata", "entry_junk"]
_FRAMING = ["none"] * 13 + ["pad_nul", "pad_newline", "pad_junk", "lead_space", "bom",
            "length_minus", "length_plus", "length_huge", "length_over_limit", "data_short", "data_long",
            "minus_zero", "nan"]


@st.composite
def _mutated_header_file(draw) -> bytes:
    """A valid file's header with 1-3 structural edits, then at most one framing edit."""
    header = json.loads(json.dumps(HEADER))
    extra_pairs = []  # (name, entry) written a second time: duplicate names
    ops = draw(st.lists(st.sampled_from(_BENIGN + _HARMFUL), min_size=1, max_size=3))
    for op in ops:
        name = draw(st.sampled_from(NAMES))
        entry = header.get(name)
        if not isinstance(entry, dict):
            continue
        if op == "reshape":  # another shape with the same byte count: still valid
            dtype, offsets = entry.get("dtype"), entry.get("data_offsets")
            itemsize = _ITEMSIZE.get(dtype, -1) if isinstance(dtype, str) else -1
            shape = draw(st.lists(st.integers(0, 6), max_size=3))
            if offsets == HEADER[name]["data_offsets"] and math.prod(shape) * itemsize == offsets[1] - offsets[0]:
                entry["shape"] = shape
        elif op == "rename_plain":
            header[draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=6))] = header.pop(name)
        elif op == "metadata_ok":
            header["__metadata__"] = draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=3), st.text(max_size=3),
                                                                                max_size=3)))
        elif op == "reorder":
            items = list(header.items())
            header = dict(draw(st.permutations(items)))
        elif op == "drop_empty":
            header.pop("empty", None)
        elif op == "dtype":
            entry["dtype"] = draw(st.one_of(_DTYPES, _JUNK))
        elif op == "shape":
            entry["shape"] = draw(_SHAPES)
        elif op == "offsets":
            entry["data_offsets"] = draw(_OFFSETS)
        elif op == "shift":
            k = draw(st.integers(-8, 8))
            if isinstance(entry.get("data_offsets"), list):
                entry["data_offsets"] = [o + k if type(o) is int else o for o in entry["data_offsets"]]
        elif op == "swap":
            other = header.get(draw(st.sampled_from(NAMES)))
            if isinstance(other, dict):
                entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry.get("data_offsets")
        elif op == "drop_field":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif op == "extra_field":
            entry[draw(st.sampled_from(["extra", "offsets", "dtype2"]))] = draw(_JUNK)
        elif op == "drop_tensor":
            header.pop(name)
        elif op == "rename":
            header[draw(_NAMES)] = header.pop(name)
        elif op == "duplicate":
            extra_pairs.append((name, json.loads(json.dumps(entry))))
        elif op == "metadata":
            header["__metadata__"] = draw(st.one_of(
                _JUNK, st.dictionaries(st.text(max_size=3), _JUNK, min_size=1, max_size=2),
                st.just({"k": "\udc80"}), st.just({"\udc80": "v"})))
        elif op == "entry_junk":
            header[name] = draw(_JUNK)
    pairs = list(header.items()) + extra_pairs
    text = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs) + "}"  # \udc80 stays escaped
    raw = text.encode()
    raw += b" " * draw(st.sampled_from([0, (8 - len(raw) % 8) % 8, 9]))  # the format's padding: spaces
    data = DATA
    frame = draw(st.sampled_from(_FRAMING))
    raw = {"pad_nul": raw + b"\0\0\0", "pad_newline": raw + b"\n", "pad_junk": raw + b" x",
           "lead_space": b" " + raw, "bom": b"\xef\xbb\xbf" + raw,
           "minus_zero": raw.replace(b": [0,", b": [-0,", 1), "nan": raw.replace(b"[2", b"[NaN", 1)}.get(frame, raw)
    n = len(raw) + {"length_minus": -1, "length_plus": 1, "length_huge": 2**63,
                    "length_over_limit": 100_000_001 - len(raw)}.get(frame, 0)
    cut = {"data_short": -draw(st.integers(1, 8)), "data_long": draw(st.integers(1, 8))}.get(frame, 0)
    data = data[:len(data) + cut] if cut < 0 else data + b"\0" * cut
    return struct.pack("<Q", n) + raw + data


def test_mutated_safetensors_headers(tmp_path):
    path = tmp_path / "m.safetensors"
    outcomes = []
    before = _peak_rss()

    @settings(max_examples=1500, **SETTINGS)
    @given(_mutated_header_file())
    def prop(blob):
        path.write_bytes(blob)
        outcomes.append(_check_safetensors(path))

    prop()
    assert _peak_rss() - before < MAX_RSS_GROWTH
    # the mutations reach both sides: valid files that must be read, broken ones refused
    assert outcomes.count("read") >= 200 and outcomes.count("refused") >= 800, (
        outcomes.count("read"), outcomes.count("refused"))


# ------------------------------------------------------------------ raw bytes

@st.composite
def _byte_mutation(draw, seed: bytes = VALID) -> bytes:
    blob = bytearray(seed)
    header_end = 8 + struct.unpack("<Q", seed[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip_header", "truncate", "insert", "delete"]))
        if not blob:
            break
        hi = min(len(blob), header_end) if op == "flip_header" else len(blob)
        i = draw(st.integers(0, hi - 1))
        if op in ("flip", "flip_header"):
            blob[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del blob[i:]
        elif op == "insert":
            blob[i:i] = draw(st.binary(min_size=1, max_size=4))
        else:
            del blob[i:i + draw(st.integers(1, 4))]
    return bytes(blob)


def test_byte_mutated_and_random_safetensors(tmp_path):
    path = tmp_path / "b.safetensors"
    outcomes = []
    before = _peak_rss()

    @settings(max_examples=1000, **SETTINGS)
    @given(st.one_of(_byte_mutation(), st.binary(max_size=200),
                     st.binary(max_size=64).map(lambda b: struct.pack("<Q", len(b)) + b)))
    def prop(blob):
        path.write_bytes(blob)
        outcomes.append(_check_safetensors(path))

    prop()
    assert _peak_rss() - before < MAX_RSS_GROWTH
    assert outcomes.count("refused") >= 800 and outcomes.count("read") >= 10, (
        outcomes.count("read"), outcomes.count("refused"))


# ------------------------------------------------------------------ torch .bin / .pt

def _torch_bytes(legacy: bool) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({k: v for k, v in _valid_tensors().items() if k != "flags"}, buf,
               _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


ZIP_BIN, LEGACY_BIN = _torch_bytes(False), _torch_bytes(True)


@st.composite
def _bin_case(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "zip", "legacy"]))
    if kind == "random":
        return draw(st.binary(max_size=300))
    blob = bytearray(ZIP_BIN if kind == "zip" else LEGACY_BIN)
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(blob) - 1))
        if draw(st.booleans()):
            blob[i] ^= 1 << draw(st.integers(0, 7))
        else:
            del blob[i:]
            if not blob:
                break
    return bytes(blob)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
def test_random_and_mutated_bin(tmp_path):
    path = tmp_path / "x.bin"
    outcomes = []
    before = _peak_rss()

    @settings(max_examples=600, **SETTINGS)
    @given(_bin_case())
    def prop(blob):
        path.write_bytes(blob)
        with _bounded():
            try:
                ck = open_checkpoint(path)
                summarize(ck)
            except SubnetscopeError as e:
                _assert_one_line(e, path)
                outcomes.append("refused")
                return
            # torch's own reading of it; memory-mapped like the reader (which, like torch, does not
            # check zip CRCs then: a flipped data byte reads as stored, as in a safetensors file)
            ref = torch.load(path, map_location="cpu", weights_only=True, mmap=blob[:4] == b"PK\x03\x04")
            ref = ref.get("state_dict", ref.get("model", ref)) if isinstance(ref, dict) else ref
            assert sorted(ref) == sorted(ck.tensors)
            for n in ck.tensors:
                assert _same_bytes(ck.tensor(n), ref[n]), n
            outcomes.append("read")

    prop()
    assert _peak_rss() - before < MAX_RSS_GROWTH
    assert outcomes.count("refused") >= 400 and outcomes.count("read") >= 20, (
        outcomes.count("read"), outcomes.count("refused"))


# ------------------------------------------------------------------ masks

MASK = {"a": torch.tensor([[True, False, True], [False, False, True]]),
        "b": torch.ones(11, dtype=torch.bool), "c": torch.zeros(0, 2, dtype=torch.bool),
        "d": torch.tensor(True)}


@st.composite
def _mutated_mask(draw, valid: bytes) -> bytes:
    n = struct.unpack("<Q", valid[:8])[0]
    header = json.loads(valid[8:8 + n])
    data = valid[8 + n:]
    meta = header["__metadata__"]
    shapes = json.loads(meta["shapes"])
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["shape", "drop_shape", "add_shape", "shapes_junk", "format", "dtype",
                                   "tensor_shape", "bytes", "consistent"]))
        name = draw(st.sampled_from(sorted(MASK)))
        if op == "shape":
            shapes[name] = draw(_SHAPES)
        elif op == "drop_shape":
            shapes.pop(name, None)
        elif op == "add_shape":
            shapes[draw(st.text(max_size=3))] = draw(st.lists(st.integers(0, 9), max_size=2))
        elif op == "shapes_junk":
            meta["shapes"] = draw(st.sampled_from(["", "[", "[]", "null", "{\"a\": [1e400]}", "{\"a\": [NaN]}"]))
        elif op == "format":
            meta["format"] = draw(st.sampled_from(["", "subnetscope.mask/2", "pt"]))
        elif op == "dtype":
            header[name]["dtype"] = draw(st.sampled_from(["BOOL", "I8", "F32"]))
        elif op == "tensor_shape":
            header[name]["shape"] = draw(st.lists(st.integers(0, 4), min_size=1, max_size=2))
        elif op == "bytes":
            i = draw(st.integers(0, max(len(data) - 1, 0)))
            data = data[:i] + bytes([(data[i] if i < len(data) else 0) ^ 0xFF]) + data[i + 1:]
        elif op == "consistent":  # same element count, other shape: still a valid mask
            k = int(np.prod(shapes[name])) if isinstance(shapes.get(name), list) else -1
            if k > 0:
                shapes[name] = [k]
    if isinstance(meta.get("shapes"), str) and meta["shapes"].startswith("{"):
        meta["shapes"] = json.dumps(shapes)
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def test_mutated_masks(tmp_path):
    valid = save_mask(tmp_path / "valid.safetensors", MASK, source="fuzz").read_bytes()
    assert {k: v.tolist() for k, v in load_mask(tmp_path / "valid.safetensors").items()} == \
        {k: v.tolist() for k, v in MASK.items()}
    path = tmp_path / "m.safetensors"
    outcomes = []
    before = _peak_rss()

    @settings(max_examples=800, **SETTINGS)
    @given(st.one_of(_mutated_mask(valid), _byte_mutation(valid)))
    def prop(blob):
        path.write_bytes(blob)
        with _bounded():
            try:
                mask = load_mask(path)
            except SubnetscopeError as e:
                _assert_one_line(e, path)
                outcomes.append("refused")
                return
        # accepted: every tensor is exactly its recorded shape's packed bits, nothing padded or cut
        with safe_open(str(path), framework="np") as f:
            shapes = json.loads(f.metadata()["shapes"])
            assert sorted(mask) == sorted(shapes) == sorted(f.keys())
            for name, m in mask.items():
                assert m.dtype == torch.bool and list(m.shape) == shapes[name]
                packed = f.get_tensor(name)
                assert packed.dtype == np.uint8 and packed.ndim == 1
                assert np.array_equal(np.packbits(m.reshape(-1).numpy(), bitorder="big"),
                                      packed & _pad_mask(m.numel(), packed.size))
        outcomes.append("read")

    prop()
    assert _peak_rss() - before < MAX_RSS_GROWTH
    assert outcomes.count("read") >= 30 and outcomes.count("refused") >= 500, (
        outcomes.count("read"), outcomes.count("refused"))


def _pad_mask(n: int, nbytes: int) -> np.ndarray:
    """Bytes that keep the first n bits (numpy.packbits pads the last byte with zeros)."""
    keep = np.full(nbytes, 0xFF, np.uint8)
    if n % 8:
        keep[-1] = (0xFF << (8 - n % 8)) & 0xFF
    return keep


def test_fuzz_inputs_are_valid_to_start_with(tmp_path):
    """The seeds themselves are read exactly (so mutations, not the seeds, explain refusals)."""
    p = tmp_path / "v.safetensors"
    p.write_bytes(VALID)
    assert _check_safetensors(p) == "read"
    b = tmp_path / "v.bin"
    b.write_bytes(ZIP_BIN)
    assert open_checkpoint(b).total_params == 12 + 6 + 3 + 6 + 0 + 1
    leg = tmp_path / "legacy.pt"
    leg.write_bytes(LEGACY_BIN)
    assert open_checkpoint(leg).total_params == 28
    assert FORMAT == "subnetscope.mask/1"
