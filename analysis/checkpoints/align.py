"""Pairing the tensors of two or more checkpoints by name (wrapper prefixes stripped): missing and
extra tensors, shape mismatches and a resized vocabulary (compared on the shared rows) reported,
nothing dropped; and the aligned tensors streamed one at a time."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from analysis.checkpoints.files import CheckpointError
from analysis.checkpoints.open import Checkpoint, TensorInfo
from analysis.errors import quoted


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


def iter_aligned(alignment: Alignment, checkpoints: list[Checkpoint]) -> Iterator[tuple[AlignedTensor, list]]:
    """Streams aligned tensors: yields (AlignedTensor, [tensor per checkpoint]) one key at a
    time; resized tensors are cut to their shared rows."""
    for t in alignment.tensors:
        values = [ck.tensor(n) for ck, n in zip(checkpoints, t.names)]
        if t.resized:
            values = [v[: t.compare_shape[0]] for v in values]
        yield t, values

