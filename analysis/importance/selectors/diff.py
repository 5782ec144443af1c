"""The diff selector: the elements a real fine-tune changed (the RL subnetwork of Mukherjee et al.,
*Reinforcement Learning Finetunes Small Subnetworks in Large Language Models*, arXiv 2505.11711).

Score 1 where base and tuned differ at tolerance τ (docs/design.md §3, through
:func:`analysis.sparsity.diff.diff_checkpoints`, streaming), or where a saved mask is set; 0 elsewhere.
Checkpoint names are matched to the model's parameter names after prefix normalization;
parameters the diff or mask does not cover score 0 and are listed in ``info["missing"]``.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, SelectorError, align_names, make_scores, parameters
from analysis.definitions import PAPER_TOL


def score(model, batches=None, *, seed: int = 0, progress=None, base=None, tuned=None,
          tol: float = PAPER_TOL, mask=None) -> Scores:
    """Changed elements of ``base`` → ``tuned``, or of a mask file, as 0/1 scores.

    Args:
        model (nn.Module): the model whose parameters are scored (usually ``base`` or ``tuned``
            loaded); only its names and shapes are read.
        batches: ignored (data-free).
        seed (int): ignored (deterministic).
        progress (callable, optional): ``progress(done_elements, total_elements, name)`` of the diff.
        base (str or Checkpoint, optional): θ⁰.
        tuned (str or Checkpoint, optional): θ¹.
        tol (float): τ of the diff. Default: ``PAPER_TOL`` (the paper's).
        mask (str or Path, optional): a Subnetscope mask file, instead of base and tuned.
    Returns:
        Scores: ``element`` granularity, 1.0 on changed (or masked) elements, else 0.0.
    """
    if (mask is None) == (base is None or tuned is None):
        raise SelectorError("diff: give either base and tuned checkpoints, or a mask file")
    changed: dict[str, torch.Tensor] = {}
    if mask is not None:
        from analysis.sparsity.masks import load_mask

        changed = load_mask(mask)
        source = f"mask {mask}"
    else:
        from analysis.sparsity.diff import diff_checkpoints

        diff_checkpoints(base, tuned, tol=tol, progress=progress,
                         on_mask=lambda name, m: changed.__setitem__(name, m))
        source = f"diff {base} → {tuned} tol={tol:g}"
    params = parameters(model)
    matched, missing, extra = align_names(changed, list(params))
    values = {n: torch.zeros(p.shape) for n, p in params.items()}
    for src, name in matched.items():
        got, want = tuple(changed[src].shape), tuple(params[name].shape)
        if got == want:
            values[name] = changed[src].float()
        elif len(got) == len(want) and got[1:] == want[1:] and got[0] <= want[0]:
            values[name][:got[0]] = changed[src].float()  # resized vocabulary: the shared rows
        else:
            raise SelectorError(f"diff: {src} has shape {got}, the model's {name} {want}")
    return make_scores("diff", "element", values, model, source=source, missing=missing, extra=extra)
