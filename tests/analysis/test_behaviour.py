"""Behaviour and weight patching (docs/design.md §15): KL against a float64 computation, α = 1 copies
bit for bit, Eckart–Young for ranks, the demo's manifest accuracies, and every bad input one line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis.behaviour.patch import Pair, PatchError, Patcher, parse_subset, patched, select, write_patched
from analysis.behaviour.prompts import PromptsError, parse_prompts
from conftest import demo_like


def _pair(tmp_path, dtype=torch.float32, seed=1, scale=0.05):
    """A demo-architecture base and a tune that moved some of it (every tensor of layer 0, a few
    elements of the MLP of layer 1), saved in ``dtype`` with the demo tokenizer."""
    from analysis.families.demo_task import make_tokenizer

    base = demo_like(layers=2, seed=0)
    tuned = demo_like(layers=2, seed=0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if ".layers.0." in n:
                p.add_(scale * torch.randn(p.shape, generator=g))
            elif "layers.1.mlp.up_proj" in n:
                p.view(-1)[:50].add_(scale)
    paths = []
    for name, m in (("base", base), ("tuned", tuned)):
        d = tmp_path / name
        m.to(dtype).save_pretrained(d)
        make_tokenizer().save_pretrained(d)
        paths.append(str(d))
    return paths


def test_kl_equals_a_float64_computation_and_is_zero_against_itself(tmp_path):
    from analysis.behaviour.kl import behaviour
    from analysis.checkpoints.models import load_model
    from analysis.families.demo_task import make_tokenizer

    base, tuned = _pair(tmp_path)
    prompts = ["Q:12+07\nA:", "Q:3", "Q:99-98\nA:1"]
    r = behaviour(base, tuned, prompts, top=3, device="cpu")
    tok = make_tokenizer()
    m0, _ = load_model(base, device="cpu")
    m1, _ = load_model(tuned, device="cpu")
    for p, row in zip(prompts, r["prompts"]):
        ids = torch.tensor([tok(p)["input_ids"]])
        assert row["ids"] == ids[0].tolist() and row["tokens"][0] == "<bos>"  # special tokens included
        with torch.no_grad():
            l0 = m0(ids).logits[0].double().log_softmax(-1)
            l1 = m1(ids).logits[0].double().log_softmax(-1)
        want = (l1.exp() * (l1 - l0)).sum(-1)
        assert torch.allclose(torch.tensor(row["kl"], dtype=torch.float64), want, rtol=1e-4, atol=1e-9)
        assert row["kl_mean"] == pytest.approx(float(want.mean()), rel=1e-4)
        assert all(x["delta_logp"] > 0 for x in row["rose"]) and all(x["delta_logp"] < 0 for x in row["fell"])
    assert r["kl_mean"] > 0
    same = behaviour(base, base, prompts, device="cpu")
    assert same["kl_mean"] == 0.0 and all(v == 0.0 for row in same["prompts"] for v in row["kl"])
    kept = behaviour(base, tuned, prompts, top=3, device="cpu", keep_both=False)  # base's log-probs kept, then the tune
    assert [row["kl"] for row in kept["prompts"]] == [row["kl"] for row in r["prompts"]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_alpha_one_copies_the_tune_bit_for_bit(tmp_path, dtype):
    from analysis.checkpoints import open_checkpoint

    base, tuned = _pair(tmp_path, dtype)
    pair = Pair.open(base, tuned)
    for spec, from_tune in (("all", lambda k: True), ("none", lambda k: False),
                            ("layers:0", lambda k: ".layers.0." in "." + k), ("kinds:mlp", lambda k: ".mlp." in k)):
        out = tmp_path / f"out-{spec.replace(':', '-')}"
        write_patched(pair, select(pair, parse_subset(spec)), out)
        h = open_checkpoint(out)
        assert set(h.tensors) == set(pair.tuned.tensors)
        for n in h.tensors:
            t0, t1 = pair.base.tensor(n), pair.tuned.tensor(n)
            got = h.tensor(n)
            assert got.dtype == t1.dtype
            want = t1 if from_tune(n.removeprefix("model.")) else t0
            assert torch.equal(got.view(torch.uint8) if got.dtype == torch.bfloat16 else got,
                               want.view(torch.uint8) if want.dtype == torch.bfloat16 else want), (spec, n)
    # elements: the changed set at τ copied from the tune, the rest from the base, exactly
    sel = select(pair, parse_subset("changed"), tol=1e-3)
    for k, m in sel.items():
        t0, t1 = pair.theta(k)
        got = patched(t0, t1, m)
        mm = (t1.float() - t0.float()).abs() > 1e-3 if m is not True else torch.ones_like(t0, dtype=torch.bool)
        assert torch.equal(got[mm], t1[mm]) and torch.equal(got[~mm], t0[~mm])


def test_rank_k_is_the_best_rank_k_update(tmp_path):
    """Eckart–Young on an fp32 pair: the patched update of each block matrix has rank ≤ k and leaves
    exactly Σ_{i>k} σ_i² of ‖Δ‖²; 1-D tensors keep their full update; α scales it."""
    base, tuned = _pair(tmp_path)
    pair = Pair.open(base, tuned)
    k = "layers.0.mlp.up_proj.weight"
    t0, t1 = pair.theta(k)
    delta = (t1 - t0).double()
    s = torch.linalg.svdvals(delta)
    for rank in (1, 3, 8):
        got = patched(t0, t1, True, rank=rank, block_matrix=True).double() - t0.double()
        assert torch.linalg.matrix_rank(got, atol=1e-4 * float(s[0])).item() <= rank
        left = float(((delta - got) ** 2).sum())
        assert left == pytest.approx(float((s[rank:] ** 2).sum()), rel=1e-3)
    norm = "layers.0.input_layernorm.weight"
    n0, n1 = pair.theta(norm)
    assert torch.equal(patched(n0, n1, True, rank=1, block_matrix=False), n1)
    half = patched(t0, t1, True, alpha=0.5)
    assert torch.allclose(half, t0 + 0.5 * (t1 - t0), atol=1e-7)


def test_in_place_patches_are_undone(tmp_path):
    from analysis.checkpoints.models import load_model

    base, tuned = _pair(tmp_path)
    pair = Pair.open(base, tuned)
    model, _ = load_model(base, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    patcher = Patcher(model, pair)
    patcher.apply(select(pair, parse_subset("all")))
    tuned_model, _ = load_model(tuned, device="cpu")
    for (n, p), (_, q) in zip(model.named_parameters(), tuned_model.named_parameters()):
        assert torch.equal(p, q), n
    patcher.apply(select(pair, parse_subset("heads:0.1")), rank=2, tag="h")
    patcher.undo()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_heads_are_their_q_rows_o_columns_and_kv_head(tmp_path):
    base, tuned = _pair(tmp_path)
    pair = Pair.open(base, tuned)
    sel = select(pair, parse_subset("heads:1.3"))  # 4 query heads, 2 kv heads of 16: head 3 reads kv head 1
    q, k, o = (sel[f"layers.1.self_attn.{x}_proj.weight"] for x in ("q", "k", "o"))
    assert q[48:64].all() and int(q.sum()) == 16 * 64
    assert k[16:32].all() and int(k.sum()) == 16 * 64
    assert o[:, 48:64].all() and int(o.sum()) == 64 * 16
    assert set(sel) == {f"layers.1.self_attn.{x}_proj.weight" for x in "qkvo"}


def test_eval_demo_of_all_and_none_equals_the_manifest(demo, tmp_path):
    from analysis.specs import get_spec
    from analysis.specs.base import execute

    manifest = json.loads((demo / "manifest.json").read_text())["models"]
    spec = get_spec("patch")
    out = tmp_path / "p.json"
    execute(spec, spec.params(str(demo / "sft"), str(demo / "rl-seed1"), subset="none", eval=("demo",)),
            json_out=str(out), report=False)
    d = json.loads(out.read_text())
    assert d["tuned_metrics"]["accuracy"] == pytest.approx(manifest["rl-seed1"]["accuracy"], abs=5e-5)
    assert d["base_metrics"]["accuracy"] == pytest.approx(manifest["sft"]["accuracy"], abs=5e-5)
    assert d["accuracy"] == d["base_metrics"]["accuracy"] and d["recovered"] == 0.0


def test_a_sweep_of_layers_restores_the_base_between_rows(tmp_path):
    from analysis.specs import get_spec
    from analysis.specs.base import execute

    base, tuned = _pair(tmp_path)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Q:12+07\\nA:\nQ:50-49\\nA:\n")
    spec = get_spec("patch")
    out = tmp_path / "s.json"
    execute(spec, spec.params(base, tuned, eval=(f"kl:{prompts}",), sweep="layers"), json_out=str(out), report=False)
    d = json.loads(out.read_text())
    rows = {r["label"]: r for r in d["rows"]}
    assert list(rows) == ["layer 0", "layer 1", "all but layer 0", "all but layer 1"]
    # the tune moved layer 0 most: it alone recovers most of the KL, all but it least
    assert rows["layer 0"]["recovered"] > rows["layer 1"]["recovered"]
    assert rows["all but layer 0"]["recovered"] < rows["all but layer 1"]["recovered"]
    one = tmp_path / "one.json"  # a row equals the same patch run on its own
    execute(spec, spec.params(base, tuned, subset="layers:1", eval=(f"kl:{prompts}",)), json_out=str(one),
            report=False)
    assert json.loads(one.read_text())["kl_to_tuned"] == pytest.approx(rows["layer 1"]["metrics"]["kl_to_tuned"],
                                                                         rel=1e-9)


@pytest.mark.parametrize("argv, words", [
    (["--subset", "layer:0"], "unknown subset"),
    (["--subset", "layers:7"], "block 7 does not exist"),
    (["--subset", "layers:3-1"], "runs backwards"),
    (["--subset", "kinds:qq"], "unknown module kind"),
    (["--subset", "heads:0.9"], "head 9 does not exist"),
    (["--subset", "selector:nope:0.1"], "unknown selector"),
    (["--subset", "selector:magnitude:1.5"], "density must be a fraction"),
    (["--rank", "0"], "--rank must be a whole number"),
    (["--alpha", "nan"], "--alpha must be a finite number"),
    (["--alpha", "inf"], "--alpha must be a finite number"),
    (["--eval", "accuracy"], "unknown evaluation"),
    (["--sweep", "layers"], "needs an --eval"),
    (["--eval", "kl:a.txt", "--eval", "kl:b.txt"], "given 2 times"),
    (["--eval", "demo", "--sweep", "density", "--selector", "block_influence"], "selector of element scores"),
])
def test_bad_patch_input_is_one_line_and_exit_2(tmp_path, capsys, argv, words):
    from analysis.__main__ import main

    base, tuned = _pair(tmp_path)
    code = main(["patch", base, tuned, *argv, "--json", str(tmp_path / "o.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o.json").exists()


def test_an_output_that_is_an_input_is_refused(tmp_path, capsys):
    from analysis.__main__ import main

    base, tuned = _pair(tmp_path)
    for argv in (["--out", base], ["--out", tuned], ["--json", str(tmp_path / "tuned" / "config.json")]):
        args = ["patch", base, tuned, *argv] + ([] if "--json" in argv else ["--json", str(tmp_path / "o.json")])
        code = main(args + ["--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
    assert Pair.open(base, tuned).theta("layers.0.mlp.up_proj.weight")[1].abs().sum() > 0  # inputs intact


def test_bad_behaviour_input_is_one_line_and_exit_2(tmp_path, capsys):
    from analysis.__main__ import main

    base, tuned = _pair(tmp_path)
    empty = tmp_path / "e.txt"
    empty.write_text("\n\n")
    for argv, words in ((["--prompt", ""], "an empty prompt"), ([], "give --prompt"),
                        (["--prompts", str(empty)], "no prompts"), (["--prompts", str(tmp_path / "x.csv")], ".jsonl"),
                        (["--prompt", "hi", "--top", "0"], "--top")):
        code = main(["behaviour", base, tuned, *argv, "--json", str(tmp_path / "o.json"), "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and words in err and len(err.splitlines()) == 1, (argv, err)


def test_a_prompt_that_tokenizes_to_nothing_is_one_line(tmp_path):
    from analysis.behaviour.kl import encode

    class Empty:
        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": []}

    with pytest.raises(PromptsError, match="tokenizes to nothing"):
        encode(Empty(), ["   "])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_subset_parser_answers_every_text_with_a_subset_or_one_line(text):
    try:
        s = parse_subset(text)
    except PatchError as e:
        assert "\n" not in str(e).strip()
    else:
        assert s.what in ("all", "none", "layers", "kinds", "heads", "changed", "mask", "selector")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.booleans())
def test_prompts_parser_answers_every_file_with_prompts_or_one_line(text, jsonl):
    try:
        out = parse_prompts(text, jsonl=jsonl, where="f")
    except PromptsError as e:
        assert "\n" not in str(e)
    else:
        assert out and all(isinstance(p, str) for p in out)


def test_the_streaming_writer_is_read_back_by_safetensors(tmp_path):
    from safetensors import safe_open

    from analysis.checkpoints.writer import SafetensorsWriter

    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(2, 2).bfloat16(),
          "d": torch.tensor(True), "e": torch.zeros(0, 4)}
    with SafetensorsWriter(tmp_path / "x.safetensors", [(n, str(t.dtype)[6:], tuple(t.shape)) for n, t in ts.items()],
                           metadata={"format": "pt"}) as w:
        for n, t in ts.items():
            w.write(n, t)
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        for n, t in ts.items():
            assert torch.equal(f.get_tensor(n), t), n
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsWriter(tmp_path / "y.safetensors", [("a", "float32", (1,))]):
            pass
    assert not list(tmp_path.glob("*y.safetensors*"))


def test_recovered_gain_is_undefined_when_the_tune_did_not_move_the_metric():
    from analysis.behaviour.evals import recovered

    assert recovered(0.5, 0.25, 0.75) == 0.5 and recovered(0.3, 0.3, 0.3) is None
    assert math.isclose(recovered(1.0, 2.0, 0.0), 0.5)


@pytest.mark.parametrize("ev", ["kl", "lm"])
def test_weight_space_ig_sums_to_the_measured_difference(tmp_path, ev):
    """Σ_j A_j = m(θ¹) − m(θ⁰) within 1e-3 relative; the per-layer parts sum to the whole; the layer the
    tune moved most carries most; the model is θ⁰ again afterwards."""
    from analysis.behaviour.evals import Evaluator, parse_eval
    from analysis.behaviour.weight_ig import weight_ig
    from analysis.checkpoints.models import load_model

    base, tuned = _pair(tmp_path, scale=0.02)
    f = tmp_path / "p.txt"
    f.write_text("Q:12+07\\nA:19\nQ:50-49\\nA:1\nQ:33+33\\nA:66\n")
    pair = Pair.open(base, tuned)
    model, tok = load_model(base, device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
    patcher = Patcher(model, pair)
    evaluator = Evaluator(patcher, tok, [parse_eval(f"{ev}:{f}")])
    tuned_m, base_m = evaluator.references()
    a = weight_ig(patcher, evaluator)
    key = "kl_to_tuned" if ev == "kl" else "loss"
    assert a["measured"] == pytest.approx(-(tuned_m[key] - base_m[key]), rel=1e-5)  # m = −KL or −loss
    assert a["conservation_error"] <= 1e-3 and a["converged"]
    assert abs(a["total"] - a["measured"]) <= 1e-3 * abs(a["measured"])
    assert sum(r["attribution"] for r in a["by_layer"]) == pytest.approx(a["total"], rel=1e-9)
    layers = {r["layer"]: abs(r["attribution"]) for r in a["by_layer"]}
    assert layers[0] > layers[1]
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == grad_before[n] and p.grad is None, n


def test_attribute_needs_a_differentiable_evaluation(tmp_path, capsys):
    from analysis.__main__ import main

    base, tuned = _pair(tmp_path)
    code = main(["patch", base, tuned, "--eval", "demo", "--attribute", "--json", str(tmp_path / "o.json"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--attribute needs a differentiable first --eval" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA: run on the device when one is lent")
def test_behaviour_and_a_sweep_on_cuda_match_the_cpu(tmp_path):
    """bf16 weights and fp32 log-softmax on the GPU give the CPU's float32 KL within bf16's rounding."""
    from analysis.behaviour.kl import behaviour
    from analysis.specs import get_spec

    base, tuned = _pair(tmp_path, torch.bfloat16)
    prompts = ["Q:12+07\nA:", "Q:99-98\nA:1"]
    cpu = behaviour(base, tuned, prompts, device="cpu")
    gpu = behaviour(base, tuned, prompts, device="cuda")
    assert gpu["device"].startswith("cuda") and gpu["kl_mean"] == pytest.approx(cpu["kl_mean"], rel=0.05)
    f = tmp_path / "p.txt"
    f.write_text("Q:12+07\\nA:\n")
    spec = get_spec("patch")
    rows = [spec.run(spec.params(base, tuned, eval=(f"kl:{f}",), sweep="layers", device=d), None)["rows"]
            for d in ("cpu", "cuda")]
    assert [r["recovered"] for r in rows[1]] == pytest.approx([r["recovered"] for r in rows[0]], abs=0.05)


def test_a_jsonl_prompt_may_hold_a_line_separator_and_a_file_a_byte_order_mark(tmp_path):
    from analysis.behaviour.prompts import read_prompts

    f = tmp_path / "p.jsonl"
    f.write_bytes("\ufeff".encode() + json.dumps({"prompt": "a\u2028b"}, ensure_ascii=False).encode() + b"\r\n")
    assert read_prompts(str(f)) == ["a\u2028b"]


def test_a_rank_patch_of_another_selection_computes_its_own_svd(tmp_path):
    """The SVD cache belongs to one selection: the same tag with another selection recomputes."""
    from analysis.checkpoints.models import load_model

    base, tuned = _pair(tmp_path)
    pair = Pair.open(base, tuned)
    model, _ = load_model(base, device="cpu")
    patcher = Patcher(model, pair)
    k = "layers.0.mlp.up_proj.weight"
    half = torch.zeros(pair.shapes[k], dtype=torch.bool)
    half[:, :10] = True
    patcher.apply({k: True}, rank=1, tag="subset")
    patcher.apply({k: half}, rank=1, tag="subset")
    t0, t1 = pair.theta(k)
    want = patched(t0, t1, half, rank=1, block_matrix=True)
    assert torch.equal(patcher.params[k].detach(), want.float())
