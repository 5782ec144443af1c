"""What a patched model is scored on, and the recovered gain (docs/design.md §15).

An evaluation is written as text (:func:`parse_eval`):

- ``demo``: greedy exact-match accuracy on the demo task's 256 held-out problems, exactly as the demo
  manifest scores its models (``accuracy``);
- ``reward``: the demo task's sampled reward (temperature 1, 4 samples a problem, seed 0), as the RL runs
  were rewarded (``reward``);
- ``kl:FILE``: on a prompts file (:mod:`analysis.behaviour.prompts`; ``kl:demo`` for the held-out
  prompts), the mean per-token KL(p_tuned ‖ p_patched) (``kl_to_tuned``) and KL(p_patched ‖ p_base)
  (``kl_to_base``);
- ``lm:FILE``: mean next-token loss (nats) and perplexity on a text file's first 64 sequences (the
  calibration reader: a ``.txt`` line or a ``.jsonl`` record each, 128 tokens at most; ``lm:demo`` the
  demo task's Q/A texts) (``loss``, ``perplexity``).

Recovered gain of a metric m: (m(patched) − m(θ⁰)) / (m(θ¹) − m(θ⁰)), None (undefined) when m(θ¹) = m(θ⁰).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from analysis.behaviour.patch import PatchError
from analysis.errors import quoted

EVALS = ("demo", "reward", "kl:FILE", "lm:FILE")
REWARD_SAMPLES = 4


@dataclass(frozen=True)
class EvalSpec:
    text: str
    what: str  # demo | reward | kl | lm
    path: str | None = None

    @property
    def primary(self) -> str:
        return {"demo": "accuracy", "reward": "reward", "kl": "kl_to_tuned", "lm": "loss"}[self.what]


def parse_eval(text: str) -> EvalSpec:
    s = str(text).strip()
    head, colon, rest = s.partition(":")
    if s in ("demo", "reward"):
        return EvalSpec(s, s)
    if head in ("kl", "lm") and colon and rest.strip():
        return EvalSpec(s, head, rest.strip())
    raise PatchError(f"--eval {quoted(s)}: unknown evaluation; one of {', '.join(EVALS)}")


def recovered(patched: float | None, base: float | None, tuned: float | None) -> float | None:
    """(m(patched) − m(base)) / (m(tuned) − m(base)); None when the tune did not move m (or a value is missing)."""
    if patched is None or base is None or tuned is None or tuned == base:
        return None
    return (patched - base) / (tuned - base)


class Evaluator:
    """Scores the model a :class:`~analysis.behaviour.patch.Patcher` holds on the evaluations asked
    for; the tune's and the base's values (and the log-probabilities the KL needs) are taken once, by
    patching everything and nothing (:meth:`references`)."""

    def __init__(self, patcher, tokenizer, specs: list[EvalSpec]):
        self.patcher, self.tokenizer, self.specs = patcher, tokenizer, specs
        self._lp: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._prompts: dict[str, list[str]] = {}
        self._lm: dict[str, list] = {}
        for s in specs:
            if s.what in ("demo", "reward"):
                from analysis.attribution.prompts import is_demo_tokenizer

                if not is_demo_tokenizer(patcher.pair.base.path):
                    raise PatchError(f"--eval {s.text}: the demo task's evaluation needs a checkpoint of the demo "
                                     "family (its character tokenizer)")
            if s.what == "kl":
                from analysis.behaviour.kl import encode
                from analysis.behaviour.prompts import read_prompts

                self._prompts[s.text] = prompts = read_prompts(s.path)
                encode(tokenizer, prompts)  # a prompt that tokenizes to nothing: one line, before any work
            if s.what == "lm":
                from analysis.importance.calibration import CalibrationError, calibration_batches

                try:
                    self._lm[s.text] = calibration_batches(s.path, tokenizer, samples=64, seq_len=128, batch_size=8,
                                                           text_mode="lines")  # a .txt: one sequence per line
                except CalibrationError as e:
                    raise PatchError(f"--eval {s.text}: {e}") from None

    def prompts_of(self, text: str) -> list[str]:
        return self._prompts[text]

    def tuned_log_probs(self, text: str) -> list[torch.Tensor]:
        """The tune's log-probabilities on a ``kl:`` evaluation's prompts (after :meth:`references`)."""
        return self._lp[text]["tuned"]

    def lm_batches(self, text: str) -> list:
        return self._lm[text]

    @property
    def model(self):
        return self.patcher.model

    def _log_probs(self, text: str) -> list[torch.Tensor]:
        from analysis.behaviour.kl import iter_log_probs

        prompts = self._prompts[text]
        out: list = [None] * len(prompts)
        for i, lp in iter_log_probs(self.model, self.tokenizer, prompts):
            out[i] = lp.cpu()
        return out

    @torch.no_grad()
    def score(self) -> dict:
        """Every evaluation's metrics of the model as it is now."""
        from analysis.behaviour.kl import token_kl

        out: dict = {}
        for s in self.specs:
            if s.what == "demo":
                from analysis.families.demo_task import evaluate, split_problems

                out["accuracy"] = evaluate(self.model, split_problems()[1])
            elif s.what == "reward":
                from analysis.families.demo_task import sampled_rewards, split_problems

                out["reward"] = float(sampled_rewards(self.model, split_problems()[1], REWARD_SAMPLES).mean())
            elif s.what == "kl":
                ref = self._lp.get(s.text)
                lp = self._log_probs(s.text)
                if ref is None:  # references() is taking the tune's and the base's
                    out["_lp_" + s.text] = lp
                    continue
                to_t = torch.cat([token_kl(t, p) for t, p in zip(ref["tuned"], lp)])
                to_b = torch.cat([token_kl(p, b) for p, b in zip(lp, ref["base"])])
                out["kl_to_tuned"], out["kl_to_base"] = float(to_t.mean()), float(to_b.mean())
            elif s.what == "lm":
                dev = next(self.model.parameters()).device
                total, count = 0.0, 0
                for b in self._lm[s.text]:
                    logits = self.model(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev),
                                        use_cache=False).logits.float()
                    labels = b["labels"].to(dev)[:, 1:]
                    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels,
                                                            ignore_index=-100, reduction="sum")
                    total += float(nll)
                    count += int((labels != -100).sum())
                out["loss"] = total / max(count, 1)
                out["perplexity"] = math.exp(min(out["loss"], 700.0))
        return out

    def references(self) -> tuple[dict, dict]:
        """(the tune's metrics, the base's metrics), by patching all and none."""
        everything = {k: True for k in self.patcher.pair.shapes}
        self.patcher.apply(everything)
        tuned = self.score()
        self.patcher.undo()
        base = self.score()
        for s in self.specs:
            if s.what == "kl":
                self._lp[s.text] = {"tuned": tuned.pop("_lp_" + s.text), "base": base.pop("_lp_" + s.text)}
                tuned["kl_to_tuned"], base["kl_to_base"] = 0.0, 0.0
                t = torch.cat([token_kl(a, b) for a, b in zip(self._lp[s.text]["tuned"], self._lp[s.text]["base"])])
                tuned["kl_to_base"] = base["kl_to_tuned"] = float(t.mean())
        self.tuned_metrics, self.base_metrics = tuned, base
        return tuned, base

    def recovered(self, metrics: dict) -> dict:
        return {k: recovered(v, self.base_metrics.get(k), self.tuned_metrics.get(k)) for k, v in metrics.items()}

    @property
    def primary(self) -> str:
        return self.specs[0].primary


def token_kl(a, b):
    from analysis.behaviour.kl import token_kl as kl

    return kl(a, b)
