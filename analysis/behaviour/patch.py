"""Weight patching: apply part of a fine-tune's update, θ = θ⁰ + α · P(M ⊙ Δ) on a subset M and θ⁰
elsewhere, Δ = θ¹ − θ⁰ in float32, P the identity or, with a rank k, each 2-D block matrix's best
rank-k approximation (truncated SVD: Eckart–Young); docs/design.md §15. With α = 1 and no rank the
subset's elements are copied from θ¹, bit for bit, never recomputed. Everything is stored in θ¹'s
dtype.

A subset is written as text (:func:`parse_subset`):

- ``all`` / ``none``;
- ``layers:0,2-3`` — every tensor of those transformer blocks;
- ``kinds:q,k,v,o,gate,up,down,attn,mlp`` — module kinds (``attn`` = q, k, v, qkv, o; ``mlp`` = gate,
  up, down; any kind of :data:`analysis.checkpoints.structure.KINDS` too, e.g. ``embed``, ``lm_head``);
- ``heads:L.H,…`` — query head H of block L: its q rows and o columns, and the k and v rows of the
  key/value head it reads (under grouped-query attention that head is shared with the group);
- ``changed`` — the elements changed at τ (``--tol``; the diff's definition);
- ``mask:FILE`` — a mask file (:mod:`analysis.sparsity.masks`);
- ``selector:NAME:DENSITY`` — the top DENSITY of a registered selector's scores of the base.

Applied in place on a loaded model (:class:`Patcher`: apply, undo) for sweeps, or streamed tensor
by tensor into a new Hugging Face directory (:func:`write_patched`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch

from analysis.checkpoints.structure import KIND_GROUP, KINDS
from analysis.errors import SubnetscopeError, quoted

GROUPS = {"attn": ("q", "k", "v", "qkv", "o"), "mlp": ("gate", "up", "down")}
SUBSETS = ("all", "none", "layers:", "kinds:", "heads:", "changed", "mask:", "selector:")


class PatchError(SubnetscopeError):
    """A subset, rank, α or pair that cannot be patched, in one line."""


@dataclass(frozen=True)
class Subset:
    """A parsed subset of the update (see the module's docstring)."""

    text: str
    what: str  # all | none | layers | kinds | heads | changed | mask | selector
    layers: tuple[int, ...] = ()
    kinds: tuple[str, ...] = ()
    heads: tuple[tuple[int, int], ...] = ()
    path: str | None = None
    selector: str | None = None
    density: float | None = None

    @property
    def needs_model(self) -> bool:
        """A selector's subset: the base must be loaded (and perhaps calibration data read)."""
        return self.what == "selector"


def _ints(text: str, where: str) -> tuple[int, ...]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise PatchError(f"{where}: {quoted(part)} is not a layer number or a range such as 2-3")
        lo, hi = int(m[1]), int(m[2] if m[2] is not None else m[1])
        if hi < lo:
            raise PatchError(f"{where}: the range {quoted(part)} runs backwards")
        if hi - lo > 100_000:
            raise PatchError(f"{where}: the range {quoted(part)} is too long")
        out += range(lo, hi + 1)
    return tuple(sorted(set(out)))


def parse_subset(text: str) -> Subset:
    """A subset's text as a :class:`Subset`.

    Raises:
        PatchError: one line naming the subset and what is wrong with it.
    """
    s = str(text).strip()
    where = f"--subset {quoted(s)}"
    head, colon, rest = s.partition(":")
    head = head.strip().lower()
    if s.lower() in ("all", "none", "changed"):
        return Subset(s, s.lower())
    if not colon or not rest.strip():
        raise PatchError(f"{where}: unknown subset; one of all, none, changed, layers:0,2-3, kinds:q,mlp, "
                         "heads:L.H, mask:FILE, selector:NAME:DENSITY")
    if head == "layers":
        return Subset(s, "layers", layers=_ints(rest, where))
    if head == "kinds":
        kinds: list[str] = []
        for k in (x.strip() for x in rest.split(",")):
            if k in GROUPS:
                kinds += GROUPS[k]
            elif k in KINDS:
                kinds.append(k)
            else:
                raise PatchError(f"{where}: unknown module kind {quoted(k)}; one of attn, mlp, "
                                 + ", ".join(KINDS))
        return Subset(s, "kinds", kinds=tuple(dict.fromkeys(kinds)))
    if head == "heads":
        heads = []
        for h in (x.strip() for x in rest.split(",")):
            m = re.fullmatch(r"(\d+)\.(\d+)", h)
            if not m:
                raise PatchError(f"{where}: {quoted(h)} is not a head written LAYER.HEAD (e.g. 3.5)")
            heads.append((int(m[1]), int(m[2])))
        return Subset(s, "heads", heads=tuple(sorted(set(heads))))
    if head == "mask":
        return Subset(s, "mask", path=rest.strip())
    if head == "selector":
        name, colon2, dens = rest.rpartition(":")
        if not colon2 or not name.strip():
            raise PatchError(f"{where}: write selector:NAME:DENSITY, e.g. selector:magnitude:0.05")
        try:
            d = float(dens)
        except ValueError:
            raise PatchError(f"{where}: the density {quoted(dens)} is not a number") from None
        if not (math.isfinite(d) and 0 < d <= 1):
            raise PatchError(f"{where}: the density must be a fraction in (0, 1], got {dens}")
        from analysis.importance.selectors import SELECTORS

        if name.strip() not in SELECTORS:
            raise PatchError(f"{where}: unknown selector {quoted(name.strip())}; one of {', '.join(SELECTORS)}")
        return Subset(s, "selector", selector=name.strip(), density=d)
    raise PatchError(f"{where}: unknown subset {quoted(head)}; one of all, none, changed, layers:, kinds:, heads:, "
                     "mask:, selector:")


def check_alpha(alpha: float) -> float:
    a = float(alpha)
    if not math.isfinite(a):
        raise PatchError(f"--alpha must be a finite number, got {alpha}")
    return a


def check_rank(rank: int | None) -> int | None:
    if rank is None:
        return None
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise PatchError(f"--rank must be a whole number ≥ 1, got {rank}")
    return int(rank)


# ---------------------------------------------------------------------------- the pair


@dataclass
class Pair:
    """A base and its fine-tune, tensor by tensor: the stored names, shapes, layers and kinds of the
    tensors both hold with equal shapes."""

    base: object  # Checkpoint
    tuned: object  # Checkpoint
    names: dict[str, tuple[str, str]] = field(default_factory=dict)  # key -> (base name, tuned name)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    layer: dict[str, int | None] = field(default_factory=dict)
    kind: dict[str, str] = field(default_factory=dict)

    @classmethod
    def open(cls, base_ref: str, tuned_ref: str) -> Pair:
        """Raises:
            PatchError: a tensor the tune has and the base lacks, or of another shape."""
        from analysis.checkpoints import align, open_checkpoint

        b, t = open_checkpoint(base_ref), open_checkpoint(tuned_ref)
        al = align([b, t])
        only = [m["key"] for m in al.missing if 1 in m["present_in"]]
        if only:
            raise PatchError(f"{tuned_ref}: {len(only)} tensor(s) the base {base_ref} lacks (first: {only[0]}); "
                             "a patch needs the same tensors in both")
        lacking = [m["key"] for m in al.missing if 0 in m["present_in"]]
        if lacking:  # e.g. a tune saved with tied embeddings: its head is not a tensor of its own
            raise PatchError(f"{base_ref}: {len(lacking)} tensor(s) the tune {tuned_ref} lacks (first: {lacking[0]}); "
                             "a patch needs the same tensors in both")
        bad = al.mismatched + al.resized
        if bad:
            raise PatchError(f"{tuned_ref}: {bad[0]['key']} has another shape than in {base_ref} "
                             f"({' vs '.join(map(str, bad[0]['shapes']))}); a patch needs equal shapes")
        pair = cls(b, t)
        for a in al.tensors:
            pair.names[a.key] = (a.names[0], a.names[1])
            pair.shapes[a.key] = a.shapes[1]
            pair.layer[a.key] = a.layer
            pair.kind[a.key] = a.kind
        return pair

    @property
    def num_layers(self) -> int:
        return 1 + max((L for L in self.layer.values() if L is not None), default=-1)

    def theta(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(θ⁰, θ¹) of one tensor, as stored."""
        nb, nt = self.names[key]
        return self.base.tensor(nb), self.tuned.tensor(nt)


# ---------------------------------------------------------------------------- subset -> selection

Selection = dict[str, "bool | torch.Tensor"]  # key -> True (the whole tensor) or a bool mask


def heads_selection(pair: Pair, heads: tuple[tuple[int, int], ...], where: str) -> Selection:
    from analysis.checkpoints.structure import unit_slices

    arch = pair.tuned.arch
    H, KV = arch.num_heads, arch.num_kv_heads or arch.num_heads
    if not H or not arch.head_dim:
        raise PatchError(f"{where}: {pair.tuned.ref} has no attention-head structure in its config")
    for L, h in heads:
        if L >= pair.num_layers:
            raise PatchError(f"{where}: block {L} does not exist ({pair.num_layers} blocks: 0-{pair.num_layers - 1})")
        if h >= H:
            raise PatchError(f"{where}: head {h} does not exist ({H} query heads per block: 0-{H - 1})")
    out: Selection = {}
    for key, shape in pair.shapes.items():
        L = pair.layer[key]
        wanted = [h for lay, h in heads if lay == L]
        if not wanted or len(shape) != 2:
            continue
        for sl in unit_slices(pair.kind[key], shape, arch):
            if sl.unit not in ("head", "kv_head"):  # MLP channels are not heads
                continue
            units = set(wanted) if sl.unit == "head" else {h // (H // KV) for h in wanted}
            for u in sorted(units):
                m = out.get(key)
                if m is None:
                    m = out[key] = torch.zeros(shape, dtype=torch.bool)
                lo = sl.start + u * sl.size
                if sl.axis == 0:
                    m[lo:lo + sl.size] = True
                else:
                    m[:, lo:lo + sl.size] = True
    return out


def mask_selection(pair: Pair, mask: dict, where: str) -> Selection:
    from analysis.checkpoints.structure import normalize_name

    by_key = {normalize_name(n): m for n, m in mask.items()}
    unknown = [k for k in by_key if k not in pair.shapes]
    if unknown:
        raise PatchError(f"{where}: names a tensor the pair does not hold ({unknown[0]})")
    out: Selection = {}
    for k, m in by_key.items():
        if tuple(m.shape) != tuple(pair.shapes[k]):
            raise PatchError(f"{where}: {k} is {tuple(m.shape)} in the mask and {pair.shapes[k]} in the checkpoints")
        if bool(m.any()):
            out[k] = m.to(torch.bool)
    return out


def select(pair: Pair, subset: Subset, *, tol: float = 0.0, model=None, batches=None) -> Selection:
    """The elements of ``subset`` in this pair.

    Args:
        tol (float): τ of ``changed``.
        model (nn.Module, optional): the base, loaded, for ``selector:`` subsets.
        batches (list, optional): calibration batches for a selector that needs data.

    Raises:
        PatchError: a block, head or tensor the pair does not hold; a mask of other shapes.
    """
    where = f"--subset {quoted(subset.text)}"
    w = subset.what
    if w == "all":
        return {k: True for k in pair.shapes}
    if w == "none":
        return {}
    if w == "layers":
        missing = [L for L in subset.layers if L >= pair.num_layers]
        if missing:
            raise PatchError(f"{where}: block {missing[0]} does not exist "
                             f"({pair.num_layers} blocks: 0-{pair.num_layers - 1})")
        return {k: True for k, L in pair.layer.items() if L in subset.layers}
    if w == "kinds":
        out = {k: True for k, kind in pair.kind.items() if kind in subset.kinds}
        if not out:
            have = sorted({pair.kind[k] for k in pair.kind}, key=KINDS.index)
            raise PatchError(f"{where}: the pair has no tensor of these kinds (it has {', '.join(have)})")
        return out
    if w == "heads":
        return heads_selection(pair, subset.heads, where)
    if w == "changed":
        from analysis.sparsity.diff import changed_mask

        out = {}
        for k in pair.shapes:
            m = changed_mask(*pair.theta(k), tol)
            if bool(m.any()):
                out[k] = True if bool(m.all()) else m
        return out
    if w == "mask":
        from analysis.sparsity.masks import MaskError, load_mask

        try:
            mask = load_mask(subset.path)
        except MaskError as e:
            raise PatchError(f"{where}: {e}") from None
        return mask_selection(pair, mask, where)
    if w == "selector":
        if model is None:
            raise PatchError(f"{where}: a selector's subset needs the base model loaded")
        from analysis.importance.scores import compute_scores, scores_to_mask

        scores = compute_scores(model, subset.selector, batches)
        return mask_selection(pair, scores_to_mask(scores, subset.density), where)
    raise PatchError(f"{where}: unknown subset")


def selected_count(pair: Pair, sel: Selection) -> int:
    return sum(math.prod(pair.shapes[k]) if m is True else int(m.sum()) for k, m in sel.items())


# ---------------------------------------------------------------------------- the patched tensor


def low_rank(delta: torch.Tensor, k: int, svd=None) -> torch.Tensor:
    """The best rank-``k`` approximation of a 2-D float32 update (Eckart–Young: the top k singular
    triplets); the update itself when k ≥ its rank. ``svd`` reuses (U, S, Vh) computed before."""
    U, S, Vh = svd if svd is not None else torch.linalg.svd(delta, full_matrices=False)
    if k >= S.numel():
        return delta
    return (U[:, :k] * S[:k]) @ Vh[:k]


def is_block_matrix(pair: Pair, key: str) -> bool:
    return pair.layer[key] is not None and len(pair.shapes[key]) == 2


def patched(theta0: torch.Tensor, theta1: torch.Tensor, sel, *, alpha: float = 1.0, rank: int | None = None,
            block_matrix: bool = False, svd=None) -> torch.Tensor:
    """θ⁰ + α · P(M ⊙ Δ) of one tensor in θ¹'s dtype (``sel`` True: the whole tensor; a bool mask: its
    elements). With α = 1 and no rank, θ¹'s elements are copied where selected and θ⁰'s elsewhere."""
    if rank is None and alpha == 1.0:
        if sel is True:
            return theta1.clone()
        return torch.where(sel, theta1, theta0.to(theta1.dtype))
    delta = theta1.float() - theta0.float()
    if sel is not True:
        delta = delta * sel
    if rank is not None and block_matrix:
        delta = low_rank(delta, rank, svd)
    return (theta0.float() + alpha * delta).to(theta1.dtype)


# ---------------------------------------------------------------------------- in place, undone


class Patcher:
    """A base model patched in place towards its fine-tune, and restored.

    The model holds θ⁰ (loaded from ``pair.base``); :meth:`apply` writes θ⁰ + α·P(M ⊙ Δ) (computed in the
    stored dtype, then cast to the model's) into the selected parameters, :meth:`undo` writes θ⁰ back.
    SVDs of the (masked) updates are remembered per selection for rank sweeps.
    """

    def __init__(self, model, pair: Pair):
        from analysis.checkpoints.structure import normalize_name

        self.model, self.pair = model, pair
        params = dict(model.named_parameters(remove_duplicate=False))
        by_key = {normalize_name(n): p for n, p in params.items()}
        self.params: dict = {}
        self.aliased: list[str] = []  # a second name of one parameter (tied embeddings): patched through the first
        seen: set[int] = set()
        for k in pair.shapes:
            p = by_key.get(k)
            if p is None:
                continue
            if id(p) in seen:
                self.aliased.append(k)
                continue
            seen.add(id(p))
            self.params[k] = p
        self.not_in_model = [k for k in pair.shapes if k not in by_key]
        moved = [k for k in self.not_in_model if not torch.equal(*pair.theta(k))]
        if moved:  # an update the model would not see: every recovered gain would be biased
            raise PatchError(f"{pair.tuned.ref}: {moved[0]} changed but is no parameter of the loaded model "
                             f"({len(moved)} such tensor(s)); the patch cannot apply it")
        self.touched: dict[str, None] = {}  # ordered: undo writes back in the order patched
        self._svd: dict = {}

    def _theta0(self, key: str) -> torch.Tensor:
        return self.pair.base.tensor(self.pair.names[key][0])

    def undo(self) -> None:
        """θ⁰ back into every parameter the last patches touched."""
        with torch.no_grad():
            for k in self.touched:
                p = self.params[k]
                p.copy_(self._theta0(k).to(device=p.device, dtype=p.dtype))
        self.touched.clear()

    def apply(self, sel: Selection, *, alpha: float = 1.0, rank: int | None = None, tag=None) -> None:
        """Undoes the last patch, then patches ``sel``. ``tag`` names the selection for the SVD
        cache (rank sweeps over one selection compute each SVD once)."""
        self.undo()
        with torch.no_grad():
            for k, m in sel.items():
                p = self.params.get(k)
                if p is None:
                    continue
                t0, t1 = self.pair.theta(k)
                svd = None
                block = is_block_matrix(self.pair, k)
                if rank is not None and block and tag is not None:
                    if self._svd.get("_selection", {}).get(tag) is not sel:  # another selection: its own SVDs
                        self._svd = {"_selection": {**self._svd.get("_selection", {}), tag: sel}}
                    svd = self._svd.get((tag, k))
                    if svd is None:
                        d = t1.float() - t0.float()
                        svd = self._svd[(tag, k)] = torch.linalg.svd(d if m is True else d * m, full_matrices=False)
                p.copy_(patched(t0, t1, m, alpha=alpha, rank=rank, block_matrix=block, svd=svd)
                        .to(device=p.device, dtype=p.dtype))
                self.touched[k] = None


# ---------------------------------------------------------------------------- to a directory

MARKER = ".subnetscope-patch"


def is_patch_dir(d) -> bool:
    from pathlib import Path

    return (Path(d) / MARKER).is_file()


def write_patched(pair: Pair, sel: Selection, out, *, alpha: float = 1.0, rank: int | None = None,
                  recipe: dict | None = None, progress=None) -> dict:
    """The patched checkpoint as a Hugging Face directory at ``out``: the tune's tensor names, dtypes
    and file layout, its config and tokenizer files; a model card naming the base as ``base_model``
    (so the family places it as the base's child) and :data:`MARKER` with the recipe. Streamed tensor
    by tensor (:mod:`analysis.checkpoints.writer`) into a temporary sibling, renamed into place.

    Returns:
        dict: ``path``, ``files``, ``tensors``, ``bytes``.
    """
    import json
    import shutil
    from pathlib import Path

    from analysis.checkpoints.writer import SafetensorsWriter, shard_index
    from analysis.checkpoints.structure import normalize_name
    from analysis.io import replace_dir

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tuned = pair.tuned
        key_of = {normalize_name(n): n for n in tuned.tensors}
        by_file: dict[str, list[str]] = {}
        for n, info in tuned.tensors.items():
            by_file.setdefault(info.file, []).append(n)
        if any(not f.endswith(".safetensors") for f in by_file):
            raise PatchError(f"{tuned.ref}: --out writes safetensors; this tune's weights are not safetensors")
        done, total, size = 0, len(tuned.tensors), 0
        files = []
        for f, names in by_file.items():
            target = tmp / Path(f).name
            entries = [(n, tuned.tensors[n].dtype, tuned.tensors[n].shape) for n in names]
            with SafetensorsWriter(target, entries, metadata={"format": "pt"}) as w:
                for n in names:
                    k = normalize_name(n)
                    t1 = tuned.tensor(n)
                    m = sel.get(k)
                    if m is None:
                        t = pair.base.tensor(pair.names[k][0]).to(t1.dtype)
                    else:
                        t0 = pair.base.tensor(pair.names[k][0])
                        t = patched(t0, t1, m, alpha=alpha, rank=rank, block_matrix=is_block_matrix(pair, k))
                    w.write(n, t)
                    done += 1
                    if progress:
                        progress(done, total, n)
            files.append(target.name)
            size += target.stat().st_size
        if len(files) > 1 or files != ["model.safetensors"]:  # a one-shard index too: the loader looks for it
            shard_index(tmp, {n: Path(tuned.tensors[n].file).name for n in tuned.tensors},
                        sum(tuned.tensors[n].numel * torch.empty((), dtype=getattr(torch, tuned.tensors[n].dtype))
                            .element_size() for n in tuned.tensors))
        for extra in sorted(Path(tuned.path).iterdir()):  # config, generation config, tokenizer files
            if extra.is_file() and extra.suffix in (".json", ".txt", ".model", ".jinja") \
                    and not extra.name.endswith(".index.json") and not extra.name.startswith("."):
                shutil.copy2(extra, tmp / extra.name)
        base_ref = str(pair.base.path)
        (tmp / "README.md").write_text(f"---\nbase_model: {json.dumps(base_ref)}\n---\n\n"
                                       f"A hybrid written by Subnetscope's `patch`: {recipe or {}}\n")
        (tmp / MARKER).write_text(json.dumps({"format": "subnetscope.patch/1", "base": base_ref,
                                              "tuned": str(tuned.path), **(recipe or {})}, indent=1))
        del key_of
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "files": files, "tensors": total, "bytes": size}


__all__ = ["GROUPS", "KIND_GROUP", "Pair", "PatchError", "Patcher", "Subset", "check_alpha", "check_rank",
           "is_patch_dir", "low_rank", "parse_subset", "patched", "select", "selected_count", "write_patched"]
