"""Checkpoint resolution, exact counts, alignment, and every bad input of the foundation issue."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import struct
from pathlib import Path

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
    assert torch.equal(ck.tensor("model.layers.1.self_attn.k_proj.weight"),
                       sd["model.layers.1.self_attn.k_proj.weight"])


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


def test_align_refuses_names_that_collide_without_prefixes(tmp_path):
    """model.norm.weight and norm.weight normalize to one key: aligning would drop one of them."""
    sd = {k: v.contiguous() for k, v in tiny_llama().state_dict().items()}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(sd, a)
    save_file(dict(sd, **{"norm.weight": torch.zeros(64)}), b)
    assert open_checkpoint(b).total_params == 68_160 + 64  # reading it is fine
    with pytest.raises(CheckpointError) as ei:
        align([open_checkpoint(a), open_checkpoint(b)])
    assert str(ei.value) == (f"{b}: tensors 'model.norm.weight' and 'norm.weight' are the same tensor once "
                             f"wrapper prefixes are removed ('norm.weight'); cannot align them")


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


def test_hub_cache_that_cannot_be_read_says_why(tmp_path, monkeypatch):
    """Only a missing cache entry reads as "not in the local cache"; a cache entry that cannot
    be read (here refs/main is a directory) is reported as such, naming the file."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    refs = cache / "models--acme--broken" / "refs" / "main"
    refs.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    msg = _one_line_error("acme/broken", f"acme/broken: cannot read the local hub cache ({refs}): Is a directory")
    assert "not in the local cache" not in msg
    # a ref whose snapshot folder is missing is a missing entry: offline, "not in the local cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = cache / "models--acme--partial"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(commit)
    _one_line_error("acme/partial", "hub id not in the local cache")


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



def _causal_lm(config_cls, model_cls, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, config_cls)(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, **kw)
    return getattr(transformers, model_cls)(cfg)


@pytest.mark.parametrize("make,unit_rows", [
    (lambda: tiny_llama(tie=True), {"q": 64, "k": 32, "gate": 96}),
    (lambda: _causal_lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=1, attention_bias=True,
                        mlp_bias=True), {"q": 32, "k": 8, "gate": 48}),
    (lambda: _causal_lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2), {"q": 32, "k": 16, "gate": 48}),
    (lambda: _causal_lm("Qwen3Config", "Qwen3ForCausalLM", num_key_value_heads=2, head_dim=16),  # 4 × 16 > 32
     {"q": 64, "k": 32, "gate": 48}),
    (lambda: _causal_lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2), {"q": 32, "k": 16, "gate": 48}),
    (tiny_gpt2, {"qkv": 96, "up": 128}),
    (tiny_bert, {"q": 32, "k": 32, "up": 48}),
])
def test_config_check_accepts_legitimate_checkpoints(make, unit_rows, tmp_path):
    """Every family's real layout (GQA, biases, head_dim ≠ hidden/heads, tied, Conv1D) passes the
    config-vs-weights check, and every head and channel row is then covered by unit_slices."""
    from analysis.checkpoints.structure import unit_slices

    model = make()
    model.save_pretrained(tmp_path / "m")
    ck = open_checkpoint(tmp_path / "m")
    assert ck.total_params == sum(v.numel() for k, v in model.state_dict().items()
                                  if not (ck.arch.tie_word_embeddings and k == "lm_head.weight"))
    covered: dict[str, int] = {}  # rows (or Conv1D columns) of layer 0 that heads / channels cover
    for t in ck.tensors.values():
        if t.layer == 0 and t.name.endswith("weight") and len(t.shape) == 2:
            for sl in unit_slices(t.kind, t.shape, ck.arch):
                key = "qkv" if t.kind == "qkv" else sl.component
                covered[key] = covered.get(key, 0) + sl.size * sl.count
    assert {k: covered[k] for k in unit_rows} == unit_rows


