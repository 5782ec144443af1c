"""Name -> (layer, kind) maps for the Llama/Qwen2/Mistral, GPT-2 and BERT families."""

import pytest

from analysis.checkpoints.structure import (KINDS, architecture_from_config, block_index, detect_family, layer_index,
                                            normalize_name, tensor_role)
from conftest import tiny_bert, tiny_gpt2, tiny_llama


@pytest.mark.parametrize("name,family,layer,kind", [
    ("model.layers.3.self_attn.q_proj.weight", "llama", 3, "q"),
    ("model.layers.3.self_attn.q_proj.bias", "llama", 3, "q"),  # Qwen2 has qkv biases
    ("base_model.model.model.layers.12.mlp.gate_proj.weight", "llama", 12, "gate"),
    ("model.layers.0.post_attention_layernorm.weight", "llama", 0, "mlp_norm"),
    ("model.layers.0.self_attn.k_norm.weight", "llama", 0, "qk_norm"),  # Qwen3
    ("model.norm.weight", "llama", None, "final_norm"),
    ("lm_head.weight", "llama", None, "lm_head"),
    ("model.embed_tokens.weight", "llama", None, "embed"),
    ("transformer.h.10.attn.c_attn.weight", "gpt2", 10, "qkv"),
    ("h.1.mlp.c_proj.bias", "gpt2", 1, "down"),
    ("transformer.h.1.attn.bias", "gpt2", 1, "buffer"),
    ("ln_f.weight", "gpt2", None, "final_norm"),
    ("bert.encoder.layer.5.attention.output.LayerNorm.weight", "bert", 5, "attn_norm"),
    ("encoder.layer.5.output.dense.weight", "bert", 5, "down"),
    ("cls.predictions.transform.dense.weight", "bert", None, "lm_head"),
    ("some.unknown.tensor", "llama", None, "other"),
])
def test_tensor_role(name, family, layer, kind):
    r = tensor_role(name, family)
    assert (r.layer, r.kind) == (layer, kind)


@pytest.mark.parametrize("name,layer,block", [
    ("model.layers.3.self_attn.q_proj.weight", 3, None),
    ("model.layers.3", 3, 3),
    ("model.layers.3.mlp", 3, None),
    ("transformer.h.11", 11, 11),
    ("h.0.attn.c_attn.bias", 0, None),
    ("bert.encoder.layer.5", 5, 5),
    ("encoder.layer.5.output.dense", 5, None),
    ("blocks.2", 2, 2),
    ("layers.7.weight", 7, None),
    ("model.layers", None, None),
    ("model.layers.x.mlp", None, None),
    ("model.norm.weight", None, None),
    ("highway.0.weight", None, None),  # "highway" is not "h"
    ("model.sublayers.1.weight", None, None),  # nor is "sublayers" "layers"
])
def test_layer_and_block_index(name, layer, block):
    """One parser for block indices: of a tensor or module name (layer_index), and of a module
    that is a block itself (block_index)."""
    assert (layer_index(name), block_index(name)) == (layer, block)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2, tiny_bert])
def test_block_modules_and_tensor_layers_agree(make):
    from analysis.importance.selectors.base import block_modules

    model = make()
    blocks = block_modules(model)
    assert list(blocks) == [0, 1]
    for L, block in blocks.items():  # every parameter of block L has layer L
        prefix = next(n for n, m in model.named_modules() if m is block)
        assert {tensor_role(f"{prefix}.{n}", None).layer for n, _ in block.named_parameters()} == {L}


def test_normalize_strips_nested_prefixes():
    assert normalize_name("base_model.model.model.layers.0.mlp.up_proj.weight") == "layers.0.mlp.up_proj.weight"
    assert normalize_name("module.transformer.wte.weight") == "wte.weight"
    assert normalize_name("lm_head.weight") == "lm_head.weight"


@pytest.mark.parametrize("make,family", [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_every_tensor_of_each_family_has_a_kind(make, family):
    model = make()
    names = list(model.state_dict())
    assert detect_family(names) == family  # from names alone
    for n in names:
        assert tensor_role(n, family).kind != "other", n
    arch = architecture_from_config(model.config, names)
    assert arch.family == family and arch.num_layers == 2
    assert arch.num_heads == 4


def test_gqa_fields():
    arch = architecture_from_config(tiny_llama().config)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size) == (4, 2, 16, 64)
    assert set(KINDS) >= {"q", "k", "v", "o", "gate", "up", "down"}
