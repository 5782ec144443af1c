"""Loading a checkpoint as a model for the analyses that run it (selectors, attribution).

Models are loaded in float32 (unless asked otherwise), in eval mode, with ``trust_remote_code=False``
unless the user asks; only weight patching (:mod:`analysis.behaviour.patch`) writes into them, and
it writes θ⁰ back.
"""

from __future__ import annotations

import os

import torch

from analysis.checkpoints import open_checkpoint
from analysis.errors import SubnetscopeError, one_line


# The files a Hugging Face tokenizer is read from (fast tokenizer, config, sentencepiece / BPE /
# WordPiece vocabularies). A directory with none of them has no tokenizer; one with any of them
# has a tokenizer, which must load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model",
                   "sentencepiece.bpe.model", "vocab.json", "merges.txt", "vocab.txt", "tekken.json")


class ModelLoadError(SubnetscopeError):
    """A checkpoint that cannot be loaded as a model, in one line."""


def available_devices() -> list[str]:
    """The devices a model can run on here: ``cpu``, and ``cuda`` when CUDA is available."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` (or None) -> ``cuda`` when available, else ``cpu``; anything else as given.

    Raises:
        ModelLoadError: for ``cuda`` on a machine without CUDA, or an unknown device string.
    """
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelLoadError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' asked for, but CUDA is not available on this machine")
    return dev


def load_model(ref: str | os.PathLike, *, device: str | torch.device | None = "auto",
               trust_remote_code: bool = False, masked_lm: bool = False, dtype: torch.dtype = torch.float32):
    """Opens a checkpoint directory as an eval-mode float32 model and its tokenizer.

    Args:
        ref (str or PathLike): a Hugging Face model directory (or a hub id in the local cache).
        device (str, optional): ``auto``, ``cpu``, ``cuda`` ... Default: ``auto``.
        trust_remote_code (bool): allow code shipped with the checkpoint. Default: False.
        masked_lm (bool): a BERT-family checkpoint is loaded with its masked-LM head
            (``AutoModelForMaskedLM``; attribution scores its logits). Default: False.
    Returns:
        tuple: (``AutoModelForCausalLM`` — ``AutoModel`` for BERT-family encoders — in eval mode,
        the tokenizer, or None when the directory has none of ``TOKENIZER_FILES``).
    Raises:
        ModelLoadError / CheckpointError: one line naming the checkpoint and the problem (also
            for tokenizer files that are there but do not load).
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    ck = open_checkpoint(ref, trust_remote_code=trust_remote_code)
    if not ck.source.startswith("hf-dir") or ck.config is None:
        raise ModelLoadError(f"{ck.path}: running a model needs a Hugging Face model directory with "
                             f"config.json (this is a {ck.source} checkpoint)")
    cls = AutoModel if ck.arch.family == "bert" else AutoModelForCausalLM
    if masked_lm and ck.arch.family == "bert":
        from transformers import AutoModelForMaskedLM

        archs = list(ck.config.get("architectures") or [])
        if not any(a.endswith("ForMaskedLM") or a.endswith("ForPreTraining") for a in archs):
            raise ModelLoadError(f"{ck.path}: an encoder without a masked-LM head "
                                 f"({', '.join(archs) or 'no architectures'}"
                                 "): there is no target logit to attribute")
        cls = AutoModelForMaskedLM
    try:
        model = cls.from_pretrained(ck.path, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; the user gets one line
        raise ModelLoadError(f"{ck.path}: cannot load as {cls.__name__}: {one_line(e)}") from None
    model.to(dev).eval()
    files = [f for f in TOKENIZER_FILES if (ck.path / f).exists()]
    if not files:  # no tokenizer: calibration data then says so
        return model, None
    try:
        tokenizer = AutoTokenizer.from_pretrained(ck.path, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers raises many types; a tokenizer that is there must load
        raise ModelLoadError(f"{ck.path}: the tokenizer ({', '.join(files)}) cannot be loaded: "
                             f"{type(e).__name__}: {one_line(e)}") from None
    return model, tokenizer