def test_config_check_allows_resized_vocab_and_no_config(tmp_path):
    """A vocabulary resized after the config was written, a quantized layout, and a checkpoint
    without config.json are not config mismatches."""
    d = tmp_path / "resized"
    tiny_llama(vocab=56).save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, vocab_size=50)))
    assert open_checkpoint(d).tensors["model.embed_tokens.weight"].shape == (56, 64)
    q = tmp_path / "quantized"
    q.mkdir()
    sd = {k: v.contiguous() for k, v in tiny_llama().state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2048, 1, dtype=torch.uint8)  # bnb-style packed
    save_file(sd, q / "model.safetensors")
    (q / "config.json").write_text(json.dumps(dict(cfg, quantization_config={"quant_method": "bitsandbytes"})))
    assert open_checkpoint(q).tensors["model.layers.0.self_attn.q_proj.weight"].shape == (2048, 1)
    (q / "config.json").write_text(json.dumps(cfg))
    _one_line_error(q, "q_proj.weight has shape [2048, 1], but num_heads 4 × head_dim 16, hidden_size 64 "
                       "imply [64, 64]")
    (q / "config.json").unlink()
    assert open_checkpoint(q).config is None


def test_demo_family_passes_config_check(demo):
    for name in ("base", "sft", "rl-seed1", "rl-seed2"):
        ck = open_checkpoint(demo / name)
        assert (ck.arch.num_heads, ck.arch.num_kv_heads, ck.arch.intermediate_size) == (4, 2, 172)


# ------------------------------------------------------------------ bad inputs, table-driven
# Each case: a builder making one bad file or directory, and a piece of the one-line error it
# must give. The same input through the CLI must exit 2 with exactly that line on stderr.

def _entry(dtype="F32", shape=(1,), start=0, size=None):
    n = math.prod(shape) * (size or {"F32": 4, "U8": 1, "BOOL": 1}.get(dtype, 4))
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + n]}


def _st_file(tmp_path, header, data_len=4, name="bad.safetensors", raw=None, length=None):
    """A safetensors file from a header (a dict, or raw header bytes) and data_len zero bytes."""
    raw = json.dumps(header).encode() if raw is None else raw
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + b"\0" * data_len)
    return p


def _st(header, data_len=4, **kw):
    return lambda t, m, mp: _st_file(t, header, data_len, **kw)


def _st_raw(raw: bytes, data_len=4, **kw):
    return lambda t, m, mp: _st_file(t, None, data_len, raw=raw, **kw)


def _fifo(name):
    """A FIFO: a reader that opened it would block forever."""
    def build(t, m, mp):
        if name == "x.bin":
            os.mkfifo(t / name)
            return t / name
        d = t / "ck"
        shutil.copytree(m["llama"], d)
        (d / name).unlink()
        os.mkfifo(d / name)
        return d
    return build


def _dir_entry(name):
    def build(t, m, mp):
        d = t / "ck"
        shutil.copytree(m["llama"], d)
        (d / "model.safetensors").unlink()
        (d / name).mkdir()
        return d
    return build


def _symlink(target_name, inside_dir=False):
    def build(t, m, mp):
        d = t / "ck"
        d.mkdir()
        link = d / ("model.safetensors" if inside_dir else "x.safetensors")
        link.symlink_to(link if target_name == "self" else (d / target_name if target_name != "/dev/null"
                                                           else Path("/dev/null")))
        return d if inside_dir else link
    return build


def _dev_null_bin(t, m, mp):
    (t / "x.bin").symlink_to("/dev/null")
    return t / "x.bin"


def _socket(t, m, mp):
    p = t / "x.safetensors"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(p))
    s.close()
    return p


def _denied(what):
    """Unreadable file: tests run as root, so os.open is made to fail as it would for a user."""
    def build(t, m, mp):
        if what == "config":
            d = t / "ck"
            shutil.copytree(m["llama"], d)
            target, ref = d / "config.json", d
        elif what == "bin":
            target = ref = t / "w.bin"
            torch.save({"w": torch.zeros(2)}, target)
        else:
            target = ref = t / "w.safetensors"
            save_file({"w": torch.zeros(2)}, target)
        real_open = os.open

        def fake_open(path, flags, *args, **kw):
            if Path(path) == target:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real_open(path, flags, *args, **kw)

        mp.setattr(os, "open", fake_open)
        return ref
    return build


def _bin(obj=None, raw=None):
    def build(t, m, mp):
        p = t / "w.bin"
        if raw is not None:
            p.write_bytes(raw)
        else:
            torch.save(obj, p)
        return p
    return build


