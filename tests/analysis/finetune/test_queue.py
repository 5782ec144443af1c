"""The run queue on disk: a cancel that races the worker's start, a resumed run's status."""

from __future__ import annotations

import json

from analysis.__main__ import main
from analysis.finetune import queue
from analysis.finetune.config import FinetuneConfig


def test_a_queued_run_cancelled_as_it_starts_does_not_train(demo, capsys):
    d = queue.enqueue(FinetuneConfig(checkpoint=str(demo / "sft"), full=True, steps=2, batch_size=4,
                                     reward_samples=0))
    assert queue.status(d) == "queued" and queue.queued() == [d]
    queue.cancel(d)
    assert queue.status(d) == "cancelled"
    # what the worker would have launched a moment before the cancel landed
    assert main(["finetune", "--config", str(d / "config.json"), "--out", str(d), "--quiet"]) == 0
    assert "cancelled before it started" in capsys.readouterr().out
    assert queue.status(d) == "cancelled" and not (d / "metrics.jsonl").exists()
    assert queue.ensure_worker() is None  # nothing queued: no worker


def test_status_follows_the_process_that_writes_the_summary(demo, tmp_path):
    d = queue.enqueue(FinetuneConfig(checkpoint=str(demo / "sft"), full=True, steps=2, batch_size=4))
    (d / "job.json").write_text(json.dumps({"pid": 2**22 + 12345}))  # the worker's old child, long gone
    summary = json.loads((d / "summary.json").read_text())
    import os

    (d / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": os.getpid()}))
    assert queue.status(d) == "running"  # this process, alive: not "died"
    (d / "summary.json").write_text(json.dumps({**summary, "status": "running", "pid": 2**22 + 12345}))
    assert queue.status(d) == "died"
