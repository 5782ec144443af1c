"""Masked fine-tuning (shared/DESIGN.md §8): train only a subnetwork of a checkpoint.

- :mod:`~analysis.finetune.sparse_adamw`: AdamW on compact fp32 copies of the masked elements
  (the main path) and the gradient-masking reference mode it is tested against;
- :mod:`~analysis.finetune.config`: the run configuration, with help texts;
- :mod:`~analysis.finetune.run`: one run (mask from a file, a diff, random, full, or LoRA via
  PEFT) written to a run directory, with the inside-mask check;
- :mod:`~analysis.finetune.compare`: metrics, curves and distance to a reference run.

Not built yet (issue 5): the demo RL task and text-file tasks, selector/structured/ID3/LISA mask
sources, resume from a saved state, multi-process runs, the page, and bench/finetune.py.
"""
