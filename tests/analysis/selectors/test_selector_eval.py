"""Selector evaluation: rank statistics against hand-computed values and brute force, then
agreement, predictive power for a diff mask, and stability across calibration sets."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama
from selector_fixtures import PLANTED_ABOVE, demo_batches, planted_pair

from analysis.importance import evaluation as ev
from analysis.importance.scores import ImportanceError, compute_scores
from analysis.importance.selectors import SELECTORS


def test_average_ranks_and_spearman_by_hand():
    assert ev.average_ranks(torch.tensor([10.0, 20.0, 20.0, 5.0])).tolist() == [2.0, 3.5, 3.5, 1.0]
    # ranks of b = 1, 2, 3.5, 5, 3.5: cov 8, variances 10 and 9.5
    rho = ev.spearman_rho(torch.tensor([1.0, 2, 3, 4, 5]), torch.tensor([5.0, 6, 7, 8, 7]))
    assert rho == pytest.approx(8 / math.sqrt(95), abs=1e-12)
    assert ev.spearman_rho(torch.tensor([3.0, 1, 2]), torch.tensor([30.0, 10, 20])) == pytest.approx(1.0)
    assert ev.spearman_rho(torch.tensor([3.0, 1, 2]), torch.tensor([-30.0, -10, -20])) == pytest.approx(-1.0)
    assert math.isnan(ev.spearman_rho(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))


def test_auroc_and_precision_at_k_by_hand():
    scores = torch.tensor([0.9, 0.8, 0.8, 0.3, 0.1])
    labels = torch.tensor([True, False, True, False, False])
    # pairs: 0.9 beats 3 negatives; 0.8 ties one (1/2) and beats two -> 5.5 of 6
    assert ev.auroc(scores, labels) == pytest.approx(5.5 / 6, abs=1e-12)
    # k = 2: 0.9 and the first 0.8 (position 1, a negative)
    assert ev.precision_at_k(scores, labels) == 0.5
    assert math.isnan(ev.auroc(scores, torch.zeros(5, dtype=torch.bool)))


def test_auroc_equals_brute_force_and_roc_area():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 20, (400,), generator=g).float()  # many ties
    labels = torch.rand(400, generator=g) < 0.3
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()).mean()
    assert ev.auroc(scores, labels) == pytest.approx(float(brute), abs=1e-12)
    fpr, tpr = ev.roc_curve(scores, labels, max_points=10_000)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert float(torch.trapezoid(tpr, fpr)) == pytest.approx(float(brute), abs=1e-12)
    small_f, small_t = ev.roc_curve(scores, labels, max_points=8)
    assert len(small_f) <= 8 and small_f[-1] == 1 and small_t[-1] == 1 and small_f[0] == 0


def test_agreement_of_magnitude_and_its_opposite():
    model = tiny_llama()
    scores = {name: SELECTORS[name].fn(model) for name in ("magnitude", "smallest_magnitude", "random")}
    agree = ev.agreement(scores, 0.3)
    assert agree.names == ["magnitude", "smallest_magnitude", "random"]
    assert torch.equal(agree.spearman, agree.spearman.T) and torch.equal(agree.spearman.diagonal(), torch.ones(3))
    assert agree.spearman[0, 1].item() == pytest.approx(-1.0, abs=1e-9)
    assert agree.jaccard[0, 1].item() == 0.0  # the top 30% largest and smallest are disjoint
    assert abs(agree.spearman[0, 2].item()) < 0.05
    # random top-k vs anything: Jaccard ≈ d/(2−d) = 0.176 at d = 0.3
    assert agree.jaccard[0, 2].item() == pytest.approx(0.3 / 1.7, abs=0.02)
    assert set(agree.to_dict()) == {"names", "density", "scope", "spearman", "jaccard"}


def test_predictive_power_against_a_planted_diff(tmp_path):
    base, tuned = planted_pair(tmp_path)
    model = tiny_llama()
    changed = {n: v.bool() for n, v in
               SELECTORS["diff"].fn(model, base=str(base), tuned=str(tuned)).values.items()}
    stripped = {n.removeprefix("model."): m for n, m in changed.items()}  # names as another wrapper stores them
    perfect = ev.predictive_power(SELECTORS["diff"].fn(model, base=str(base), tuned=str(tuned)), stripped)
    assert perfect.k == len(PLANTED_ABOVE) and perfect.precision_at_k == 1.0 and perfect.auroc == 1.0
    assert perfect.n == sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and ".layers." in n)
    assert perfect.base_rate == pytest.approx(3 / perfect.n)
    # a score that ranks the planted elements last
    inverse = SELECTORS["diff"].fn(model, base=str(base), tuned=str(tuned))
    inverse.values = {n: -v for n, v in inverse.values.items()}
    worst = ev.predictive_power(inverse, changed)
    assert worst.auroc == 0.0 and worst.precision_at_k == 0.0
    # structured scores are broadcast; uncovered elements tie at the bottom
    heads = ev.predictive_power(compute_scores(model, "random", granularity="head"), changed)
    assert 0.0 <= heads.auroc <= 1.0 and len(heads.fpr) == len(heads.tpr)
    with pytest.raises(ImportanceError, match="no entry for model.layers.1"):
        partial = {n: m for n, m in changed.items() if "layers.1." not in n}
        ev.predictive_power(SELECTORS["magnitude"].fn(model), partial)


def test_stability_across_disjoint_calibration_sets():
    model = tiny_llama()
    a, b = demo_batches(samples=4, offset=0), demo_batches(samples=4, offset=4)
    same = ev.stability(model, "taylor", a, a, density=0.1)
    other = ev.stability(model, "taylor", a, b, density=0.1)
    assert same == 1.0
    assert 0.0 < other < 1.0
    assert ev.stability(model, "magnitude", a, b, density=0.1) == 1.0
