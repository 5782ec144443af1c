"""Checkpoint resolution, exact counts, alignment, and every bad input of the foundation issue."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from analysis.checkpoints import CheckpointError, align, iter_aligned, open_checkpoint, summarize
from conftest import tiny_bert, tiny_gpt2, tiny_llama


def _one_line_error(ref, match):
    with pytest.raises(CheckpointError) as ei:
        open_checkpoint(ref)
    msg = str(ei.value)
    assert "\n" not in msg
    assert match in msg, msg
    return msg


# ------------------------------------------------------------------ resolution and counts

def test_hf_dir_counts_and_architecture(llama_dir):
    ck = open_checkpoint(llama_dir)
    model = tiny_llama()
    sd = model.state_dict()
    assert ck.source == "hf-dir"
    assert ck.total_params == sum(v.numel() for v in sd.values()) == 68_160
    a = ck.arch
    assert (a.model_type, a.num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
            a.intermediate_size, a.vocab_size, a.tie_word_embeddings) == ("llama", 2, 64, 4, 2, 16, 96, 50, False)
    assert ck.dtype_counts() == {"float32": 68_160}
    t = ck.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert (t.layer, t.kind, t.shape, t.key) == (1, "k", (32, 64), "layers.1.self_attn.k_proj.weight")
    assert torch.equal(ck.tensor("model.layers.1.self_attn.k_proj.weight"), sd["model.layers.1.self_attn.k_proj.weight"])


def test_sharded_prefixed_every_tensor_exact(tmp_path):
    """inspect counts are exact on every tensor of a sharded, prefixed checkpoint."""
    model = tiny_llama(seed=3)
    sd = {f"base_model.model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    d = tmp_path / "sharded-prefixed"
    d.mkdir()
    names = list(sd)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for shard, ns in shards.items():
        save_file({n: sd[n] for n in ns}, d / shard)
        weight_map.update({n: shard for n in ns})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.to_json_file(d / "config.json")

    s = summarize(open_checkpoint(d))
    assert len(s["files"]) == 2
    assert s["total_params"] == sum(v.numel() for v in sd.values())
    by_name = {t["name"]: t for t in s["tensors"]}
    assert set(by_name) == set(sd)
    for n, v in sd.items():
        assert by_name[n]["shape"] == list(v.shape)
        assert by_name[n]["numel"] == v.numel()
    assert by_name["base_model.model.model.layers.0.mlp.down_proj.weight"]["kind"] == "down"
    assert by_name["base_model.model.model.layers.0.mlp.down_proj.weight"]["layer"] == 0
    assert by_name["base_model.model.lm_head.weight"]["kind"] == "lm_head"
    assert s["params_by_kind"]["q"] == 2 * 64 * 64
    assert s["params_by_layer"][0] == {"layer": 0, "params": sum(
        v.numel() for k, v in sd.items() if ".layers.0." in k)}


def test_hf_sharded_dir(llama_sharded_dir):
    ck = open_checkpoint(llama_sharded_dir)
    assert len(ck.files) > 1
    assert ck.total_params == 68_160


def test_single_safetensors_file_and_bin(tmp_path):
    sd = tiny_llama().state_dict()
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, f)
    ck = open_checkpoint(f)
    assert ck.source == "safetensors" and ck.config is None
    assert ck.arch.family == "llama"  # from the names alone
    assert ck.total_params == 68_160
    b = tmp_path / "w.bin"
    torch.save(sd, b)
    ckb = open_checkpoint(b)
    assert ckb.source == "torch" and ckb.total_params == 68_160
    k = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(ckb.tensor(k), sd[k])
    legacy = tmp_path / "legacy.pt"  # non-zip serialization (no mmap) and a training wrapper
    torch.save({"state_dict": sd}, legacy, _use_new_zipfile_serialization=False)
    assert open_checkpoint(legacy).total_params == 68_160


def test_gpt2_and_bert_roles(tmp_path):
    g = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(g)
    ck = open_checkpoint(g)
    assert ck.arch.model_type == "gpt2" and ck.arch.intermediate_size == 128  # 4 * n_embd default
    kinds = {t.key: t.kind for t in ck.tensors.values()}
    assert kinds["h.1.attn.c_attn.weight"] == "qkv"
    assert kinds["h.0.mlp.c_proj.weight"] == "down"
    assert kinds["wpe.weight"] == "pos_embed"
    b = tmp_path / "bert"
    tiny_bert().save_pretrained(b)
    ck = open_checkpoint(b)
    kinds = {t.key: (t.layer, t.kind) for t in ck.tensors.values()}
    assert kinds["encoder.layer.1.attention.self.key.weight"] == (1, "k")
    assert kinds["encoder.layer.0.intermediate.dense.weight"] == (0, "up")
    assert kinds["encoder.layer.0.output.dense.weight"] == (0, "down")
    assert kinds["encoder.layer.0.attention.output.dense.weight"] == (0, "o")
    assert ck.total_params == sum(v.numel() for v in tiny_bert().state_dict().values())


def test_hub_cache_layout(tmp_path, monkeypatch):
    """A hub id resolves from a local HF cache laid out as huggingface_hub writes it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny-llama" / "snapshots" / commit
    tiny_llama().save_pretrained(snap)
    (cache / "models--acme--tiny-llama" / "refs").mkdir()
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    ck = open_checkpoint("acme/tiny-llama")
    assert ck.source == "hf-dir (hub)"
    assert ck.path == snap
    assert ck.total_params == 68_160


# ------------------------------------------------------------------ alignment

