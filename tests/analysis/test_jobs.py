"""Background jobs: the CLI in a subprocess, polled through its job directory."""

from __future__ import annotations

import os
import signal
import time

from analysis.jobs import JobDir, job_id
from analysis.diff import diff_checkpoints
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
    argv = ["diff", str(a), str(b), "--tol", "1e-5", "--quiet"]
    st = JobDir.of(argv, [str(a), str(b)], root=tmp_path / "jobs").start(argv, [str(a), str(b)])
    assert st.status == "running"
    st = _wait(st.dir)
    assert st.status == "done", st.error
    res = st.result()
    assert res["changed_params"] == diff_checkpoints(a, b, tol=1e-5).changed_params
    assert res["total_params"] == 68_160
    again = JobDir.of(argv, [str(a), str(b)], root=tmp_path / "jobs").start(argv, [str(a), str(b)])  # same request: the finished job
    assert again.dir == st.dir and again.status == "done"
    # a changed checkpoint is a different request
    tiny_llama(seed=2).save_pretrained(b)
    assert job_id(argv, [str(a), str(b)]) != st.id


def test_failed_job_reports_the_error(tmp_path):
    a = tmp_path / "a"
    tiny_llama().save_pretrained(a)
    argv = ["diff", str(a), str(tmp_path / "nope"), "--quiet"]
    st = JobDir.of(argv, [str(a)], root=tmp_path / "jobs").start(argv, [str(a)])
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