def _index(weight_map=None, raw=None, shards=(("a.safetensors", ("w",)),)):
    """A sharded directory: shards holding the named 1-element tensors, and an index."""
    def build(t, m, mp):
        d = t / "sharded"
        d.mkdir()
        for shard, names in shards:
            if shard.endswith("/"):
                (d / shard).mkdir()
            else:
                save_file({n: torch.zeros(1) for n in names}, d / shard)
        text = raw if raw is not None else json.dumps({"metadata": {}, "weight_map": weight_map})
        (d / "model.safetensors.index.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        return d
    return build


def _glob_shards(t, m, mp):
    d = t / "shards"
    d.mkdir()
    save_file({"w": torch.zeros(1)}, d / "a.safetensors")
    save_file({"w": torch.ones(1)}, d / "b.safetensors")
    return d


def _config(family, raw=None, **changes):
    """A copy of a tiny model directory with config.json edited (None deletes a field)."""
    def build(t, m, mp):
        d = t / family
        shutil.copytree(m[family], d)
        if raw is not None:
            (d / "config.json").write_bytes(raw)
            return d
        cfg = json.loads((d / "config.json").read_text())
        for k, v in changes.items():
            if v is None:
                cfg.pop(k, None)
            else:
                cfg[k] = v
        (d / "config.json").write_text(json.dumps(cfg))
        return d
    return build


def _big_config(t, m, mp):
    d = t / "llama"
    shutil.copytree(m["llama"], d)
    with open(d / "config.json", "r+b") as f:
        f.truncate(150_000_000)  # sparse: nothing is written, and nothing may be read
    return d


def _nul_path(t, m, mp):
    return str(t / "a\0b.safetensors")


F = _entry
BAD_INPUTS = [
    # --- safetensors header: offsets must tile the data exactly
    ("overlapping-offsets", _st({"a": F(shape=(2,)), "b": F(start=4)}, 8),
     "tensor 'b' starts at byte 4 but the previous tensor's data ends at 8 (overlaps the previous tensor's data)"),
    ("gap-between-tensors", _st({"a": F(), "b": F(start=8)}, 12),
     "tensor 'b' starts at byte 8 but the previous tensor's data ends at 4 (leaves 4 bytes unused before it)"),
    ("offsets-not-from-zero", _st({"a": F(start=4)}, 8),
     "tensor 'a' starts at byte 4 but the data section starts at 0"),
    ("data-beyond-last-tensor", _st({"a": F()}, 12),
     "8 bytes after the last tensor's data (the header covers 4 of 12)"),
    ("header-declares-terabytes", _st({"w": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, 16),
     "the header declares 4398046511104 bytes of tensor data but the file holds 16"),
    ("offsets-end-before-begin", _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}),
     "data_offsets [4, 0] end before they begin"),
    # --- safetensors header: entry types
    ("negative-dimension", _st({"a": {"dtype": "F32", "shape": [-2, 2], "data_offsets": [0, 4]}}),
     "entry for 'a': shape [-2, 2] is not a list of non-negative integers"),
    ("shape-as-string", _st({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}),
     "shape '1' is not a list of non-negative integers"),
    ("shape-with-bool", _st({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}),
     "shape [True] is not a list of non-negative integers"),
    ("shape-with-float", _st({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}),
     "shape [1.0] is not a list of non-negative integers"),
    ("float-offsets", _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0.0, 4.0]}}),
     "data_offsets [0.0, 4.0] is not two non-negative integers"),
    ("three-offsets", _st({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}),
     "data_offsets [0, 4, 4] is not two non-negative integers"),
    ("minus-zero-offset", _st_raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [-0, 4]}}'),
     "data_offsets [-0.0, 4] is not two non-negative integers"),
    ("unknown-dtype", _st({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 4]}}), "unsupported dtype 'F128'"),
    ("dtype-torch-cannot-read", _st({"a": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]}}),
     "unsupported dtype 'F4'"),
    ("entry-missing-shape", _st({"a": {"dtype": "F32", "data_offsets": [0, 4]}}),
     "entry for 'a': no 'shape' (expected exactly dtype, shape, data_offsets)"),
    ("entry-extra-field", _st({"a": dict(F(), offsets=[0, 4])}), "entry for 'a': unexpected field 'offsets'"),
    ("entry-not-an-object", _st({"a": [0, 4]}), "entry for 'a': a list, not an object"),
    ("shape-overflows-64-bits", _st({"a": {"dtype": "F32", "shape": [2**32, 2**32, 2**32], "data_offsets": [0, 0]}}, 0),
     "shape [4294967296, 4294967296, 4294967296] overflows 64 bits"),
    ("empty-tensor-huge-dimension", _st({"a": {"dtype": "F32", "shape": [0, 2**40], "data_offsets": [0, 0]}}, 0),
     "dimension 1099511627776 of an empty tensor exceeds the file's"),
    # --- safetensors header: metadata and names
    ("metadata-as-list", _st({"__metadata__": ["format", "pt"], "a": F()}),
     "__metadata__ must map strings to strings (found list ['format', 'pt'])"),
    ("metadata-non-string-value", _st({"__metadata__": {"step": 1}, "a": F()}),
     "__metadata__ must map strings to strings (found int 1)"),
    ("lone-surrogate-name", _st_raw(b'{"\\udc80": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     "lone surrogate in the string '\\udc80'"),
    ("duplicate-tensor-name", _st_raw(b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                      b'"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', 8),
     "duplicate key 'a'"),
    # --- safetensors header: JSON and framing
    ("nan-in-header", _st_raw(b'{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 4]}}'), "NaN is not JSON"),
    ("header-padded-with-nul", _st_raw(json.dumps({"a": F()}).encode() + b"\0\0\0"),
     "header has NUL bytes after its JSON object; the format pads the header with spaces only"),
    ("text-after-header-object", _st_raw(json.dumps({"a": F()}).encode() + b" x"),
     "header has 'x' after its JSON object"),
    ("header-starts-with-space", _st_raw(b" " + json.dumps({"a": F()}).encode()), "header does not start with '{'"),
    ("header-not-utf8", _st_raw(b'{"\xff": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'),
     "header is not UTF-8: byte 2"),
    ("header-not-json", _st_raw(b'{"a": }'), "header is not JSON: Expecting value at character 6"),
    ("header-nested-too-deeply", _st_raw(b'{"a":' * 50_000 + b"1" + b"}" * 50_000), "nested too deeply"),
    ("header-length-over-format-limit", _st_raw(b"{}", length=100_000_001),
     "header length 100000001 exceeds the format's limit of 100,000,000 bytes"),
    # --- not a regular file, unreadable
    ("fifo-named-bin", _fifo("x.bin"), "x.bin: not a regular file: it is a FIFO (named pipe)"),
    ("fifo-model-safetensors", _fifo("model.safetensors"), "model.safetensors: not a regular file: it is a FIFO"),
    ("fifo-config-json", _fifo("config.json"), "config.json: not a regular file: it is a FIFO"),
    ("directory-named-model-safetensors", _dir_entry("model.safetensors"),
     "model.safetensors: not a regular file: it is a directory"),
    ("directory-named-config-json", lambda t, m, mp: _config_dir(t, m),
     "config.json: not a regular file: it is a directory"),
    ("socket-named-safetensors", _socket, "x.safetensors: not a regular file: it is a socket"),
    ("character-device-as-bin", _dev_null_bin, "x.bin: not a regular file: it is a character device"),
    ("symlink-loop", _symlink("self"), "x.safetensors: cannot open: symbolic link loop"),
    ("broken-symlink", _symlink("gone.safetensors"), "x.safetensors: broken symbolic link"),
    ("broken-symlink-in-model-dir", _symlink("gone.safetensors", inside_dir=True),
     "model.safetensors: broken symbolic link"),
    ("permission-denied-safetensors", _denied("safetensors"), "w.safetensors: cannot open: Permission denied"),
    ("permission-denied-bin", _denied("bin"), "w.bin: cannot open: Permission denied"),
    ("permission-denied-config", _denied("config"), "config.json: cannot open: Permission denied"),
    ("nul-byte-in-path", _nul_path, "not a valid path (it holds a NUL byte)"),
    # --- PyTorch state dicts
    ("random-bytes-bin", _bin(raw=bytes(range(256)) * 8), "w.bin: not a readable PyTorch state dict"),
    ("empty-bin", _bin(raw=b""), "w.bin: not a readable PyTorch state dict"),
    ("bin-integer-keys", _bin({1: torch.zeros(1)}), "not a state dict (key 1 is a int, not a name)"),
    ("bin-list-of-tensors", _bin([torch.zeros(1)]), "not a state dict (expected a dict of tensors)"),
    # --- shard indexes
    ("index-value-int", _index({"w": 1}), "malformed index (weight_map['w'] is 1, not a shard file name)"),
    ("index-value-list", _index({"w": ["a.safetensors"]}),
     "weight_map['w'] is ['a.safetensors'], not a shard file name"),
    ("index-value-empty", _index({"w": ""}), "weight_map['w'] is '', not a shard file name"),
    ("index-weight-map-list", _index(["a.safetensors"]), "malformed index (weight_map is a list;"),
    ("index-without-weight-map", _index(raw='{"metadata": {}}'), "malformed index (no weight_map;"),
    ("index-top-level-list", _index(raw="[]"), "malformed index (top level is a list, not an object)"),
    ("index-not-json", _index(raw='{"weight_map": '), "malformed index (Expecting value"),
    ("index-not-utf8", _index(raw=b'{"weight_map": {"\xff": "a.safetensors"}}'), "malformed index ('utf-8' codec"),
    ("index-shard-outside-dir", _index({"w": "../a.safetensors"}),
     "shard '../a.safetensors' for 'w' points outside the checkpoint directory"),
    ("index-absolute-shard", _index({"w": "/etc/a.safetensors"}), "shard '/etc/a.safetensors' for 'w' points outside"),
    ("index-shard-is-directory", _index({"w": "a.safetensors"}, shards=(("a.safetensors/", ()),)),
     "a.safetensors: not a regular file: it is a directory"),
    ("tensor-in-two-shards", _index({"w": "a.safetensors", "v": "b.safetensors"},
                                    shards=(("a.safetensors", ("w",)), ("b.safetensors", ("v", "w")))),
     "b.safetensors: tensor 'w' is also in a.safetensors (each tensor must be in exactly one shard)"),
    ("tensor-in-two-unindexed-shards", _glob_shards, "b.safetensors: tensor 'w' is also in a.safetensors"),
    ("index-names-absent-tensor", _index({"w": "a.safetensors", "gone": "a.safetensors"}),
     "1 tensor(s) listed in the index are not in their shard (first: 'gone' in a.safetensors)"),
    # --- config.json against the weights
    ("llama-intermediate-size", _config("llama", intermediate_size=100),
     "config.json: does not match the weights: model.layers.0.mlp.down_proj.weight has shape [64, 96], "
     "but hidden_size 64, intermediate_size 100 imply [64, 100]"),
    ("llama-hidden-size", _config("llama", hidden_size=32, head_dim=None),
     "model.layers.0.mlp.down_proj.weight has shape [64, 96], but hidden_size 32, intermediate_size 96 imply [32, 96]"),
    ("llama-heads-not-dividing-rows", _config("llama", num_attention_heads=8, head_dim=None),
     "model.layers.0.self_attn.k_proj.weight has shape [32, 64], but num_kv_heads 2 × head_dim 8, hidden_size 64 "
     "imply [16, 64]"),
    ("llama-head-dim", _config("llama", head_dim=8),
     "k_proj.weight has shape [32, 64], but num_kv_heads 2 × head_dim 8"),
    ("llama-kv-heads-not-dividing", _config("llama", num_key_value_heads=3),
     "num_heads 4 is not a multiple of num_kv_heads 3"),
    ("llama-fewer-layers", _config("llama", num_hidden_layers=1),
     "model.layers.1.input_layernorm.weight belongs to block 1, but num_layers is 1"),
    ("llama-negative-heads", _config("llama", num_attention_heads=-4),
     "invalid config (num_attention_heads is -4, expected an integer ≥ 1)"),
    ("model-type-not-string", _config("llama", model_type=["llama"]),
     "invalid config (model_type is ['llama'], not a string)"),
    ("gpt2-heads-not-dividing", _config("gpt2", n_head=5),
     "transformer.h.0.attn.c_attn.bias has shape [96], but (num_heads 5 + 2 × num_kv_heads 5) × head_dim 6, "
     "hidden_size 32 imply [90]"),
    ("gpt2-inner-size", _config("gpt2", n_inner=100),
     "transformer.h.0.mlp.c_fc.bias has shape [128], but intermediate_size 100, hidden_size 32 imply [100]"),
    ("bert-heads-not-dividing", _config("bert", num_attention_heads=3),
     "encoder.layer.0.attention.output.dense.weight has shape [32, 32], but hidden_size 32, num_heads 3 × head_dim 10 "
     "imply [32, 30]"),
    ("bert-intermediate-size", _config("bert", intermediate_size=64),
     "encoder.layer.0.intermediate.dense.bias has shape [48], but intermediate_size 64, hidden_size 32 imply [64]"),
    ("config-too-large", _big_config, "config.json: 150,000,000 bytes, too large for a config.json"),
    ("config-not-utf8", _config("llama", raw=b'{"model_type": "\xff"}'), "malformed config.json ('utf-8' codec"),
    ("config-top-level-list", _config("llama", raw=b"[1]"), "malformed config.json (top level is list, not an object)"),
]


def _config_dir(t, m):
    d = t / "llama"
    shutil.copytree(m["llama"], d)
    (d / "config.json").unlink()
    (d / "config.json").mkdir()
    return d


@pytest.fixture(scope="session")
def _tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {"llama": root / "llama", "gpt2": root / "gpt2", "bert": root / "bert"}
    tiny_llama().save_pretrained(dirs["llama"])
    tiny_gpt2().save_pretrained(dirs["gpt2"])
    tiny_bert().save_pretrained(dirs["bert"])
    return dirs


def test_bad_input_table_size():
    assert len(BAD_INPUTS) == 79
    assert len({case[0] for case in BAD_INPUTS}) == len(BAD_INPUTS)


@pytest.mark.parametrize("build,expected", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input(build, expected, tmp_path, _tiny_dirs, monkeypatch, capsys):
    from analysis.__main__ import main

    ref = build(tmp_path, _tiny_dirs, monkeypatch)
    msg = _one_line_error(ref, expected)
    shown = ref.replace("\0", "\\x00") if isinstance(ref, str) else str(ref)
    assert shown in msg or str(ref) in msg, msg  # names the file (or the path given)
    capsys.readouterr()
    assert main(["inspect", str(ref)]) == 2  # the CLI: exit 2, that one line, nothing else
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"error: {msg}\n")


def test_config_cache_gives_transformers_architecture(tmp_path, monkeypatch):
    """The architecture read through the on-disk config cache (a command that skips importing
    transformers) equals the one from transformers' config classes, for each family's defaults and
    aliases (GPT-2's n_embd and n_inner = 4·n_embd, Llama's GQA, BERT); a damaged entry is ignored."""
    import analysis.checkpoints.open as ck_mod
    from analysis.checkpoints import open_checkpoint

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    real, calls = ck_mod._config_object, []
    monkeypatch.setattr(ck_mod, "_config_object", lambda *a: calls.append(a[0]) or real(*a))
    for i, model in enumerate((tiny_llama(), tiny_gpt2(), tiny_bert())):
        d = tmp_path / f"m{i}"
        model.save_pretrained(d)
        first = open_checkpoint(d).arch  # through transformers, then remembered
        assert calls == [d] and first.num_layers == 2 and first.hidden_size in (32, 64)
        entries = list((tmp_path / "home" / "cache" / "configs").glob("*.json"))
        assert len(entries) == i + 1
        assert open_checkpoint(d).arch == first and calls == [d]  # the cache answered
        newest = max(entries, key=lambda p: p.stat().st_mtime_ns)
        newest.write_text("{not json")
        assert open_checkpoint(d).arch == first and calls == [d, d]  # damaged: transformers again
        assert open_checkpoint(d).arch == first and calls == [d, d]  # and remembered anew
        calls.clear()
    assert open_checkpoint(tmp_path / "m1").arch.intermediate_size == 4 * 32  # GPT-2's default n_inner
