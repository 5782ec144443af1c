"""The field's words defined once; imports nothing heavy, so the command line's parser and the
pages read them without loading torch.

- :data:`PAPER_TOL`: the τ of "unchanged" of Mukherjee et al. (arXiv 2505.11711) on bf16 weights
  (docs/design.md §3), every default.
- :data:`DECADE_TOLS`: 0 and the decades 1e-8 … 1e-3 — the rows a summary prints and the choices a
  slider offers (every one is a point of the one-pass grid, ``analysis.sparsity.diff.tolerance_grid``).
- :data:`GRANULARITIES`: what an importance score is aggregated to (docs/design.md §6).
- :data:`BUDGETS`: how a mask takes the top of the scores (docs/design.md §5): global top-k,
  per-layer top-k, or whole heads / channels / layers.
"""

PAPER_TOL = 1e-5
DECADE_TOLS = (0.0, 1e-8, 1e-7, 1e-6, PAPER_TOL, 1e-4, 1e-3)
GRANULARITIES = ("element", "row", "head", "channel", "layer")
BUDGETS = ("global", "per_layer", "structured")
