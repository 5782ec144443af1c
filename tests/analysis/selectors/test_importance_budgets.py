"""Budgets -> masks (exact count, score ordering, deterministic ties), scope, and aggregation of
element scores to rows, GQA heads, channels and layers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama
from selector_fixtures import demo_batches

from analysis.importance.scores import (ImportanceError, aggregate, allocate, compute_scores, expand, global_topk,
                                        per_layer_topk, scope_names, structured_mask, summarize)
from analysis.importance.selectors import SELECTORS, SelectorError
from analysis.checkpoints.structure import tensor_role

L0, L1 = "model.layers.0.", "model.layers.1."


def _scores(model, fill=None, seed=0):
    """Element Scores of the model with values replaced: integer scores 0..3 (heavy ties) or a constant."""
    s = SELECTORS["magnitude"].fn(model)
    g = torch.Generator().manual_seed(seed)
    values = {n: (torch.full(v.shape, float(fill)) if fill is not None
                  else torch.randint(0, 4, v.shape, generator=g).float()) for n, v in s.values.items()}
    return dataclasses.replace(s, values=values)


def _flat(scores, mask, names):
    return (torch.cat([scores.values[n].reshape(-1) for n in names]),
            torch.cat([mask[n].reshape(-1) for n in names]))


def _assert_topk(x, m, k):
    assert int(m.sum()) == k
    if 0 < k < x.numel():
        assert x[m].min() >= x[~m].max()
        t = x[m].min()
        tied = (x == t).nonzero().reshape(-1)
        chosen = m[tied]
        assert torch.equal(chosen, torch.sort(chosen, descending=True, stable=True).values)  # a prefix


@pytest.mark.parametrize("density", [0.0, 0.013, 0.37, 0.5, 1.0])
def test_global_topk_contract_with_ties(density):
    scores = _scores(tiny_llama())
    mask = global_topk(scores, density)
    names = scope_names(scores)
    assert set(mask) == set(scores.shapes)  # one entry per parameter
    assert names == [n for n in scores.shapes if ".layers." in n and "norm" not in n]  # 14 block matrices
    x, m = _flat(scores, mask, names)
    _assert_topk(x, m, round(density * x.numel()))
    assert not any(mask[n].any() for n in mask if n not in names)


def test_all_equal_scores_select_the_first_elements():
    scores = _scores(tiny_llama(), fill=1.0)
    x, m = _flat(scores, global_topk(scores, 0.25), scope_names(scores))
    k = round(0.25 * x.numel())
    assert m[:k].all() and not m[k:].any()


def test_scope_all_counts_every_parameter():
    scores = _scores(tiny_llama())
    mask = global_topk(scores, 0.2, scope="all")
    n = sum(v.numel() for v in scores.values.values())
    assert sum(int(v.sum()) for v in mask.values()) == round(0.2 * n)


@pytest.mark.parametrize("group", ["layer", "tensor"])
def test_per_layer_topk_contract(group):
    scores = _scores(tiny_llama(), seed=3)
    density = 0.3
    mask = per_layer_topk(scores, density, group=group)
    names = scope_names(scores)
    groups = {}
    for n in names:
        groups.setdefault(n if group == "tensor" else tensor_role(n, "llama").layer, []).append(n)
    total = 0
    for members in groups.values():
        x, m = _flat(scores, mask, members)
        k = int(m.sum())
        assert abs(k - density * x.numel()) < 1  # uniform density in every group
        _assert_topk(x, m, k)
        total += k
    assert total == round(density * sum(scores.values[n].numel() for n in names))


def test_allocate_is_exact():
    assert allocate([10, 10, 10], 0.15) == [2, 1, 1]  # 4.5 -> 4 (round half to even), remainders 0.5 each
    assert allocate([3, 5, 7], 1.0) == [3, 5, 7]
    assert sum(allocate([97, 13, 1000, 1], 0.29)) == round(0.29 * 1111)


def test_bad_budgets_are_one_line_errors():
    scores = _scores(tiny_llama())
    for density in (-0.1, 1.5, float("nan")):
        with pytest.raises(ImportanceError, match="density"):
            global_topk(scores, density)
    with pytest.raises(ImportanceError, match="scope"):
        global_topk(scores, 0.1, scope="attention")
    up = L0 + "mlp.up_proj.weight"
    nan = dataclasses.replace(scores, values={**scores.values, up: torch.full((96, 64), float("nan"))})
    with pytest.raises(ImportanceError, match="NaN"):
        global_topk(nan, 0.1)


def test_wanda_has_no_norm_scores_under_scope_all():
    model = tiny_llama()
    wanda = SELECTORS["wanda"].fn(model, demo_batches(samples=2))
    global_topk(wanda, 0.1)  # blocks: fine
    with pytest.raises(ImportanceError, match="no score for model.layers.0.input_layernorm.weight"):
        global_topk(wanda, 0.1, scope="all")


def _planted_gqa():
    """Zero scores with values planted in known rows / columns of the 4-head, 2-kv-head Llama."""
    s = _scores(tiny_llama(), fill=0.0)
    v = s.values
    v[L1 + "self_attn.q_proj.weight"][32:48] = 1.0  # q rows of head 2, layer 1
    v[L0 + "self_attn.o_proj.weight"][:, 48:64] = 2.0  # o columns of head 3, layer 0
    v[L0 + "self_attn.k_proj.weight"][16:32] = 1.0  # k rows of kv head 1 (query heads 2, 3), layer 0
    v[L1 + "mlp.gate_proj.weight"][5] = 1.0  # gate row of channel 5, layer 1
    v[L0 + "mlp.down_proj.weight"][:, 7] = 3.0  # down column of channel 7, layer 0
    return s


def test_head_aggregation_maps_gqa_rows_and_columns():
    heads = aggregate(_planted_gqa(), "head").values
    expected = torch.zeros(2, 4)
    expected[1, 2] = 16 * 64  # q rows
    expected[0, 3] = 2 * 64 * 16  # o columns
    expected[0, 2] += 16 * 64 / 2  # kv head 1 split over its two query heads
    expected[0, 3] += 16 * 64 / 2
    assert torch.equal(heads, expected)
    # mean: per head 1024 q + 1024 o + 512 k + 512 v elements
    mean = aggregate(_planted_gqa(), "head", reduce="mean").values
    assert mean[1, 2].item() == pytest.approx(1024 / 3072)


def test_channel_layer_and_row_aggregation():
    s = _planted_gqa()
    channels = aggregate(s, "channel").values
    expected = torch.zeros(2, 96)
    expected[1, 5] = 64
    expected[0, 7] = 3 * 64
    assert torch.equal(channels, expected)
    layers = aggregate(s, "layer").values
    assert torch.equal(layers, torch.tensor([2 * 64 * 16 + 16 * 64 + 3 * 64, 16 * 64 + 64.0]))
    rows = aggregate(s, "row").values
    assert rows[L1 + "mlp.gate_proj.weight"][5] == 64 and rows[L1 + "mlp.gate_proj.weight"].sum() == 64
    summary = summarize(s)
    assert [r["layer"] for r in summary["layers"]] == [0, 1]
    assert summary["layers"][1]["sum"] == 16 * 64 + 64
    assert {r["kind"]: r["sum"] for r in summary["kinds"]}["down"] == 3 * 64
    assert summary["heads"]["sum"][1][2] == 16 * 64


def test_structured_head_mask_covers_the_gqa_slices():
    s = _planted_gqa()
    heads = dataclasses.replace(aggregate(s, "head"), values=torch.tensor([[0.0, 0, 0, 0], [0, 0, 1, 0]]))
    mask = structured_mask(heads, 1 / 8)  # 8 heads -> 1
    assert mask[L1 + "self_attn.q_proj.weight"][32:48].all()
    assert mask[L1 + "self_attn.o_proj.weight"][:, 32:48].all()
    assert mask[L1 + "self_attn.k_proj.weight"][16:32].all() and mask[L1 + "self_attn.v_proj.weight"][16:32].all()
    assert sum(int(m.sum()) for m in mask.values()) == 4 * 16 * 64  # nothing else
    only_o = structured_mask(heads, 1 / 8, components=("o",))
    assert sum(int(m.sum()) for m in only_o.values()) == 64 * 16
    assert only_o[L1 + "self_attn.o_proj.weight"][:, 32:48].all()


def test_structured_channel_and_layer_masks():
    s = _planted_gqa()
    channels = aggregate(s, "channel")
    mask = structured_mask(channels, 2 / 192)  # the two planted channels
    assert mask[L0 + "mlp.down_proj.weight"][:, 7].all() and mask[L0 + "mlp.gate_proj.weight"][7].all()
    assert mask[L1 + "mlp.up_proj.weight"][5].all() and mask[L1 + "mlp.down_proj.weight"][:, 5].all()
    assert sum(int(m.sum()) for m in mask.values()) == 2 * 3 * 64
    layers = aggregate(s, "layer")
    mask = structured_mask(layers, 0.5)  # layer 0 scores higher
    assert all(mask[n].all() == n.startswith(L0) for n in scope_names(layers))


def test_expand_broadcasts_units_back_to_elements():
    heads = dataclasses.replace(aggregate(_planted_gqa(), "head"), values=torch.arange(8.0).reshape(2, 4))
    el = expand(heads, fill=-1.0).values
    assert torch.equal(el[L1 + "self_attn.q_proj.weight"][32:48], torch.full((16, 64), 6.0))
    assert torch.equal(el[L1 + "self_attn.o_proj.weight"][:, 48:64], torch.full((64, 16), 7.0))
    assert torch.equal(el[L1 + "self_attn.k_proj.weight"][16:32], torch.full((16, 64), 6.5))  # mean of heads 2, 3
    assert torch.equal(el[L1 + "mlp.up_proj.weight"], torch.full((96, 64), -1.0))


def test_gpt2_conv1d_rows_are_output_units():
    model = tiny_gpt2()
    rows = compute_scores(model, "magnitude", granularity="row")
    c_fc = "transformer.h.0.mlp.c_fc.weight"  # Conv1D [in 32, out 128]
    assert torch.allclose(rows.values[c_fc], model.transformer.h[0].mlp.c_fc.weight.detach().abs().sum(0))
    mask = structured_mask(rows, 0.25)
    assert mask[c_fc].shape == (32, 128) and bool((mask[c_fc].all(0) | ~mask[c_fc].any(0)).all())  # whole columns
    heads = aggregate(SELECTORS["magnitude"].fn(model), "head").values
    assert heads.shape == (2, 4) and bool((heads > 0).all())


def test_compute_scores_dispatch_and_errors():
    model = tiny_llama()
    batches = demo_batches(samples=2)
    taylor_heads = compute_scores(model, "taylor", batches, granularity="head")
    assert torch.equal(taylor_heads.values, aggregate(compute_scores(model, "taylor", batches), "head").values)
    assert compute_scores(model, "random", granularity="layer", seed=3).values.shape == (2,)
    assert compute_scores(model, "fluctuation", batches, granularity="head").values.shape == (2, 4)
    with pytest.raises(SelectorError, match="unknown selector 'nope'"):
        compute_scores(model, "nope")
    with pytest.raises(ImportanceError, match="no option 'lr'"):
        compute_scores(model, "taylor", batches, lr=1.0)
    with pytest.raises(ImportanceError, match="cannot give head"):
        compute_scores(model, "block_influence", batches, granularity="head")
    with pytest.raises(ImportanceError, match="needs calibration data"):
        compute_scores(model, "wanda")
    with pytest.raises(ImportanceError, match="unknown granularity"):
        compute_scores(model, "magnitude", granularity="neuron")


def test_calibration_length_is_bounded_by_the_model_positions():
    from conftest import tiny_gpt2

    from analysis.importance.scores import SEQ_LEN, calibration_length

    assert SEQ_LEN == 64
    assert calibration_length({"max_position_embeddings": 32}) == 32  # not given: 64, or fewer positions
    assert calibration_length({"max_position_embeddings": 2048}) == 64
    assert calibration_length(None) == 64 and calibration_length(None, 10**9) == 10**9  # no config: no bound
    assert calibration_length(tiny_gpt2().config, 64) == 64  # GPT-2: n_positions = 64
    assert calibration_length({"max_position_embeddings": 32}, 16) == 16
    with pytest.raises(ImportanceError) as e:
        calibration_length(tiny_gpt2().config, 65, where="gpt2-dir")
    assert str(e.value) == "--seq-len 65 is more than the 64 positions of gpt2-dir (n_positions of its config)"
