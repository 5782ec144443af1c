"""One contract over every entry of SELECTORS: shapes at each granularity, finite values,
determinism under a seed, and the model left exactly as found (no hooks, parameters bitwise,
.grad None, training modes and requires_grad flags)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from selector_fixtures import demo_batches, no_hooks_left, planted_pair

from analysis.importance.scores import scope_names
from analysis.importance.selectors import SELECTORS, Scores
from analysis.importance.selectors.base import row_axis

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


@pytest.mark.parametrize("name", list(SELECTORS))
def test_declared_options_are_typed_keyword_arguments(name):
    """Every option a selector declares is a keyword argument of its function, with a type the
    CLI can read a text value as, and a default of that type (or None)."""
    import inspect

    entry = SELECTORS[name]
    params = inspect.signature(entry.fn).parameters
    kinds = entry.option_types()
    assert list(kinds) == list(entry.options)
    for opt, types in kinds.items():
        assert params[opt].kind is inspect.Parameter.KEYWORD_ONLY, opt
        assert types and set(types) <= {bool, int, float, str}, opt
        default = params[opt].default
        assert default is None or isinstance(default, types), (opt, default, types)


def test_parse_options_converts_to_the_declared_types():
    from analysis.importance.selectors import SelectorError, parse_options

    assert parse_options("principal", {"k": "3"}) == {"k": 3}
    assert type(parse_options("principal", {"k": "3"})["k"]) is int
    assert parse_options("principal", {"k": "0.25"}) == {"k": 0.25}
    assert parse_options("lisa", {"active_layers": "4", "mode": "weight_norm"}) == {"active_layers": 4,
                                                                                   "mode": "weight_norm"}
    assert parse_options("head_importance", {"normalize": "False"}) == {"normalize": False}
    assert parse_options("sensitivity", {"beta1": "0.5", "beta2": "1e-1"}) == {"beta1": 0.5, "beta2": 0.1}
    assert parse_options("diff", {"base": "123", "tol": "0"}) == {"base": "123", "tol": 0.0}  # a path stays text
    assert parse_options("random", {}) == {}
    for name, raw, says in [
        ("lisa", {"active_layers": "2.0"}, "lisa: option active_layers must be an integer, got '2.0'"),
        ("head_importance", {"normalize": "1"}, "option normalize must be true or false, got '1'"),
        ("sensitivity", {"beta2": "inf"}, "option beta2 must be a finite number, got 'inf'"),
        ("fisher", {"micro": "1"}, "fisher has no option 'micro'; its options: micro_batch"),
        ("random", {"granularity": "row"}, "'granularity' is set by --granularity, not as an option of random"),
        ("random", {"seed": "1"}, "'seed' is set by --seed"),
        ("fluctuation", {"x": "1"}, "its options: standardize"),  # granularity is set by its flag
    ]:
        with pytest.raises(SelectorError) as e:
            parse_options(name, raw, fixed={"seed": "--seed", "granularity": "--granularity"})
        assert says in str(e.value) and "\n" not in str(e.value)
