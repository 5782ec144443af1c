"""The paper's findings reproduce on the demo family (arXiv 2505.11711 at toy scale):
RL updates are far sparser than SFT's, and two RL runs overlap more than chance."""

from __future__ import annotations


from analysis.sparsity.diff import diff_checkpoints
from analysis.sparsity.overlap import overlap


def test_rl_is_sparser_than_sft(demo):
    sft = diff_checkpoints(demo / "base", demo / "sft", tol=1e-5)
    assert sft.skipped == [] and sft.total_params > 100_000
    assert sft.update_sparsity < 0.05  # SFT changes almost everything
    for run in ("rl-seed1", "rl-seed2"):
        rl = diff_checkpoints(demo / "sft", demo / run, tol=1e-5)
        assert rl.total_params == sft.total_params
        assert rl.update_sparsity > sft.update_sparsity + 0.3, (run, rl.update_sparsity)


def test_rl_runs_overlap_more_than_chance(demo):
    (pair,) = overlap(demo / "sft", [demo / "rl-seed1", demo / "rl-seed2"], tol=1e-5).pairs()
    assert pair["o1"] > pair["o1_random"] + 0.1
    assert pair["o2"] > pair["o2_random"] + 0.1
    assert pair["jaccard"] > pair["jaccard_random"]
    # the magnitude-matched baseline explains part of it: it lies between random and measured
    assert pair["o1_random"] < pair["o1_matched"] <= pair["o1"]
