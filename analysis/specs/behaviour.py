"""``behaviour``: how a fine-tune moved its outputs — per-token KL(p_tuned ‖ p_base) over the whole
vocabulary at every position of each prompt, the tokens that rose and fell most, and the dataset's
KL distribution (docs/design.md §15)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from analysis.specs.base import Spec
from analysis.specs.common import DEVICE_HELP, parameters_of
from analysis.specs.results import BehaviourResult


@dataclass(frozen=True)
class BehaviourParams:
    base: str = field(metadata={"positional": True, "help": "the checkpoint fine-tuned from"})
    tuned: str = field(metadata={"positional": True, "help": "the fine-tune"})
    prompt: tuple[str, ...] | None = field(default=None, metadata={
        "action": "append", "metavar": "TEXT", "pair": True, "help": "a prompt (repeat for more)"})
    prompts: str | None = field(default=None, metadata={
        "metavar": "FILE", "help": "a .txt (one per line) or .jsonl ('prompt' field) file; demo: the demo "
                                   "task's 256 held-out problems"})
    top: int = field(default=10, metadata={"help": "tokens that rose / fell to report (default 10)"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP + " (cuda: bf16 weights, fp32 log-softmax)"})

    def __post_init__(self):
        from analysis.behaviour.prompts import PromptsError, gather

        if self.prompt is not None:
            object.__setattr__(self, "prompt", tuple(self.prompt))
        if not (isinstance(self.top, int) and 1 <= self.top <= 1000):
            raise PromptsError(f"--top must be a whole number from 1 to 1000, got {self.top}")
        gather(self.prompt, self.prompts)  # no prompts, an empty one, a bad file: one line before any model

    @property
    def texts(self) -> list[str]:
        from analysis.behaviour.prompts import gather

        return gather(self.prompt, self.prompts)


def run(p: BehaviourParams, progress) -> dict:
    from analysis.behaviour.kl import behaviour

    return behaviour(p.base, p.tuned, p.texts, top=p.top, device=p.device, progress=progress)


def report(p: BehaviourParams, d: dict) -> None:
    q = d["kl_quantiles"]
    print(f"{d['tuned']} vs {d['base']}: {len(d['prompts'])} prompt(s), {d['positions']:,} positions on {d['device']}")
    print(f"  mean KL(tuned ‖ base) {d['kl_mean']:.4g} nats per token; per prompt median {q['median']:.4g} "
          f"(min {q['min']:.4g}, max {q['max']:.4g})")
    for r in d["prompts"][:5]:
        print(f"  {r['prompt'][:40]!r}: mean {r['kl_mean']:.4g}, max {r['kl_max']:.4g}")
    if d["rose"]:
        print("  rose most often: " + ", ".join(f"{t['token']!r} ×{t['positions']}" for t in d["rose"][:8]))
    if d["fell"]:
        print("  fell most often: " + ", ".join(f"{t['token']!r} ×{t['positions']}" for t in d["fell"][:8]))


def _prompt_count(p: BehaviourParams) -> int:
    return len(p.texts)


SPEC = Spec("behaviour", "per-token KL of TUNED against BASE on prompts, and the tokens that moved", BehaviourParams,
            run, report, refs=lambda p: [p.base, p.tuned],
            cost=lambda p: 2 * parameters_of(p.base) * max(1, math.ceil(_prompt_count(p) / 16)),
            data=lambda p: [p.prompts] if p.prompts and p.prompts != "demo" else [],
            loads_model=True, result=BehaviourResult)
