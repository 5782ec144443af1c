"""Trajectories (analysis/sparsity/trajectory.py): hand-computed counts on a crafted run, equality with the
pairwise diffs it replaces on the demo's run, and the ``trajectory`` command."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from analysis.__main__ import main
from analysis.sparsity.diff import diff_checkpoints
from analysis.errors import SubnetscopeError
from analysis.sparsity.trajectory import infer_steps, trajectory

W = "model.layers.0.mlp.up_proj.weight"
# run of three checkpoints over 10 elements of a base: element -> increment of θ at that checkpoint
RUN = [{0: 1.0, 1: 1.0, 2: 1.0},  # I_1 = {0, 1, 2}
       {1: 1.0, 2: 2.0, 3: 1.0, 4: 1.0},  # I_2 = {1, 2, 3, 4}: 0 back at the base
       {2: 2.0, 3: 1.0, 4: 3.0, 5: 1.0}]  # I_3 = {2, 3, 4, 5}: 0 and 1 back at the base


def _run(tmp_path):
    base = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    save_file({W: base}, tmp_path / "base.safetensors")
    paths = []
    for k, inc in enumerate(RUN):
        t = base.clone().reshape(-1)
        for i, v in inc.items():
            t[i] += v
        p = tmp_path / f"checkpoint-{(k + 1) * 100}.safetensors"
        save_file({W: t.reshape(2, 5)}, p)
        paths.append(str(p))
    return str(tmp_path / "base.safetensors"), paths


def test_hand_computed_run(tmp_path):
    base, cks = _run(tmp_path)
    r = trajectory(base, cks, steps=[100, 200, 300])
    assert [x.changed_params for x in r.vs_base] == [3, 4, 4]
    # against the previous checkpoint: 1st vs base {0,1,2}; 2nd vs 1st {0,2,3,4}; 3rd vs 2nd {1,4,5}
    assert [x.changed_params for x in r.vs_previous] == [3, 4, 3]
    assert r.cumulative == [3, 5, 6]
    assert r.first_changed == [3, 2, 1]  # {0,1,2}, then {3,4}, then {5}
    assert r.returned == [0, 1, 2]  # element 0 at the 2nd; 0 and 1 at the 3rd
    assert r.with_final == [1, 3, 4]  # |I_k ∩ I_3|: {2}, {2,3,4}, all four
    d = r.to_json()
    assert d["first_changed_histogram"] == {"steps": [100, 200, 300], "counts": [3, 2, 1], "never": 4}
    first = d["checkpoints"][0]
    assert first["overlap_with_final"] == {"o1": 1 / 3, "o2": 1 / 4, "jaccard": 1 / 6, "intersection": 1}
    assert first["vs_base"]["update_sparsity"] == pytest.approx(0.7)
    assert d["layers"] == [{"layer": 0, "update_sparsity": [0.7, 0.6, 0.6]}]
    assert infer_steps(cks) == [100, 200, 300]  # from the names


def test_equals_the_pairwise_diffs_on_the_demo_run(demo):
    from analysis.families.demo import trajectory_dirs

    cks = trajectory_dirs(demo)
    assert [p.name for p in cks] == ["step-10", "step-20", "step-30", "step-40", "step-50"]
    r = trajectory(demo / "sft", cks)
    assert r.steps == [10, 20, 30, 40, 50]
    prev = demo / "sft"
    for k, ck in enumerate(cks):
        assert r.vs_base[k].to_json() == diff_checkpoints(demo / "sft", ck).to_json()
        assert r.vs_previous[k].to_json() == diff_checkpoints(prev, ck).to_json()
        prev = ck
    # the last checkpoint is the demo's rl-seed1: the same weights, bit for bit
    assert diff_checkpoints(cks[-1], demo / "rl-seed1", tol=0.0).changed_params == 0
    # the changed set grows; first changes add up to the cumulative set
    assert r.cumulative == sorted(r.cumulative)
    assert sum(r.first_changed) == r.cumulative[-1]
    assert r.with_final[-1] == r.vs_base[-1].changed_params


def test_cli(tmp_path, capsys):
    base, cks = _run(tmp_path)
    out = tmp_path / "t.json"
    assert main(["trajectory", base, *cks, "--json", str(out), "--quiet"]) == 0
    d = json.loads(out.read_text())
    assert [c["step"] for c in d["checkpoints"]] == [100, 200, 300]
    assert [c["returned_to_base"] for c in d["checkpoints"]] == [0, 1, 2]
    assert "never changed: 4" in capsys.readouterr().out
    assert main(["trajectory", base, *cks, "--steps", "1,2", "--json", str(out), "--quiet"]) == 2
    assert "2 steps given for 3 checkpoints" in capsys.readouterr().err
    assert main(["trajectory", base, *cks, "--steps", "3,2,1", "--json", str(out), "--quiet"]) == 2
    assert "steps must increase" in capsys.readouterr().err
    assert main(["trajectory", base, *cks, "--json", cks[0], "--quiet"]) == 2  # never overwrites an input


def test_errors(tmp_path):
    with pytest.raises(SubnetscopeError, match="at least one checkpoint"):
        trajectory("x", [])
    base, cks = _run(tmp_path)
    with pytest.raises(SubnetscopeError, match="tolerance must be a finite number"):
        trajectory(base, cks, tol=float("nan"))
    save_file({W: torch.zeros(3, 3)}, tmp_path / "other.safetensors")  # another shape: nothing aligns
    with pytest.raises(SubnetscopeError, match="no tensor names in common"):
        trajectory(base, [str(tmp_path / "other.safetensors")])
    with pytest.raises(SubnetscopeError, match="no such|not found|does not exist|cannot"):
        trajectory(base, [str(tmp_path / "missing")])
    assert infer_steps(["a", "b"]) == [1, 2]
    assert infer_steps(["run/seed2", "run/seed1"]) == [1, 2]  # numbers that are not steps, not increasing: positions
    with pytest.raises(SubnetscopeError, match="not in training order: their names give steps 20, 10; list them as 10"):
        infer_steps(["run/step-20", "run/step-10"])  # step names are never renumbered


def test_every_grid_tolerance_from_one_pass(demo):
    """at_tolerance answers another τ from the one pass: each checkpoint's sparsity against the base
    and the previous checkpoint and the layer × step heatmap equal a fresh trajectory at that τ; the
    set counts keep the pass τ."""
    from analysis.families.demo import trajectory_dirs
    from analysis.sparsity.trajectory import at_tolerance

    cks = trajectory_dirs(demo)[:3]
    one = trajectory(demo / "sft", cks, tol=1e-5).to_json()
    moved = False
    for tol in (0.0, 1e-6, 1e-3):
        got, want = at_tolerance(one, tol), trajectory(demo / "sft", cks, tol=tol).to_json()
        for g, w, o in zip(got["checkpoints"], want["checkpoints"], one["checkpoints"]):
            for side in ("vs_base", "vs_previous"):
                assert (g[side]["changed"], g[side]["update_sparsity"]) == (
                    w[side]["changed"], w[side]["update_sparsity"]), (tol, side)
            assert g["cumulative_changed"] == o["cumulative_changed"]  # the pass τ's
            moved |= g["vs_base"]["changed"] != o["vs_base"]["changed"]
        assert got["layers"] == want["layers"], tol
        assert got["tolerance"] == tol and got["detail_tolerance"] == 1e-5
    assert moved
    with pytest.raises(ValueError, match="not on the grid"):
        at_tolerance(one, 2e-5)
    with pytest.raises(ValueError, match="no per-tolerance counts .*rerun it"):  # a result from before them
        at_tolerance({k: v for k, v in one.items() if k != "by_tolerance"}, 1e-3)


def test_step_names_are_the_steps_and_never_renumbered(tmp_path):
    """names carrying a step (the Trainer's checkpoint-N, DeepSpeed's global_stepN,
    Megatron's iter_N, step-N, a weight file inside such a folder) give the steps and must come in
    increasing order, as ``--steps`` must; other trailing numbers are no steps."""
    from analysis.sparsity.trajectory import name_step

    assert [name_step(r) for r in ("out/checkpoint-500", "step_20", "step-20.safetensors", "global_step500",
                                   "iter_0000500", "ckpt20", "run/step-30/model.safetensors", "checkpoint-7/")] == [
        500, 20, 20, 500, 500, 20, 30, 7]
    assert [name_step(r) for r in ("rl-seed1", "substep5", "model.safetensors", "v2")] == [None] * 4
    assert infer_steps(["a/step-10", "b/step-20/model.safetensors"]) == [10, 20]
    with pytest.raises(SubnetscopeError, match="^a/step-10 and b/step-10 both name step 10"):
        infer_steps(["a/step-10", "b/step-10"])
    base, cks = _run(tmp_path)  # checkpoint-100, -200, -300
    with pytest.raises(SubnetscopeError, match="not in training order: their names give steps 300, 100, 200"):
        trajectory(base, [cks[2], cks[0], cks[1]])
    with pytest.raises(SubnetscopeError, match=r"^steps 1,2,3 given, but the checkpoints' names say 100,200,300$"):
        trajectory(base, cks, steps=[1, 2, 3])
    with pytest.raises(SubnetscopeError, match="given twice, as checkpoint 1 and as checkpoint 3"):
        trajectory(base, [cks[0], cks[1], cks[0]])
    with pytest.raises(SubnetscopeError, match="given twice, as the base and as checkpoint 2"):
        trajectory(base, [cks[0], base])
    plain = []
    for i, ck in enumerate(cks):  # names without steps: --steps is free
        p = tmp_path / f"{'abc'[i]}.safetensors"
        p.write_bytes(open(ck, "rb").read())
        plain.append(str(p))
    assert trajectory(base, plain, steps=[5, 50, 500]).steps == [5, 50, 500]
    assert trajectory(base, plain).steps == [1, 2, 3]
