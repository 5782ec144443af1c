"""Tiny models built from configs (nothing downloaded) and checkpoint writers for tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]  # importable through pyproject.toml's pytest pythonpath

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def tiny_llama(vocab: int = 50, seed: int = 0, tie: bool = False):
    """A 2-layer Llama with GQA (4 query heads, 2 kv heads, head_dim 16)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def demo_like(layers: int = 2, seed: int = 0, hidden: int = 64, reset: bool = False):
    """The demo's architecture (a char-level GQA Llama, 32 positions, pad = id 0), random weights.

    ``reset`` draws the weights with torch's default initialisation (N(0, 1) embeddings) instead of
    the config's N(0, 0.02): the zero pad embedding then sits much closer to the RMSNorm singularity
    along IG's path (see docs/integrated-gradients.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from analysis.families.demo_task import BOS, CHARS, EOS, PAD, SPECIALS

    cfg = LlamaConfig(vocab_size=len(SPECIALS) + len(CHARS), hidden_size=hidden, intermediate_size=172,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=32, tie_word_embeddings=False,
                      pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    if reset:
        for m in model.modules():
            if hasattr(m, "reset_parameters") and not list(m.children()):
                m.reset_parameters()
    return model


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=64,
                                           bos_token_id=0, eos_token_id=0)).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, vocab_size=40, max_position_embeddings=64)).eval()


def mount_tmpfs_at(d, opts: str) -> None:
    """Mounts a tmpfs with ``opts`` (``size=64k``, ``ro``) on ``d``: a small or read-only disk for the
    full-disk tests. Needs root (as on the project's machines and in CI): another user's run skips
    the test with that reason; root that cannot mount is a failure (the test must not pass unseen)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (a full or read-only disk); CI runs as root")
    if os.system(f"mount -t tmpfs -o {opts} tmpfs {d} 2>/dev/null") != 0:
        pytest.fail(f"cannot mount a tmpfs on {d} as root")


@pytest.fixture(autouse=True)
def _private_recent_list(tmp_path, monkeypatch):
    """Tests open many temporary checkpoints: keep them out of the user's recent list."""
    import ui.state

    from analysis.families import lineage

    monkeypatch.setattr(ui.state, "_recent_file", lambda: tmp_path / "recent.json")
    monkeypatch.setattr(lineage, "family_file", lambda: tmp_path / "family.json")  # the user's parents stay theirs
    monkeypatch.setenv("SUBNETSCOPE_RUNS", str(tmp_path / "runs"))  # and their runs out of the user's list
    yield
    from analysis.jobs import queue

    queue.shutdown()  # a failed test must not leave a run training in the background


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    d = tmp_path / "llama"
    tiny_llama().save_pretrained(d)
    return d


@pytest.fixture
def llama_sharded_dir(tmp_path) -> Path:
    d = tmp_path / "llama-sharded"
    tiny_llama().save_pretrained(d, max_shard_size="60KB")
    assert (d / "model.safetensors.index.json").is_file()
    return d


@pytest.fixture(scope="session")
def demo():
    """The demo family at its default location; `make test` builds it first, built here when missing."""
    from analysis.families.demo import build_demo, default_demo_dir, demo_is_current

    d = default_demo_dir()
    if not demo_is_current(d):
        build_demo(d, progress=False)
    return d


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct converted once per session from the PyPI package (about 40 s), in a
    folder of its own; tests that need the real model share it."""
    from analysis.families.smollm2 import build_real

    return build_real(tmp_path_factory.mktemp("real") / "smollm2")

