"""Masked fine-tuning (docs/design.md §8): train only a subnetwork of a checkpoint.

- :mod:`~analysis.finetune.sparse_adamw`: AdamW on compact fp32 copies of the masked elements
  (the main path; segments for masks that grow, an active set for layer sampling) and the
  gradient-masking reference mode it is tested against;
- :mod:`~analysis.finetune.config`: the run configuration, with help texts (CLI and page);
- :mod:`~analysis.finetune.tasks`: demo-sft, demo-rl and lm (a text file) losses and metrics;
- :mod:`~analysis.finetune.run`: one run written to a run directory — masks from files (and their
  set algebra), a selector, a diff, random, ID3's incremental unmasking, full, or LoRA (PEFT);
  the LISA layer-sampling schedule; resume; the inside-mask check;
- :mod:`~analysis.finetune.distributed`: data-parallel runs under torchrun / accelerate launch;
- :mod:`~analysis.jobs.queue`: the runs on disk and the one-at-a-time queue of the page;
- :mod:`~analysis.finetune.compare`: metrics, curves, distance to a reference run, and intervals.
"""
