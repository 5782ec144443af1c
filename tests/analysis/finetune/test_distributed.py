"""Two CPU processes (gloo) train one run data-parallel: under torchrun and under accelerate
launch every rank ends with bit-identical weights, nothing outside the mask moves, and the
result is the one-process run's update up to the averaging of per-rank losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from analysis.finetune.compare import update_distance
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.run import run_finetune

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

BIN = Path(sys.executable).parent


def _launch(launcher: list[str], args: list[str], tmp_path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    p = subprocess.run(launcher + ["-m", "analysis", "finetune", *args, "--quiet"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.mark.parametrize("launcher,source", [
    (["torchrun", "--standalone", "--nproc_per_node", "2"], ["--random", "0.05"]),
    (["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
      "--mixed_precision", "no", "--dynamo_backend", "no"], ["--diff", "{sft}", "{rl}", "--optimizer", "reference"]),
])
def test_two_processes(demo, tmp_path, launcher, source):
    source = [a.format(sft=demo / "sft", rl=demo / "rl-seed1") for a in source]
    run = tmp_path / "two"
    common = ["--steps", "3", "--batch-size", "8", "--lr", "1e-3", "--eval-every", "3", "--reward-samples", "0"]
    p = _launch([str(BIN / launcher[0]), *launcher[1:]], [str(demo / "sft"), *source, *common, "--out", str(run)],
                tmp_path)
    assert "identical on every rank: True" in p.stdout
    s = json.loads((run / "summary.json").read_text())
    assert s["status"] == "finished" and s["processes"] == 2  # really two processes
    assert len(s["rank_digests"]) == 2 and s["rank_digests"][0] == s["rank_digests"][1]
    assert s["outside_mask_changed"] == 0
    # the same run in one process: the same global batches, so nearly the same update
    cfg = {"random": 0.05} if "--random" in source else {"diff": source[1:3], "optimizer": "reference"}
    one = tmp_path / "one"
    run_finetune(FinetuneConfig(checkpoint=str(demo / "sft"), steps=3, batch_size=8, lr=1e-3, eval_every=3,
                                reward_samples=0, **cfg), one)
    d = update_distance(demo / "sft", run / "model", one / "model")
    assert d["cosine"] > 0.9


def test_two_process_rl_run_resumes_exactly(demo, tmp_path):
    """Each rank samples its own completions: a cut and resumed 2-process demo-rl run must restore
    every rank's random streams, not only rank 0's."""
    import signal
    import time

    from safetensors.torch import load_file

    args = [str(demo / "sft"), "--task", "demo-rl", "--random", "0.2", "--steps", "12", "--batch-size", "4",
            "--lr", "1e-3", "--eval-every", "100", "--save-every", "100", "--reward-samples", "0"]
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2"]
    _launch(torchrun, args + ["--out", str(tmp_path / "straight")], tmp_path)
    cut = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    p = subprocess.Popen(torchrun + ["-m", "analysis", "finetune", *args, "--out", str(cut), "--quiet"], env=env,
                         cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t = time.time()
    while not (cut / "metrics.jsonl").is_file() or len((cut / "metrics.jsonl").read_text().splitlines()) < 2:
        assert time.time() - t < 120 and p.poll() is None
        time.sleep(0.02)
    os.kill(json.loads((cut / "summary.json").read_text())["pid"], signal.SIGTERM)  # rank 0: all ranks stop
    assert p.wait(timeout=120) == 0
    s = json.loads((cut / "summary.json").read_text())
    assert s["status"] == "cancelled" and 2 <= s["steps_done"] < 12
    _launch(torchrun, ["--resume", str(cut)], tmp_path)
    a, b = (load_file(d / "model" / "model.safetensors") for d in (tmp_path / "straight", cut))
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (tmp_path / "straight", cut)]
    assert rows[0] == rows[1]
