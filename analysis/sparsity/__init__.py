"""Update sparsity: which elements a fine-tune changed, and how (docs/design.md §3–§5, §10, §11).

- :mod:`.diff`: one fine-tune against its base in one streaming pass (every grid τ at once);
- :mod:`.overlap`: the changed subnetworks of several runs against the random and the
  magnitude-matched baselines;
- :mod:`.trajectory`: the changed set along one run's checkpoints;
- :mod:`.masks`: mask files (packed bits) and their set algebra;
- :mod:`.geometry`: spectra, principal subspaces and principal weights of an update.
"""
