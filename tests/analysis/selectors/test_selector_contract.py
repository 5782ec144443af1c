"""One contract over every entry of SELECTORS: shapes at each granularity, finite values,
determinism under a seed, and the model left exactly as found (no hooks, parameters bitwise,
.grad None, training modes and requires_grad flags)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from selector_fixtures import demo_batches, no_hooks_left, planted_pair

from analysis.importance import scope_names
from analysis.selectors import SELECTORS, Scores
from analysis.selectors.base import row_axis

LAYERS, HEADS, CHANNELS = 2, 4, 96  # tiny_llama


@pytest.fixture(scope="module")
def batches():
    return demo_batches()


@pytest.fixture(scope="module")
def options(tmp_path_factory):
    """Options a selector needs to run at all (adding a selector with required options = a line here)."""
    base, tuned = planted_pair(tmp_path_factory.mktemp("pair"))
    return {"diff": {"base": str(base), "tuned": str(tuned)}}


def _check_shapes(scores: Scores, model, granularity: str) -> None:
    params = dict(model.named_parameters())
    assert scores.granularity == granularity
    assert scores.shapes == {n: tuple(p.shape) for n, p in params.items()}
    if granularity in ("element", "row"):
        assert set(scores.values) <= set(params)
        scope_names(scores, "blocks")  # every block weight is scored
        for n, v in scores.values.items():
            want = params[n].shape if granularity == "element" else (params[n].shape[row_axis(n, scores.arch)],)
            assert tuple(v.shape) == tuple(want), n
        tensors = list(scores.values.values())
    else:
        want = {"head": (LAYERS, HEADS), "channel": (LAYERS, CHANNELS), "layer": (LAYERS,)}[granularity]
        assert tuple(scores.values.shape) == want
        tensors = [scores.values]
    for t in tensors:
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert bool(torch.isfinite(t).all())


def _same(a: Scores, b: Scores) -> bool:
    if isinstance(a.values, dict):
        return a.values.keys() == b.values.keys() and all(torch.equal(a.values[n], b.values[n]) for n in a.values)
    return torch.equal(a.values, b.values)


@pytest.mark.parametrize("name", list(SELECTORS))
def test_selector_contract(name, batches, options):
    entry = SELECTORS[name]
    assert entry.label and entry.description and entry.paper and entry.granularities
    model = tiny_llama()
    model.train()  # selectors score in eval mode and must restore this
    model.model.layers[1].mlp.eval()  # ... including a mixed mode
    frozen = model.model.layers[0].mlp.up_proj.weight
    frozen.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}

    for granularity in entry.granularities:
        kwargs = dict(options.get(name, {}))
        if len(entry.granularities) > 1:
            kwargs["granularity"] = granularity
        first = entry.fn(model, batches, seed=0, **kwargs)
        again = entry.fn(model, batches, seed=0, **kwargs)
        _check_shapes(first, model, granularity)
        assert _same(first, again), f"{name} at {granularity} is not deterministic under a seed"
        if name == "random":
            assert not _same(first, entry.fn(model, batches, seed=1, **kwargs))

        assert no_hooks_left(model)
        for n, p in model.named_parameters():
            assert torch.equal(p.detach().view(torch.int32), before[n].view(torch.int32)), n
            assert p.grad is None, n
            assert p.requires_grad == (p is not frozen), n
        assert {n: m.training for n, m in model.named_modules()} == modes
