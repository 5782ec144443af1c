"""The configuration of one masked fine-tuning run. Field help texts are meant for the CLI and
the page's form (PEFT's config style: ``field(metadata={"help": ...})``, checks in
``__post_init__``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from analysis.errors import SubnetscopeError

TASKS = ("demo-sft", "demo-rl")
OPTIMIZERS = ("sparse", "reference")


class FinetuneConfigError(SubnetscopeError):
    """A run configuration that cannot run, in one line."""


@dataclass
class FinetuneConfig:
    checkpoint: str = field(metadata={"help": "Checkpoint to fine-tune (a model directory)."})
    task: str = field(default="demo-sft", metadata={
        "help": "demo-sft: supervised Q/A arithmetic of the demo family; demo-rl: the demo's policy gradient "
                "with exact-match reward (8 samples a prompt), as its RL runs were trained. Metric: exact-match "
                "accuracy on the 256 held-out problems."})
    mask: str | None = field(default=None, metadata={"help": "Train only the elements of this mask file."})
    diff: list[str] | None = field(default=None, metadata={
        "help": "Train only the elements changed between these two checkpoints [BASE, TUNED] (the RL subnetwork)."})
    diff_tol: float = field(default=1e-5, metadata={"help": "Tolerance τ of the diff mask."})
    random: float | None = field(default=None, metadata={
        "help": "Train a random mask of this density over the blocks' weight matrices (the control)."})
    full: bool = field(default=False, metadata={"help": "Train every parameter (full fine-tuning)."})
    lora: int | None = field(default=None, metadata={
        "help": "Train a LoRA of this rank on every attention and MLP projection (PEFT), merged at the end."})
    steps: int = field(default=50, metadata={"help": "Optimizer steps."})
    lr: float = field(default=1e-4, metadata={"help": "Peak learning rate (AdamW, weight decay 0)."})
    batch_size: int = field(default=32, metadata={"help": "Sequences per step (demo-rl: prompts per step)."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear learning-rate warm-up steps (0: constant)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order and the random mask."})
    eval_every: int = field(default=25, metadata={"help": "Evaluate every N steps (and at the end)."})
    optimizer: str = field(default="sparse", metadata={
        "help": "sparse: AdamW on compact fp32 copies of the masked elements; reference: full AdamW on "
                "gradients zeroed outside the mask."})

    def __post_init__(self) -> None:
        sources = [self.mask is not None, self.diff is not None, self.random is not None, self.full,
                   self.lora is not None]
        if sum(sources) != 1:
            raise FinetuneConfigError("choose exactly one of --mask, --diff, --random, --full, --lora")
        if self.lora is not None and self.lora < 1:
            raise FinetuneConfigError(f"--lora rank must be ≥ 1, got {self.lora}")
        if self.task not in TASKS:
            raise FinetuneConfigError(f"unknown task {self.task!r}; one of {', '.join(TASKS)}")
        if self.optimizer not in OPTIMIZERS:
            raise FinetuneConfigError(f"unknown optimizer {self.optimizer!r}; one of {', '.join(OPTIMIZERS)}")
        if self.diff is not None and len(self.diff) != 2:
            raise FinetuneConfigError("--diff takes two checkpoints: BASE TUNED")
        if self.random is not None and not 0 < self.random <= 1:
            raise FinetuneConfigError(f"--random density must be in (0, 1], got {self.random}")
        for name in ("steps", "batch_size", "eval_every"):
            if getattr(self, name) < 1:
                raise FinetuneConfigError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise FinetuneConfigError(f"lr must be > 0, got {self.lr}")

    @property
    def mask_source(self) -> str:
        if self.full:
            return "full"
        if self.lora is not None:
            return f"lora r={self.lora}"
        if self.mask is not None:
            return f"mask {self.mask}"
        if self.diff is not None:
            return f"diff {self.diff[0]} -> {self.diff[1]} tol={self.diff_tol:g}"
        return f"random density={self.random:g} seed={self.seed}"

    def to_dict(self) -> dict:
        return asdict(self)
