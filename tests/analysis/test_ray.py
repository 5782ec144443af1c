"""``--ray``: diff, overlap and trajectory as Ray tasks (one per shard file) give the same results as
in one process; an unreachable cluster is one line. A local Ray is started here and shut down."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from analysis.sparsity.diff import diff_checkpoints
from analysis.sparsity.overlap import overlap
from analysis.sparsity.trajectory import trajectory
from conftest import ROOT, tiny_llama

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def local_ray():
    import ray  # pinned in requirements.txt

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    """A sharded tiny Llama (6 files) and three fine-tunes of it, each changing other elements."""
    d = tmp_path_factory.mktemp("run")
    model = tiny_llama()
    model.save_pretrained(d / "base", max_shard_size="60KB")
    for k, step in enumerate((2, 3, 5)):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                if i % step == 0:
                    p.view(-1)[k::step] += 1e-3 * (k + 1)
        model.save_pretrained(d / f"checkpoint-{(k + 1) * 10}", max_shard_size="60KB")
    assert len(list((d / "base").glob("*.safetensors"))) > 2
    return d


def test_diff_overlap_trajectory_on_ray_equal_local(local_ray, sharded_run):
    d = sharded_run
    cks = [d / "checkpoint-10", d / "checkpoint-20", d / "checkpoint-30"]
    masks_local, masks_ray = {}, {}
    local = diff_checkpoints(d / "base", cks[0], on_mask=masks_local.__setitem__)
    on_ray = diff_checkpoints(d / "base", cks[0], on_mask=masks_ray.__setitem__, ray="")
    assert on_ray.to_json() == local.to_json()
    assert masks_ray.keys() == masks_local.keys()
    assert all(torch.equal(masks_ray[k], masks_local[k]) for k in masks_local)
    assert overlap(d / "base", cks, ray="").to_json() == overlap(d / "base", cks).to_json()
    assert trajectory(d / "base", cks, ray="").to_json() == trajectory(d / "base", cks).to_json()


def test_cli_trajectory_on_ray(local_ray, sharded_run, tmp_path):
    from analysis.__main__ import main

    d = sharded_run
    cks = [str(d / f"checkpoint-{s}") for s in (10, 20, 30)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert main(["trajectory", str(d / "base"), *cks, "--ray", "--json", str(a), "--quiet"]) == 0
    assert main(["trajectory", str(d / "base"), *cks, "--json", str(b), "--quiet"]) == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize("address, message", [
    ("127.0.0.1:1", "cannot reach a Ray cluster at 127.0.0.1:1: Connection refused"),
    ("headnode", "Ray address 'headnode': expected host:port (or ray://host:port)"),
])
def test_unreachable_or_malformed_cluster_is_one_line(sharded_run, tmp_path, address, message):
    d = sharded_run
    p = subprocess.run([sys.executable, "-m", "analysis", "diff", str(d / "base"), str(d / "checkpoint-10"),
                        "--ray", address, "--json", str(tmp_path / "o.json"), "--quiet"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"error: {message}"]
    assert not (tmp_path / "o.json").exists()