def test_align_prefixes_and_resized_vocab(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(vocab=50).save_pretrained(a)
    bigger = tiny_llama(vocab=56, seed=1)
    # a second checkpoint saved without the "model." prefix (LlamaModel naming) + resized vocab
    sd = {k.removeprefix("model."): v.contiguous() for k, v in bigger.state_dict().items()}
    b.mkdir()
    save_file(sd, b / "model.safetensors")
    bigger.config.to_json_file(b / "config.json")
    al = align([open_checkpoint(a), open_checkpoint(b)])
    assert al.missing == [] and al.mismatched == []
    assert {r["key"] for r in al.resized} == {"embed_tokens.weight", "lm_head.weight"}
    assert all(r["compared_rows"] == 50 for r in al.resized)
    assert al.compared_params == 68_160
    for t, (x, y) in iter_aligned(al, [open_checkpoint(a), open_checkpoint(b)]):
        assert x.shape == y.shape == t.compare_shape


def test_align_reports_missing_and_mismatched(tmp_path):
    sd = {k: v.contiguous() for k, v in tiny_llama().state_dict().items()}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, a)
    sd2 = dict(sd)
    del sd2["model.norm.weight"]
    sd2["model.layers.0.mlp.up_proj.weight"] = torch.zeros(97, 64)
    sd2["extra.weight"] = torch.zeros(3)
    save_file(sd2, b)
    al = align([open_checkpoint(a), open_checkpoint(b)])
    assert al.missing == [{"key": "norm.weight", "present_in": [0], "missing_in": [1]},
                          {"key": "extra.weight", "present_in": [1], "missing_in": [0]}]
    assert al.mismatched == [{"key": "layers.0.mlp.up_proj.weight", "shapes": [[96, 64], [97, 64]],
                              "reason": "shape differs between checkpoints"}]
    # every tensor of either side is accounted for
    assert len(al.tensors) + len(al.missing) + len(al.mismatched) == len(sd) + 1


def test_align_three_checkpoints(tmp_path):
    ds = []
    for i in range(3):
        d = tmp_path / f"m{i}"
        tiny_llama(seed=i).save_pretrained(d)
        ds.append(open_checkpoint(d))
    al = align(ds)
    assert len(al.tensors) == 21 and al.compared_params == 68_160


# ------------------------------------------------------------------ bad input, one line each

def test_missing_path(tmp_path):
    _one_line_error(tmp_path / "nope", "no such file or directory")


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    _one_line_error(tmp_path / "empty", "empty directory")


def test_config_without_weights(tmp_path, llama_dir):
    (llama_dir / "model.safetensors").unlink()
    msg = _one_line_error(llama_dir, "has config.json but no weights")
    assert str(llama_dir) in msg


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = _one_line_error(llama_dir, "truncated")
    assert str(f) in msg


def test_truncated_inside_header(tmp_path):
    f = tmp_path / "cut.safetensors"
    save_file({"w": torch.zeros(10)}, tmp_path / "full.safetensors")
    f.write_bytes((tmp_path / "full.safetensors").read_bytes()[:20])
    _one_line_error(f, "truncated or not safetensors")


def test_random_bytes_safetensors(tmp_path):
    f = tmp_path / "noise.safetensors"
    f.write_bytes(bytes(range(256)) * 64)
    _one_line_error(f, "not a valid safetensors file")
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    _one_line_error(tiny, "not a safetensors file")


def test_header_declares_more_than_file(tmp_path):
    f = tmp_path / "liar.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 100)
    msg = _one_line_error(f, "the header declares 4000 bytes of tensor data but the file holds 100")
    assert str(f) in msg


def test_header_inconsistent_entry(tmp_path):
    f = tmp_path / "bad.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [10], "data_offsets": [0, 8]}}).encode()
    f.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    _one_line_error(f, "declares 8 bytes for shape [10] F32 (40 expected)")


def test_missing_shard(llama_sharded_dir):
    shard = sorted(llama_sharded_dir.glob("model-*.safetensors"))[2]
    shard.unlink()
    msg = _one_line_error(llama_sharded_dir, "shard listed in model.safetensors.index.json is missing")
    assert shard.name in msg


def test_malformed_config(llama_dir):
    (llama_dir / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    msg = _one_line_error(llama_dir, "malformed config.json")
    assert "config.json" in msg


def test_remote_code_config_refused(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg.update(model_type="acme-secret", auto_map={"AutoConfig": "acme.Config"})
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    _one_line_error(llama_dir, "needs remote code")


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pickle_payload_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    f = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.zeros(3), "x": _Payload(marker)}, f)
    msg = _one_line_error(f, "refused to unpickle")
    assert not marker.exists()
    d = tmp_path / "dir"
    d.mkdir()
    f.rename(d / "pytorch_model.bin")
    _one_line_error(d, "refused to unpickle")
    assert not marker.exists()
    # control: the payload is real — an unrestricted unpickler does run it
    torch.load(d / "pytorch_model.bin", weights_only=False)
    assert marker.read_text() == "ran"
    assert "\n" not in msg


def test_hub_id_offline_not_cached(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _one_line_error("acme/not-cached", "hub id not in the local cache")


def test_different_architectures(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama().save_pretrained(a)
    tiny_gpt2().save_pretrained(b)
    with pytest.raises(CheckpointError, match="different architecture") as ei:
        align([open_checkpoint(a), open_checkpoint(b)])
    assert str(b) in str(ei.value)
    c = tmp_path / "c"
    from transformers import LlamaConfig, LlamaForCausalLM
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=50)).save_pretrained(c)
    with pytest.raises(CheckpointError, match="num_layers 3 vs 2"):
        align([open_checkpoint(a), open_checkpoint(c)])

