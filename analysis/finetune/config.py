"""The configuration of one masked fine-tuning run: the single source of the fine-tune options.

Each field declares its default, its help text and, where it has them, its choices and how the
CLI spells it (PEFT's config style: ``field(metadata={"help": ...})``); the CLI's ``finetune``
arguments are generated from these fields (:func:`analysis.cli.finetune.add_config_arguments`)
and the page's form takes its defaults and choices from them, so the three cannot disagree.
Types are checked by pydantic (strict: ``"3"`` is not a number of steps), the rest in
``__post_init__``."""

from __future__ import annotations

import functools
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from analysis.errors import SubnetscopeError
from analysis.definitions import BUDGETS, GRANULARITIES, PAPER_TOL  # noqa: F401 (re-exported)

TASKS = ("demo-sft", "demo-rl", "lm")
OPTIMIZERS = ("sparse", "reference")
SCHEDULES = ("static", "lisa")
LR_SCHEDULES = ("constant", "linear", "cosine")
DTYPES = ("float32", "bfloat16")
COMBINE = ("union", "intersect", "minus")  # plus "consensus:K"
SOURCES = ("mask", "selector", "diff", "random", "id3", "full", "lora")
# the demo's own RL training (analysis/families/demo.py: rl-seed1 from sft), the preset of a demo-rl run
LORA_LR_FACTOR = 10  # LoRA's own recipe: its usual tenfold learning rate over the full model's (arXiv 2106.09685)
def eval_every_for(steps: int) -> int:
    """The form's default evaluation interval: about ten evaluations per run (every step of a short one)."""
    return max(1, int(steps) // 10)


DEMO_RL_RECIPE = {"steps": 50, "lr": 1e-5, "batch_size": 16, "seed": 1, "eval_every": 10}


class FinetuneConfigError(SubnetscopeError):
    """A run configuration that cannot run, in one line."""


@dataclass
class FinetuneConfig:
    checkpoint: str = field(metadata={"help": "Checkpoint to fine-tune (a model directory)."})
    task: str = field(default="demo-sft", metadata={"choices": TASKS,
        "help": "demo-sft: supervised Q/A arithmetic of the demo family (metric: exact-match accuracy on its 256 "
                "held-out problems); demo-rl: the demo's policy gradient with exact-match reward (8 samples a "
                "prompt), as its RL runs were trained; lm: causal-LM loss on --data (metric: held-out loss and "
                "perplexity)."})
    data: str | None = field(default=None, metadata={"metavar": "FILE",
        "help": "lm task: a .txt (tokenized and cut into seq_len-token chunks) or .jsonl (text, or "
                "prompt+completion) file, or a dataset name when online; read only as far as the run needs "
                "(steps × batch size + 5 × eval samples sequences)."})
    seq_len: int = field(default=128, metadata={"help": "lm task: tokens per sequence at most."})
    eval_samples: int = field(default=64, metadata={
        "help": "lm task: sequences held out for the eval loss (at most a fifth of the data)."})
    reward_samples: int = field(default=8, metadata={
        "help": "Demo tasks: completions sampled per held-out problem in the final evaluation of the sampled "
                "reward (0: greedy accuracy only)."})
    # ---- the mask: exactly one source
    mask: list[str] | None = field(default=None, metadata={"source": True, "nargs": "+", "metavar": "M",
        "help": "Train only the elements of this mask file (several files: combined by mask_combine)."})
    mask_combine: str = field(default="union", metadata={"flag": "--combine", "metavar": "OP",
        "help": "How several mask files combine: union, intersect, minus (the first without the others), or "
                "consensus:K (selected by at least K)."})
    selector: str | None = field(default=None, metadata={"source": True, "metavar": "S",
        "help": "Train the top --density of this importance selector's scores (see `python -m analysis "
                "selectors`), calibrated on the task's data."})
    density: float | None = field(default=None, metadata={"fraction": True,
        "help": "Fraction of the blocks' weights a selector "
                "mask (or, structured, of the units) selects."})
    granularity: str | None = field(default=None, metadata={"choices": GRANULARITIES,
        "help": "Selector granularity: element, row, head, channel or layer (head/channel/layer: a structured "
                "S2FT-style mask of whole units)."})
    budget: str | None = field(default=None, metadata={"choices": BUDGETS,
        "help": "global top-k, per_layer top-k, or structured (whole units); default global for element "
                "scores, structured otherwise."})
    diff: list[str] | None = field(default=None, metadata={"source": True, "nargs": 2, "metavar": ("BASE", "TUNED"),
        "help": "Train only the elements changed between these two checkpoints [BASE, TUNED] (the RL subnetwork)."})
    diff_tol: float = field(default=PAPER_TOL, metadata={"tolerance": True, "help": "Tolerance τ of the diff mask."})
    random: float | None = field(default=None, metadata={"source": True, "fraction": True, "metavar": "D",
        "help": "Train a random mask of this density over the blocks' weight matrices (the control)."})
    id3: float | None = field(default=None, metadata={"source": True, "fraction": True, "metavar": "D",
        "help": "ID3 incremental unmasking to this density of the blocks' weights: the mask starts empty and "
                "grows linearly over the run, each step unmasking the elements of highest D3 = |g| / (|θ| + ε)^exp "
                "(Agarwal et al., TACL 2025)."})
    id3_exp: float = field(default=1.0, metadata={"help": "ID3: the exponent of |θ| + ε in D3 "
                                                          "(0: gradient magnitude)."})
    id3_eps: float = field(default=1e-3, metadata={"help": "ID3: the ε of D3."})
    full: bool = field(default=False, metadata={"source": True, "help": "Train every parameter (full fine-tuning)."})
    lora: int | None = field(default=None, metadata={"source": True, "metavar": "R",
        "help": "Train a LoRA of this rank on every attention and MLP projection (PEFT), merged at the end."})
    # ---- schedule
    schedule: str = field(default="static", metadata={"choices": SCHEDULES,
        "help": "static: the mask as built; lisa: every lisa_interval steps train only lisa_layers randomly "
                "sampled blocks of it (plus any embedding or head elements), as LISA (Pan et al., 2024)."})
    lisa_layers: int = field(default=2, metadata={"help": "LISA: blocks trained at a time."})
    lisa_interval: int = field(default=10, metadata={"help": "LISA: steps between resamplings."})
    # ---- optimization
    steps: int = field(default=50, metadata={
        "help": "Optimizer steps (with --resume: the total to reach; by default the saved run's)."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW, weight decay 0)."})
    lr_schedule: str = field(default="constant", metadata={"choices": LR_SCHEDULES,
        "help": "After warm-up: constant, linear decay to 0, or cosine decay to 0."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps (0: none)."})
    batch_size: int = field(default=32, metadata={
        "help": "Sequences per step (demo-rl: prompts per step), over all processes together."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, the sampling and the random mask."})
    eval_every: int = field(default=25, metadata={"help": "Evaluate every N steps (and at the end)."})
    save_every: int = field(default=0, metadata={
        "help": "Save a resumable state every N steps (0: at evaluations); always at a cancel."})
    optimizer: str = field(default="sparse", metadata={"choices": OPTIMIZERS,
        "help": "sparse: AdamW on compact fp32 copies of the masked elements; reference: full AdamW on "
                "gradients zeroed outside the mask."})
    dtype: str = field(default="float32", metadata={"choices": DTYPES,
        "help": "Weights during training: float32, or bfloat16 (the sparse optimizer's fp32 copies keep the "
                "small updates bf16 would round away). The final weights are saved in the checkpoint's dtype."})
    device: str = field(default="auto", metadata={"help": "auto (cuda when available), cpu or cuda."})

    def __post_init__(self) -> None:
        if isinstance(self.mask, str):
            self.mask = [self.mask]
        self._check_types()
        chosen = [s for s in SOURCES if (getattr(self, s) not in (None, False))]
        if len(chosen) != 1:
            raise FinetuneConfigError("choose exactly one of --mask, --selector, --diff, --random, --id3, --full, "
                                      f"--lora (got {', '.join(chosen) or 'none'})")
        if self.lora is not None and self.lora < 1:
            raise FinetuneConfigError(f"--lora rank must be ≥ 1, got {self.lora}")
        for name, allowed in (("task", TASKS), ("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("lr_schedule", LR_SCHEDULES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise FinetuneConfigError(f"unknown {name} {getattr(self, name)!r}; one of {', '.join(allowed)}")
        if self.task == "lm" and not self.data:
            raise FinetuneConfigError("the lm task needs --data (a .txt or .jsonl file, or a dataset name)")
        if self.mask is not None and not self.mask:
            raise FinetuneConfigError("--mask needs at least one mask file")
        if not (self.mask_combine in COMBINE or self.mask_combine.startswith("consensus:")):
            raise FinetuneConfigError(f"unknown mask_combine {self.mask_combine!r}; one of "
                                      f"{', '.join(COMBINE)}, consensus:K")
        if self.mask_combine.startswith("consensus:"):
            k = self.mask_combine.split(":", 1)[1]
            if not k.isdigit() or not 1 <= int(k) <= len(self.mask or [None]):
                raise FinetuneConfigError(f"mask_combine {self.mask_combine!r}: K must be 1 … the number of masks")
        if self.diff is not None and len(self.diff) != 2:
            raise FinetuneConfigError("--diff takes two checkpoints: BASE TUNED")
        for name in ("random", "id3", "density"):
            v = getattr(self, name)
            if v is not None and not 0 < v <= 1:
                raise FinetuneConfigError(f"--{name} density must be in (0, 1], got {v}")
        if self.selector is not None and self.density is None:
            raise FinetuneConfigError("--selector needs --density")
        if self.density is not None and self.selector is None:
            raise FinetuneConfigError("--density goes with --selector")
        if self.id3 is not None and self.optimizer != "sparse":
            raise FinetuneConfigError("ID3's growing mask needs the sparse optimizer")
        if self.schedule == "lisa" and (self.lora is not None or self.id3 is not None):
            raise FinetuneConfigError("the LISA schedule samples blocks of a fixed mask; it does not apply to "
                                      f"{'LoRA' if self.lora is not None else 'ID3'}")
        for name in ("steps", "batch_size", "eval_every", "lisa_layers", "lisa_interval", "seq_len"):
            if getattr(self, name) < 1:
                raise FinetuneConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "eval_samples", "reward_samples"):
            if getattr(self, name) < 0:
                raise FinetuneConfigError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneConfigError(f"lr must be a finite number > 0, got {self.lr}")
        for name in ("diff_tol", "id3_exp", "id3_eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise FinetuneConfigError(f"{name} must be a finite number ≥ 0, got {v}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise FinetuneConfigError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")

    def _check_types(self) -> None:
        """One line for a value of the wrong type (e.g. ``"steps": "3"`` in a hand-edited config.json),
        checked by pydantic in strict mode (no coercion: a bool is not an int, a string not a list)."""
        from pydantic import ValidationError

        for f in fields(self):
            adapter, kind = _type_checks()[f.name]
            try:
                adapter.validate_python(getattr(self, f.name), strict=True)
            except ValidationError:
                raise FinetuneConfigError(f"{f.name} must be {kind}, got {getattr(self, f.name)!r}") from None

    @property
    def source(self) -> str:
        """Which mask source: mask, selector, diff, random, id3, full or lora."""
        return next(s for s in SOURCES if getattr(self, s) not in (None, False))

    @property
    def mask_source(self) -> str:
        """The mask source in words, e.g. ``random density=0.05 seed=0``."""
        lisa = f" + LISA {self.lisa_layers} layers/{self.lisa_interval} steps" if self.schedule == "lisa" else ""
        s = self.source
        if s == "full":
            text = "full"
        elif s == "lora":
            text = f"lora r={self.lora}"
        elif s == "mask":
            text = (f"mask {self.mask[0]}" if len(self.mask) == 1
                    else f"mask {self.mask_combine} of {', '.join(self.mask)}")
        elif s == "selector":
            text = (f"selector {self.selector} density={self.density:g}"
                    + (f" {self.granularity}" if self.granularity else "") + (f" {self.budget}" if self.budget else ""))
        elif s == "diff":
            text = f"diff {self.diff[0]} -> {self.diff[1]} tol={self.diff_tol:g}"
        elif s == "id3":
            text = f"id3 density={self.id3:g} exp={self.id3_exp:g}"
        else:
            text = f"random density={self.random:g} seed={self.seed}"
        return text + lisa

    def to_dict(self) -> dict:
        return asdict(self)

    def with_absolute_paths(self) -> FinetuneConfig:
        """This configuration with each local path it names (the checkpoint, mask files, the diff's
        checkpoints, the lm data file) made absolute, so that a run's ``config.json`` names the same
        files from any working directory (a relative ``ck/sft`` would later be taken for a hub id);
        a hub id or a dataset name, which names nothing on disk, stays as given."""
        def local(ref):
            p = Path(ref).expanduser()
            return os.path.abspath(p) if p.exists() else ref

        return replace(self, checkpoint=local(self.checkpoint), data=None if self.data is None else local(self.data),
                       mask=None if self.mask is None else [local(m) for m in self.mask],
                       diff=None if self.diff is None else [local(r) for r in self.diff])

    @classmethod
    def from_dict(cls, d: dict) -> FinetuneConfig:
        """From ``config.json`` (unknown keys are an error, missing ones take their defaults)."""
        if not isinstance(d, dict):
            raise FinetuneConfigError("a run configuration is a JSON object")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise FinetuneConfigError(f"unknown configuration key {unknown[0]!r}")
        if "checkpoint" not in d:
            raise FinetuneConfigError("the configuration names no checkpoint")
        return cls(**d)

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text (the page's tooltips)."""
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}

    @classmethod
    def defaults(cls) -> dict:
        """Field name -> default value, for every field that has one (the CLI's and the page's)."""
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}


@functools.cache
def _type_checks() -> dict:
    """Field name -> (pydantic TypeAdapter of its annotation, the type in words)."""
    from pydantic import TypeAdapter

    hints = typing.get_type_hints(FinetuneConfig)
    return {f.name: (TypeAdapter(hints[f.name]), str(f.type).replace(" | None", "")) for f in fields(FinetuneConfig)}
