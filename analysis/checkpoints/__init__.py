"""Checkpoints: open, validate, align and describe them (docs/design.md §2).

A checkpoint reference is a local Hugging Face model directory (single or sharded
safetensors, or pytorch_model.bin), a single ``.safetensors`` file, a ``.bin``/``.pt``
state dict (read with ``torch.load(weights_only=True)`` only), or a hub id resolved
through ``huggingface_hub`` (local cache first). Nothing is unpickled otherwise and no
remote code runs. Tensors are memory-mapped and read one at a time, never two whole
models at once. Every problem is a :class:`CheckpointError` whose message is one line
naming the file and the problem.

- :mod:`.open`: resolving a reference, the :class:`Checkpoint` and its tensors, hub ids;
- :mod:`.files`: the safe reading of small files, and :class:`CheckpointError`;
- :mod:`.safetensors_header`: the header validator; :mod:`.torch_bin`: ``.bin`` state dicts;
- :mod:`.align`: pairing the tensors of several checkpoints;
- :mod:`.structure`: the one owner of names (layers, module kinds, heads, LoRA targets);
- :mod:`.models`: a checkpoint as a transformers model; :mod:`.tensor_map`: tensors by shard
  file, as Ray tasks.
"""

from analysis.checkpoints.align import AlignedTensor, Alignment, align, iter_aligned
from analysis.checkpoints.files import CheckpointError
from analysis.checkpoints.open import (BIN_INDEX, SAFE_INDEX, Checkpoint, HubNotCachedError, TensorInfo, cached_hub_id,
                                       download_hub_id, fingerprint, is_hub_id, open_checkpoint, resolve_hub_id,
                                       summarize)
from analysis.checkpoints.safetensors_header import read_safetensors_header

__all__ = ["BIN_INDEX", "SAFE_INDEX", "AlignedTensor", "Alignment", "Checkpoint", "CheckpointError",
           "HubNotCachedError", "TensorInfo", "align", "cached_hub_id", "download_hub_id", "fingerprint", "is_hub_id",
           "iter_aligned", "open_checkpoint", "read_safetensors_header", "resolve_hub_id", "summarize"]
