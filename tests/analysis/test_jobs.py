"""Background jobs: the CLI in a subprocess, polled through its job directory."""

from __future__ import annotations

import os
import signal
import time

import pytest

from analysis.jobs import JobDir
from analysis.specs import get_spec
from analysis.specs.base import cache_key
from analysis.specs.diff import DiffParams
from analysis.sparsity.diff import diff_checkpoints
from conftest import tiny_llama


def _wait(d, statuses=("done", "failed", "cancelled", "died"), timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        st = JobDir(d).state()
        if st.status in statuses:
            return st
        time.sleep(0.2)
    raise AssertionError(f"job still {JobDir(d).state().status}")


def test_diff_job_result_and_reuse(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    spec, params = get_spec("diff"), DiffParams(str(a), str(b), tol=1e-5)
    st = JobDir.of(spec, params, root=tmp_path / "jobs").start(spec, params)
    assert (st.dir / "params.json").is_file() and not (st.dir / "result.json").exists()
    assert st.status == "running"
    st = _wait(st.dir)
    assert st.status == "done", st.error
    res = st.result()
    assert res["changed_params"] == diff_checkpoints(a, b, tol=1e-5).changed_params
    assert res["total_params"] == 68_160
    # same request: the finished job
    again = JobDir.of(spec, params, root=tmp_path / "jobs").start(spec, params)
    assert again.dir == st.dir and again.status == "done"
    # a changed checkpoint is a different request
    tiny_llama(seed=2).save_pretrained(b)
    assert cache_key(spec, params) != st.id


def test_failed_job_reports_the_error(tmp_path):
    a = tmp_path / "a"
    tiny_llama().save_pretrained(a)
    spec, params = get_spec("diff"), DiffParams(str(a), str(tmp_path / "nope"))
    st = JobDir.of(spec, params, root=tmp_path / "jobs").start(spec, params)
    st = _wait(st.dir)
    assert st.status == "failed"
    assert "nope: no such file or directory" in st.error


def test_killed_job_is_died(tmp_path):
    d = tmp_path / "jobs" / "x"
    d.mkdir(parents=True)
    import subprocess
    import sys
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    (d / "job.json").write_text(f'{{"pid": {p.pid}}}')
    (d / "progress.json").write_text('{"status": "running", "done": 1, "total": 2}')
    assert JobDir(d).state().status == "running"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert JobDir(d).state().status == "died"


@pytest.mark.multiprocess
def test_jobs_take_turns(tmp_path, monkeypatch):
    """An app job waits while another one computes (the lock beside the jobs folder), says so in
    its progress, starts when the slot frees, and can be cancelled while it waits. A progress file
    outside the jobs folder is not an app job's (no turn, no lock beside it)."""
    import fcntl

    from analysis.jobs.slots import SLOT_LOCK, is_app_job

    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    jobs = tmp_path / "home" / "jobs"
    jobs.mkdir(parents=True)
    held = open(jobs.parent / SLOT_LOCK, "w")  # another job computing
    held.write("geometry demo/base demo/sft")
    held.flush()
    fcntl.flock(held.fileno(), fcntl.LOCK_EX)
    spec = get_spec("diff")
    st = JobDir.of(spec, DiffParams(str(a), str(b))).start(spec, DiffParams(str(a), str(b)))
    t0 = time.time()
    while "queued" not in JobDir(st.dir).state().current and time.time() - t0 < 60:
        time.sleep(0.2)
    assert JobDir(st.dir).state().current == "queued: waiting for geometry demo/base demo/sft to finish"
    time.sleep(1.0)
    assert JobDir(st.dir).state().status == "running"  # still waiting: no result while the slot is held
    st2 = JobDir.of(spec, DiffParams(str(b), str(a))).start(spec, DiffParams(str(b), str(a)))
    t0 = time.time()
    while "queued" not in JobDir(st2.dir).state().current and time.time() - t0 < 60:
        time.sleep(0.2)
    JobDir(st2.dir).cancel()
    assert _wait(st2.dir).status == "cancelled"
    fcntl.flock(held.fileno(), fcntl.LOCK_UN)
    held.close()
    done = _wait(st.dir)
    assert done.status == "done" and done.result()["changed_params"] == diff_checkpoints(a, b).changed_params
    # only the app's jobs take turns: a --progress-file of the user's elsewhere puts no lock beside it
    assert is_app_job(jobs / "some-id" / "progress.json")
    assert not is_app_job(tmp_path / "mine" / "p" / "progress.json")


def test_more_jobs_at_once_by_setting(tmp_path, monkeypatch):
    """SUBNETSCOPE_JOBS=2: two computations hold a slot each at once; a third waits, says for whom,
    and gives up when asked. The default is one at a time; a bad value is one line."""
    import contextlib
    import json

    from analysis.errors import SubnetscopeError
    from analysis.jobs.slots import SlotAbandoned, job_slot, slots

    jobs = tmp_path / "home" / "jobs"
    monkeypatch.setenv("SUBNETSCOPE_HOME", str(tmp_path / "home"))
    assert slots() == 1
    monkeypatch.setenv("SUBNETSCOPE_JOBS", "2")
    progress = [jobs / f"j{i}" / "progress.json" for i in range(3)]
    for p in progress:
        p.parent.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        stack.enter_context(job_slot(progress[0], "diff a b"))
        stack.enter_context(job_slot(progress[1], "geometry a b"))  # at once: no wait
        waited = []
        with pytest.raises(SlotAbandoned):
            with job_slot(progress[2], "overlap a b c", give_up=lambda: waited.append(1) or len(waited) > 2):
                raise AssertionError("a third slot was free")
        assert json.loads(progress[2].read_text())["current"] == \
            "queued: waiting for diff a b and geometry a b to finish"
    with job_slot(progress[2], "overlap a b c", give_up=lambda: True):
        pass  # both released: the slot is free at once
    monkeypatch.setenv("SUBNETSCOPE_JOBS", "zero")
    with pytest.raises(SubnetscopeError, match="SUBNETSCOPE_JOBS='zero'"):
        slots()
