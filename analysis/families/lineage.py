"""Families: the checkpoints under study and each one's parent, read from what the files say
(docs/design.md §14).

A checkpoint's parent — the checkpoint it was trained from — is found in this order, the first
that names one wins:

1. **run** — a Subnetscope run directory (``<run>/model``, or the run directory itself): the
   ``checkpoint`` its ``config.json`` started from;
2. **adapter** — a PEFT adapter's ``adapter_config.json``: ``base_model_name_or_path``;
3. **model card** — ``README.md``'s YAML front matter: ``base_model`` (the hub's convention; a list
   takes its first entry), a hub id or a local path (relative to the checkpoint's folder);
4. **config** — ``config.json``'s ``_name_or_path``, only when it names *another* checkpoint of the
   family (``save_pretrained`` writes the path a model was loaded from, which is usually its
   parent, but a copy of a hub model names itself);
5. **manifest** — the demo and SmolLM2 families' ``manifest.json``.

A parent the user sets (:func:`set_parent`) comes before all of them and is kept in
``$SUBNETSCOPE_HOME/family.json``; so is "no parent" (``None``).

Labels (:func:`short_names`) are the shortest trailing path components that tell the family's
members apart (``arith/grpo-seed1``); hub ids stay as they are.

Reads small JSON/YAML files only: nothing here imports torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from analysis.jobs.progress import read_json  # the one reader of small JSON files

from analysis.errors import SubnetscopeError

SOURCES = ("user", "run", "adapter", "model card", "config", "manifest")
FORMAT = "subnetscope.family/1"
RUN_MARKER = ".subnetscope-run"  # analysis.jobs.rundir.MARKER (not imported: that module is a layer up)


class FamilyError(SubnetscopeError):
    """A family file that cannot be read or written, or a parent that would make a cycle."""


@dataclass(frozen=True)
class Parent:
    """Where a checkpoint came from: ``ref`` (None: no parent known), what said so (one of
    :data:`SOURCES`) and the file that said it."""

    ref: str | None
    source: str | None = None
    file: str | None = None

    def to_dict(self) -> dict:
        return {"parent": self.ref, "parent_source": self.source, "parent_file": self.file}


NO_PARENT = Parent(None)


def normalize_ref(ref) -> str | None:
    """One spelling per checkpoint: a local path without trailing slashes, ``~`` expanded and
    ``.``/``..`` folded (``/x/demo/sft/`` and ``/x/demo/sft`` are one); a hub id unchanged."""
    from analysis.checkpoints.open import is_hub_id

    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not ref or not isinstance(ref, str):
        return None
    ref = ref.strip()
    if ref and not is_hub_id(ref):
        ref = os.path.normpath(os.path.abspath(os.path.expanduser(ref)))
    return ref or None


def _folder(ref: str) -> Path | None:
    """The local folder a reference's files are in (a model directory, or a weights file's folder)."""
    p = Path(ref)
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    return None


def _reference(value, folder: Path) -> str | None:
    """A parent named in a file, as a reference: an existing local path (absolute, or relative to
    the checkpoint's folder), else a hub id's form as it is; anything else is not a reference."""
    from analysis.checkpoints.open import is_hub_id

    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    p = Path(value).expanduser()
    for candidate in ([p] if p.is_absolute() else [folder / p, p]):
        if candidate.exists():
            return normalize_ref(str(candidate))
    return value if is_hub_id(value) else None


def _run_parent(folder: Path) -> Parent | None:
    for run in (folder, folder.parent) if folder.name == "model" else (folder,):
        if (run / RUN_MARKER).is_file():
            cfg = read_json(run / "config.json")
            ref = _reference(cfg.get("checkpoint"), run) if isinstance(cfg, dict) else None
            if ref:
                return Parent(ref, "run", str(run / "config.json"))
    return None


def _adapter_parent(folder: Path) -> Parent | None:
    cfg = read_json(folder / "adapter_config.json")
    ref = _reference(cfg.get("base_model_name_or_path"), folder) if isinstance(cfg, dict) else None
    return Parent(ref, "adapter", str(folder / "adapter_config.json")) if ref else None


def model_card_base(folder: Path) -> str | None:
    """``base_model`` of ``folder/README.md``'s YAML front matter, as written (None when absent or
    unreadable) — parsed by huggingface_hub, as the hub does."""
    card = folder / "README.md"
    if not card.is_file():
        return None
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(card) or {}
    except Exception:  # noqa: BLE001 — malformed YAML in a model card names no parent
        return None
    return meta.get("base_model") if isinstance(meta, dict) else None


def _card_parent(folder: Path) -> Parent | None:
    ref = _reference(model_card_base(folder), folder)
    return Parent(ref, "model card", str(folder / "README.md")) if ref else None


def _config_parent(folder: Path, me: str, members: set[str] | None) -> Parent | None:
    cfg = read_json(folder / "config.json")
    ref = _reference(cfg.get("_name_or_path"), folder) if isinstance(cfg, dict) else None
    if not ref or ref == me or (Path(ref).exists() and Path(ref).resolve() == folder.resolve()):
        return None
    # another member of the family; outside a family (inspect) another local checkpoint
    if (ref in members) if members is not None else (Path(ref).is_dir() and not Path(ref).samefile(folder)):
        return Parent(ref, "config", str(folder / "config.json"))
    return None


def _manifest_parent(folder: Path) -> Parent | None:
    """The demo / SmolLM2 manifests: ``models[name].parent`` of the family folder above."""
    for d in (folder.parent, folder.parent.parent):
        manifest = read_json(d / "manifest.json")
        if not isinstance(manifest, dict) or not isinstance(manifest.get("models"), dict):
            continue
        for name, m in manifest["models"].items():
            if not isinstance(m, dict) or not m.get("parent"):
                continue
            traj = m.get("trajectory") if isinstance(m.get("trajectory"), dict) else {}
            paths = [m.get("path", name), *(traj.get("paths") or [])]  # a run's saved steps share its parent
            if any(isinstance(x, str) and normalize_ref(str(d / x)) == normalize_ref(str(folder)) for x in paths):
                return Parent(normalize_ref(str(d / m["parent"])), "manifest", str(d / "manifest.json"))
    return None


def declared_parent(ref: str, members=None) -> Parent:
    """The parent the files of ``ref`` name (see the module's docstring for the order); ``members``
    (the family's references) lets ``config.json``'s ``_name_or_path`` count when it names one of
    them. A hub id not on disk has no files to read here: :data:`NO_PARENT`."""
    me = normalize_ref(ref)
    folder = _folder(me) if me else None
    if folder is None:
        return NO_PARENT
    members = None if members is None else {normalize_ref(m) for m in members} - {me}
    for found in (_run_parent(folder), _adapter_parent(folder), _card_parent(folder),
                  _config_parent(folder, me, members), _manifest_parent(folder)):
        if found is not None and found.ref != me:
            return found
    return NO_PARENT


# ---------------------------------------------------------------------------- the user's corrections

def family_file() -> Path:
    from analysis.paths import subnetscope_home

    return subnetscope_home() / "family.json"


def _family_data() -> dict:
    data = read_json(family_file())
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return {}
    return data


def load_corrections() -> dict[str, str | None]:
    """child -> parent (None: "no parent") the user set, from ``family.json`` ({} when there is
    none; an unreadable file is ignored here and replaced by the next :func:`set_parent`)."""
    parents = _family_data().get("parents")
    if not isinstance(parents, dict):
        return {}
    return {k: v for k, v in parents.items() if isinstance(k, str) and (v is None or isinstance(v, str))}


def load_names() -> dict[str, str]:
    """ref -> the short name the user gave it (``family.json``)."""
    names = _family_data().get("names")
    if not isinstance(names, dict):
        return {}
    return {k: v for k, v in names.items() if isinstance(k, str) and isinstance(v, str) and v.strip()}


def _write(parents: dict, names: dict) -> None:
    from analysis.io import write_json_atomic

    try:
        write_json_atomic(family_file(), {"format": FORMAT, "parents": parents, "names": names})
    except OSError as e:
        raise FamilyError(f"{family_file()}: cannot keep the family ({e.strerror or e})") from None
    except SubnetscopeError as e:  # analysis.io's one line for a write that failed (a full disk, not a folder)
        reason = str(e).split(": ", 1)[-1]
        raise FamilyError(f"{family_file()}: cannot keep the family ({reason})") from None


def set_parent(child: str, parent: str | None, *, forget: bool = False) -> None:
    """Keeps the user's parent of ``child`` (None: it has none) in ``family.json``; ``forget``
    drops the correction, so the files decide again. Written atomically.

    Raises:
        FamilyError: a parent that is the child itself, or the file cannot be written.
    """
    child, parent = normalize_ref(child), normalize_ref(parent)
    if child is None:
        raise FamilyError("set_parent: no checkpoint named")
    if parent == child:
        raise FamilyError(f"{child}: a checkpoint cannot be its own parent")
    parents = load_corrections()
    if forget:
        parents.pop(child, None)
    else:
        parents[child] = parent
    _write(parents, load_names())


def set_name(ref: str, name: str | None) -> None:
    """Keeps the user's short name of ``ref`` (None or blank: back to the computed one).

    Raises:
        FamilyError: a name with control characters or over 80 characters, or an unwritable file.
    """
    ref = normalize_ref(ref)
    name = (name or "").strip()
    if ref is None:
        raise FamilyError("set_name: no checkpoint named")
    if len(name) > 80 or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise FamilyError(f"{name[:80]!r}: a short name is up to 80 printable characters")
    names = load_names()
    if name:
        names[ref] = name
    else:
        names.pop(ref, None)
    _write(load_corrections(), names)


# ---------------------------------------------------------------------------- the family

@dataclass
class Family:
    """The checkpoints under study (``members``, in the user's order) and each one's parent.

    ``parents[m]`` is where ``m`` came from (:class:`Parent`); a parent need not be a member (an RL
    run's SFT parent when only the RL run is chosen): it is still the checkpoint ``m`` is compared
    with. ``corrections`` (child -> parent) come first.
    """

    members: list[str]
    parents: dict[str, Parent] = field(default_factory=dict)

    @classmethod
    def of(cls, refs, corrections: dict[str, str | None] | None = None) -> Family:
        members = list(dict.fromkeys(r for r in (normalize_ref(x) for x in refs) if r))
        corrections = load_corrections() if corrections is None else corrections
        parents = {}
        for m in members:
            if m in corrections:
                parents[m] = Parent(corrections[m], "user", str(family_file()))
            else:
                parents[m] = declared_parent(m, members)
        fam = cls(members, parents)
        fam._break_cycles()
        return fam

    def _break_cycles(self) -> None:
        for m in self.members:
            seen, cur = {m}, self.parent(m)
            while cur is not None and cur in self.parents:
                if cur in seen:  # two files naming each other: the one read later loses its parent
                    self.parents[m] = NO_PARENT
                    break
                seen.add(cur)
                cur = self.parent(cur)

    def parent(self, ref: str | None) -> str | None:
        p = self.parents.get(normalize_ref(ref)) if ref else None
        return p.ref if p else None

    def source(self, ref: str) -> Parent:
        return self.parents.get(normalize_ref(ref), NO_PARENT)

    def children(self, ref: str) -> list[str]:
        ref = normalize_ref(ref)
        return [m for m in self.members if self.parent(m) == ref]

    def roots(self) -> list[str]:
        """The family's tops: parents outside the members, then members without a parent among them."""
        outside = [p for p in dict.fromkeys(self.parent(m) for m in self.members) if p and p not in self.members]
        return outside + [m for m in self.members if self.parent(m) not in self.members and self.parent(m) is None]

    def tree(self) -> list[tuple[int, str]]:
        """(depth, ref) in depth-first order from the roots: the family drawn as a small tree."""
        out, seen = [], set()

        def walk(r, depth):
            if r in seen:
                return
            seen.add(r)
            out.append((depth, r))
            for c in self.children(r):
                walk(c, depth + 1)

        for r in self.roots():
            walk(r, 0)
        for m in self.members:  # anything a correction left unreachable
            walk(m, 0)
        return out

    def common_parent(self, refs) -> str | None:
        """The one parent all of ``refs`` share, else None."""
        ps = {self.parent(r) for r in refs}
        return next(iter(ps)) if len(ps) == 1 else None

    def everyone(self) -> list[str]:
        """Members and the parents they name, members first."""
        return list(dict.fromkeys([*self.members, *(self.parent(m) for m in self.members if self.parent(m))]))

    def labels(self, given: dict[str, str] | None = None, also=()) -> dict[str, str]:
        """ref -> short name over :meth:`everyone` and ``also`` (``given`` labels, then the user's
        names, win where they are unique)."""
        return short_names([*self.everyone(), *also], (given or {}) | load_names())


def short_names(refs, given: dict[str, str] | None = None) -> dict[str, str]:
    """ref -> the shortest trailing path components that tell ``refs`` apart (``arith/grpo-seed1``
    for ``/home/u/runs/arith/grpo-seed1``); a hub id as it is. ``given`` (ref -> label, e.g. the
    user's own or the demo's ``demo/sft``) is used where it names no other ref."""
    from analysis.checkpoints.open import is_hub_id

    refs = list(dict.fromkeys(r for r in refs if r))
    given = {k: v for k, v in (given or {}).items() if k in refs and v}
    taken = {}
    for r, lab in given.items():
        taken.setdefault(lab, []).append(r)
    out = {r: lab for r, lab in given.items() if len(taken[lab]) == 1}
    paths = {r: Path(r).parts for r in refs if r not in out and not is_hub_id(r)}
    for r in refs:
        if r not in out and r not in paths:
            out[r] = r  # a hub id
    for r, parts in paths.items():
        for k in range(1, len(parts) + 1):
            name = "/".join(parts[-k:]).lstrip("/") or "/"
            clash = [o for o, op in paths.items() if o != r and op[-k:] == parts[-k:]]
            if not clash and name not in out.values():
                out[r] = name
                break
        else:
            out[r] = r
    return out
