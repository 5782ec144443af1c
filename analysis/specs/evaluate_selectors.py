"""``evaluate-selectors``: how several selectors agree, and how well each predicts the elements a real
fine-tune changed (docs/design.md §6)."""

from __future__ import annotations

from dataclasses import dataclass, field

from analysis.specs.common import ratio, tolerance
from analysis.definitions import PAPER_TOL
from analysis.specs.base import Spec
from analysis.specs.results import EvaluateResult
from analysis.specs.common import parameters_of
from analysis.specs.importance import CalibrationParams, calibration, check_numbers


@dataclass(frozen=True)
class EvaluateParams(CalibrationParams):
    selectors: str = field(default=None, metadata={
        "required": True, "help": "comma-separated names, e.g. magnitude,wanda,fisher; an empty, unknown or "
                                  "repeated name is refused (each selector once)"})
    against_diff: tuple[str, str] | None = field(default=None, metadata={
        "nargs": 2, "metavar": ("BASE", "TUNED"), "pair": True, "help": "the fine-tune whose changes to predict"})
    tol: float = field(default=PAPER_TOL, metadata={"type": tolerance, "help": f"tolerance τ (default {PAPER_TOL:g})"})
    density: float = field(default=None, metadata={"required": True,
                                                    "help": "top-k density of the Jaccard, in (0, 1]"})
    stability: bool = field(default=False, metadata={"help": "also rescore on a disjoint calibration set"})

    def __post_init__(self):
        from analysis.importance.evaluation import check_selectors

        if self.against_diff is not None:
            object.__setattr__(self, "against_diff", tuple(self.against_diff))
        check_selectors(self.names, self.against_diff)
        check_numbers(self)

    @property
    def names(self) -> list[str]:
        return [n.strip() for n in (self.selectors or "").split(",")]


def run(p: EvaluateParams, progress) -> dict:
    import dataclasses

    from analysis.checkpoints.models import load_model
    from analysis.importance.evaluation import check_selectors, evaluate_selectors
    from analysis.importance.scores import calibration_length
    from analysis.jobs.progress import Progress

    entries = check_selectors(p.names, p.against_diff)
    model, tokenizer = load_model(p.checkpoint, device=p.device)
    q = dataclasses.replace(p, seq_len=calibration_length(model.config, p.seq_len, where=p.checkpoint))
    who = [n for n, e in entries.items() if e.needs_data]
    batches = calibration(q, tokenizer, who) if who else None
    held_out = calibration(q, tokenizer, who, offset=p.samples) if who and p.stability else None
    enabled, file = (progress.enabled, progress.file) if isinstance(progress, Progress) else (False, None)
    res = evaluate_selectors(model, p.names, batches=batches, held_out=held_out, density=p.density, scope=p.scope,
                             seed=p.seed, against_diff=list(p.against_diff) if p.against_diff else None, tol=p.tol,
                             progress_for=lambda n: Progress(n, enabled, file))
    return {"schema": "subnetscope.evaluate-selectors/1", "checkpoint": p.checkpoint, "selectors": p.names,
            "density": p.density, "scope": p.scope,
            "data": p.data if who else None, "samples": p.samples if who else None, **res}


def report(p: EvaluateParams, out: dict) -> None:
    names = p.names
    if out["agreement"]:
        print("Spearman / top-k Jaccard:")
        for i, a in enumerate(names):
            print("  " + a.ljust(18) + "  ".join(f"{out['agreement']['spearman'][i][j] or 0:+.2f}/"
                                                 f"{out['agreement']['jaccard'][i][j] or 0:.2f}"
                                                 for j in range(len(names))))
    for q in out.get("prediction") or []:
        print(f"  {q['selector']:<18} precision@k {ratio(q['precision_at_k'])} (chance {q['base_rate']:.3f})  "
              f"AUROC {ratio(q['auroc'])}" + (f"  ({q['note']})" if q.get("note") else ""))
    for n, j in (out["stability"] or {}).items():
        print(f"  {n:<18} stability (top-k Jaccard across disjoint data) {j:.3f}")


def cost(p: EvaluateParams) -> int:
    """Parameters touched: the model once per data-free selector, once per calibration sample for each
    selector that reads data (twice with --stability), and the diff's pair."""
    from analysis.importance.selectors import SELECTORS

    passes = sum(p.samples * (2 if p.stability else 1) if SELECTORS[n].needs_data else 1 for n in p.names)
    return parameters_of(p.checkpoint) * passes + (parameters_of(p.against_diff[0]) if p.against_diff else 0)


SPEC = Spec("evaluate-selectors", "agreement of selectors, and how well they predict a real update", EvaluateParams,
            run, report, refs=lambda p: [p.checkpoint, *(p.against_diff or ())],
            cost=cost, data=lambda p: [p.data], loads_model=True,
            result=EvaluateResult)
