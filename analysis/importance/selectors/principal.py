"""Principal weights: |(U_k Σ_k V_kᵀ)ᵢⱼ|, the magnitude of each element in the best rank-k
approximation of its matrix ("The Path Not Taken: RLVR Provably Learns Off the Principals",
arXiv 2511.08567: SFT writes to the principal weights, RL avoids them). Data-free.

Scored: the 2-D weights of the transformer blocks' linear layers (the matrices the geometry view
measures); embeddings, norms and biases are left unscored (``info["unscored"]``). The top-k
triplets come from :func:`analysis.sparsity.geometry.spectrum_top_k` (a full SVD up to min(m, n) = 1024,
randomized beyond, its error stated per matrix in ``info["svd_error"]``). The score does not
depend on how a layer stores its matrix (a Conv1D's [in, out] is the transpose: the same
elements score the same).

Cost: one SVD per block matrix, no model passes.
"""

from __future__ import annotations

import torch

from analysis.importance.selectors.base import Scores, SelectorError, linear_modules, make_scores, parameters, scoring
from analysis.checkpoints.structure import layer_index


def score(model, batches=None, *, seed: int = 0, progress=None, k: float | int | None = None) -> Scores:
    """Principal-weight scores of every block matrix.

    Args:
        model (nn.Module): the model (read only).
        batches: ignored (data-free).
        seed (int): ignored (the randomized SVD of large matrices is seeded itself).
        progress (callable, optional): ``progress(done, total, "principal")`` per matrix.
        k: the rank of the approximation: a count, or a fraction of each matrix's rank in (0, 1).
            Default: 1% of the rank, at least 1.
    Returns:
        Scores: ``element`` granularity, ``|U_k Σ_k V_kᵀ|`` per scored matrix.
    """
    from analysis.errors import SubnetscopeError
    from analysis.sparsity.geometry import NonFiniteMatrix, resolve_k, spectrum_top_k

    if isinstance(k, str):  # from the CLI / page: "8" or "0.05"
        try:
            k = float(k) if any(c in k for c in ".eE") else int(k)
        except ValueError:
            raise SelectorError(f"principal: k must be a count or a fraction of the rank, got {k!r}") from None
    try:
        resolve_k(k, 100)
    except SubnetscopeError as e:
        raise SelectorError(f"principal: {e}") from None
    params = parameters(model)
    targets = [pname for key, (_, pname, _) in linear_modules(model).items()
               if layer_index(pname) is not None and params[pname].dim() == 2]
    values: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    with scoring(model), torch.no_grad():
        for i, pname in enumerate(targets):
            w = params[pname].detach().float()
            kk = resolve_k(k, min(w.shape))
            try:
                _, u, s, v, err = spectrum_top_k(w, kk)
            except NonFiniteMatrix as e:  # checked before the SVD, which would fail or return garbage
                raise SelectorError(f"principal: {pname}: {e}") from None
            values[pname] = ((u * s) @ v.T).abs()
            errors[pname] = err
            if progress is not None:
                progress(i + 1, len(targets), "principal")
    unscored = [n for n in params if n not in values]
    return make_scores("principal", "element", values, model, unscored=unscored, svd_error=errors,
                       k="1% of the rank" if k is None else k)
