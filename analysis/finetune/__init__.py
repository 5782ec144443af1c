"""Masked fine-tuning (shared/DESIGN.md §8): train only a subnetwork of a checkpoint.

Done so far: the sparse optimizer (:mod:`analysis.finetune.sparse_adamw`) and the reference
gradient-masking mode it is tested against. The run directories, trainer, CLI and page of
issue 5 are not built yet.
"""
