"""``importance``: one selector's scores of a checkpoint's parameters, aggregated, and its mask
(docs/design.md §6).

Bad input is one line, before the model is loaded: a density outside (0, 1], a count below its
minimum, an ``--option`` the selector does not declare, of the wrong type, given twice or set by a
flag of the command (``seed`` -> ``--seed``); before any scoring, a ``--seq-len`` beyond the model's
positions or calibration data the selector cannot use.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from analysis.definitions import BUDGETS, GRANULARITIES
from analysis.errors import SubnetscopeError
from analysis.specs.base import Spec
from analysis.specs.results import ImportanceResult
from analysis.specs.common import DEVICE_HELP, parameters_of

# What `importance` sets by a flag of its own: as an --option it is refused, never passed twice.
FLAGS = {"seed": "--seed", "granularity": "--granularity", "samples": "--samples", "seq_len": "--seq-len",
         "batch_size": "--batch-size", "data": "--data", "device": "--device", "scope": "--scope",
         "density": "--density", "budget": "--budget"}
FIXED = {**FLAGS, **{k.replace("_", "-"): v for k, v in FLAGS.items()}}
MINIMUM = (("samples", 1), ("seq_len", 2), ("batch_size", 1))  # calibration_batches' minimums


SCHEMA = "subnetscope.importance/1"


class ImportanceArgsError(SubnetscopeError):
    """A flag of ``importance`` or ``evaluate-selectors`` out of its range, in one line."""


@dataclass(frozen=True)
class CalibrationParams:
    """What ``importance`` and ``evaluate-selectors`` share: the checkpoint scored and its calibration."""

    checkpoint: str = field(metadata={"positional": True, "help": "the checkpoint whose parameters are scored"})
    data: str = field(default="demo", metadata={
        "help": "demo (the arithmetic task), a .txt/.jsonl file, or a dataset name"})
    samples: int = field(default=32, metadata={"help": "calibration sequences (default 32)"})
    seq_len: int | None = field(default=None, metadata={
        "help": "tokens per sequence at most (default 64, or the model's positions when fewer)"})
    batch_size: int = field(default=8, metadata={"help": "sequences per forward"})
    device: str = field(default="auto", metadata={"help": DEVICE_HELP})
    seed: int = field(default=0, metadata={"help": "seed of the data and of random selectors"})
    scope: str = field(default="blocks", metadata={
        "choices": ("blocks", "all"),
        "help": "blocks: the attention and MLP matrices of the transformer blocks; all: every parameter"})


def check_numbers(p) -> None:
    """The density and the calibration sizes are in range (argparse has read their type only)."""
    d = p.density
    if d is not None and not (math.isfinite(d) and 0 < d <= 1):
        raise ImportanceArgsError(f"--density must be a fraction in (0, 1], got {d:g}")
    for name, low in MINIMUM:
        value = getattr(p, name)
        if value is not None and value < low:
            raise ImportanceArgsError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")


def calibration(p, tokenizer, who: list[str], offset: int = 0):
    """The calibration batches of ``p.data`` for the selectors ``who``; data that cannot be used is
    one line naming them and the problem."""
    from analysis.importance.calibration import CalibrationError, calibration_batches

    what = f"{', '.join(who)} {'needs' if len(who) == 1 else 'need'} calibration data (--data {p.data})"
    if tokenizer is None:
        raise ImportanceArgsError(f"{what}, and {p.checkpoint} has no tokenizer")
    try:
        return calibration_batches(p.data, tokenizer, samples=p.samples, seq_len=p.seq_len,
                                   batch_size=p.batch_size, offset=offset, seed=p.seed)
    except CalibrationError as e:
        raise ImportanceArgsError(f"{what}: {e}") from None


def options(pairs) -> dict[str, str]:
    from analysis.specs.common import options as parse_pairs

    return parse_pairs(list(pairs or ()))


@dataclass(frozen=True)
class ImportanceParams(CalibrationParams):
    selector: str = field(default=None, metadata={"required": True, "help": "the selector (see `selectors`)"})
    granularity: str | None = field(default=None, metadata={"choices": GRANULARITIES,
                                                            "help": "element, row, head, channel or layer"})
    option: tuple[str, ...] | None = field(default=None, metadata={
        "action": "append", "metavar": "KEY=VALUE", "pair": True,
        "help": "a selector option (see `selectors`), each at most once, its value of the type the selector "
                "declares; what a flag of this command sets (seed, granularity, samples ...) is refused here"})
    density: float | None = field(default=None, metadata={
        "help": "select this fraction of the scope, in (0, 1], as a mask"})
    budget: str | None = field(default=None, metadata={
        "choices": BUDGETS, "help": "global top-k, per-layer uniform top-k, or whole heads/channels/layers"})
    mask_out: str | None = field(default=None, metadata={
        "metavar": "M", "help": "write the selected elements as a mask file (needs --density)"})
    scores_out: str | None = field(default=None, metadata={"metavar": "S",
                                                           "help": "write the raw scores as safetensors"})

    def __post_init__(self):
        from analysis.importance.selectors import get_selector, parse_options

        if self.option is not None:
            object.__setattr__(self, "option", tuple(self.option))
        if self.mask_out and self.density is None:
            raise ImportanceArgsError("--mask-out needs --density")
        get_selector(self.selector)
        check_numbers(self)
        parse_options(self.selector, options(self.option), fixed=FIXED)

    @property
    def parsed_options(self) -> dict:
        from analysis.importance.selectors import parse_options

        return parse_options(self.selector, options(self.option), fixed=FIXED)


def run(p: ImportanceParams, progress) -> dict:
    from analysis.checkpoints.models import load_model
    from analysis.specs.common import plain
    from analysis.importance.scores import calibration_length, compute_scores, scores_to_mask, summarize
    from analysis.importance.selectors import get_selector
    from analysis.io import write_atomic
    from analysis.sparsity.masks import count, save_mask

    opts = p.parsed_options
    model, tokenizer = load_model(p.checkpoint, device=p.device)
    seq_len = calibration_length(model.config, p.seq_len, where=p.checkpoint)
    q = dataclasses.replace(p, seq_len=seq_len)
    batches = calibration(q, tokenizer, [p.selector]) if get_selector(p.selector).needs_data else None
    scores = compute_scores(model, p.selector, batches, granularity=p.granularity, seed=p.seed, progress=progress,
                            **opts)
    out = {"schema": SCHEMA, "checkpoint": p.checkpoint, **summarize(scores, scope=p.scope),
           "data": p.data if batches else None, "samples": p.samples if batches else None,
           "seq_len": seq_len if batches else None, "options": opts, "info": plain(scores.info)}
    if p.density is not None:
        mask = scores_to_mask(scores, p.density, budget=p.budget, scope=p.scope)
        k, n = count(mask)
        out["mask"] = {"density": p.density, "budget": p.budget or "default", "selected": k, "elements": n,
                       "file": p.mask_out}
        if p.mask_out:
            save_mask(p.mask_out, mask, source=f"{p.selector} {scores.granularity} density={p.density} "
                                               f"scope={p.scope} of {p.checkpoint}")
    if p.scores_out:
        from safetensors.torch import save

        values = scores.values if isinstance(scores.values, dict) else {scores.granularity: scores.values}
        write_atomic(p.scores_out, save({k: v.contiguous() for k, v in values.items()},
                                        metadata={"selector": p.selector, "granularity": scores.granularity}))
    return out


def report(p: ImportanceParams, out: dict) -> None:
    print(f"{p.selector} on {p.checkpoint}: {out['granularity']} scores, scope {p.scope}")
    for row in out.get("layers") or []:
        if isinstance(row, dict):
            print(f"  layer {row['layer']:>3}  mean {row['mean']:.4g}  sum {row['sum']:.4g}")
    if "mask" in out:
        print(f"  mask: {out['mask']['selected']:,} of {out['mask']['elements']:,} elements selected")


def _refs(p: ImportanceParams) -> list[str]:
    opts = options(p.option)
    return [p.checkpoint, *(opts[k] for k in ("base", "tuned") if k in opts)]


def _data(p: ImportanceParams) -> list[str]:
    opts = options(p.option)
    return [p.data, *([opts["mask"]] if "mask" in opts else [])]


def cost(p: ImportanceParams) -> int:
    """Parameters touched: the model once, or once per calibration sample for a selector that reads data."""
    from analysis.importance.selectors import SELECTORS

    entry = SELECTORS.get(p.selector)
    return parameters_of(p.checkpoint) * (p.samples if entry is not None and entry.needs_data else 1)


SPEC = Spec("importance", "importance scores of a checkpoint's parameters by one selector", ImportanceParams, run,
            report, refs=_refs, cost=cost, data=_data,
            outputs=("mask_out", "scores_out"), loads_model=True,
            result=ImportanceResult)
