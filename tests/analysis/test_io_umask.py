"""The umask is read without being changed (os.umask sets it to read it: a file another thread
creates meanwhile, under Streamlit, would get the wrong permissions), and written files respect it."""

from __future__ import annotations

import os
import stat
import sys
import threading

import pytest

import analysis.io as io_mod
from analysis.io import current_umask, write_atomic


@pytest.fixture
def umask_027():
    umask = os.umask  # the test sets the mask (single-threaded here); the code under test only reads it
    old = umask(0o027)
    yield 0o027
    umask(old)


def _no_umask_calls(monkeypatch):
    def refuse(*args):
        raise AssertionError("os.umask called: it changes the process's mask while reading it")

    monkeypatch.setattr(io_mod.os, "umask", refuse)


def test_reads_the_umask_without_setting_it(umask_027, monkeypatch):
    _no_umask_calls(monkeypatch)
    assert current_umask() == 0o027


def test_fallback_without_proc(umask_027, monkeypatch, tmp_path):
    """Where /proc/self/status has no Umask line (other systems), a probe file tells it."""
    _no_umask_calls(monkeypatch)
    monkeypatch.setattr(io_mod, "_PROC_STATUS", str(tmp_path / "no-such-file"))
    assert current_umask() == 0o027
    (tmp_path / "status").write_text("Name:\tpython\nState:\tR (running)\n")
    monkeypatch.setattr(io_mod, "_PROC_STATUS", str(tmp_path / "status"))
    assert current_umask() == 0o027


def test_written_files_respect_the_umask_set_later(umask_027, monkeypatch, tmp_path):
    _no_umask_calls(monkeypatch)
    f = write_atomic(tmp_path / "a.json", "{}")
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    monkeypatch.undo()
    os.umask(0o002)  # read at each write, not frozen at import
    g = write_atomic(tmp_path / "b.json", "{}")
    assert stat.S_IMODE(g.stat().st_mode) == 0o664


def test_files_created_by_other_threads_keep_the_umask(umask_027, tmp_path):
    """While threads write atomically, another thread's new files always get the process umask
    (a read that sets the mask and restores it lets some be created under umask 0, as 0o666; with
    thread switches every microsecond this test catches that in most runs)."""
    stop, modes = threading.Event(), []

    def writer(i):
        for k in range(200):
            write_atomic(tmp_path / f"w{i}-{k}.json", "{}")

    def creator():
        k = 0
        while not stop.is_set():
            fd = os.open(tmp_path / f"c{k}", os.O_CREAT | os.O_WRONLY, 0o666)
            modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
            os.close(fd)
            k += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
        c = threading.Thread(target=creator)
        c.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        c.join()
    finally:
        sys.setswitchinterval(interval)
    assert modes and set(modes) == {0o640}
