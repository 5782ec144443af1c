"""Does the change matter? How a fine-tune moved the model's outputs (per-token KL, the tokens that
rose and fell) and which part of its update carries that (weight patching), docs/design.md §15.

- :mod:`analysis.behaviour.prompts`: the prompts (text, a file, the demo's held-out problems).
- :mod:`analysis.behaviour.kl`: per-token KL(p_tuned ‖ p_base) and the tokens that moved.
- :mod:`analysis.behaviour.patch`: subsets of the update and θ = θ⁰ + α·P(M ⊙ Δ), in place or
  streamed to a checkpoint directory.
- :mod:`analysis.behaviour.evals`: what a patched model is scored on, and the recovered gain.
- :mod:`analysis.behaviour.sweeps`: rows of patches with both models loaded once.
"""
