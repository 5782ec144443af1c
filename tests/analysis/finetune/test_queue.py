"""The run queue on disk: a cancel that races the worker's start, a resumed run's status."""

from __future__ import annotations

import json

import pytest

from analysis.__main__ import main
from analysis.jobs import queue
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


@pytest.mark.multiprocess
def test_a_fine_tune_waits_for_the_analysis_job_holding_the_slot(demo, tmp_path, monkeypatch):
    """One queue for the two cores: the worker trains a run only once no analysis job computes (the
    same fcntl slot the jobs take turns on); a run cancelled while it waits never starts."""
    import fcntl
    import time

    from analysis.jobs.slots import slot_lock

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    lock = slot_lock()
    lock.parent.mkdir(parents=True)
    cfg = FinetuneConfig(checkpoint=str(demo / "sft"), full=True, steps=2, batch_size=4, reward_samples=0)
    with open(lock, "a+") as held:  # an analysis job computing
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        held.write("geometry demo/base demo/sft")
        held.flush()
        first, second = queue.enqueue(cfg, title="first"), queue.enqueue(cfg, title="second")
        queue.ensure_worker()
        progress, deadline = first / "progress.json", time.time() + 60
        while not (progress.exists() and "waiting for geometry" in progress.read_text()):
            assert time.time() < deadline, "the worker never said what it waits for"
            time.sleep(0.2)
        time.sleep(1.0)
        assert queue.status(first) == "queued" and not (first / "metrics.jsonl").exists()  # not started
        queue.cancel(first)  # cancelled while it waits for the slot
        time.sleep(1.0)
        fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    deadline = time.time() + 120
    while queue.status(second) in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
    assert queue.status(second) == "finished"
    assert queue.status(first) == "cancelled" and not (first / "metrics.jsonl").exists()
    assert not progress.exists()  # no "waiting for" left behind
