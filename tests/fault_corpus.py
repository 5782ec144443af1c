"""The fault-injection corpus: bad input given to a command as a user would give it, and what the
command must answer (the README's promise: one line on stderr, exit code 2, nothing lost).

Each area's cases live in ``tests/faults/test_faults_<area>.py`` as a list of :class:`Case`; the
command runs in-process through ``analysis.__main__.main`` (one real-process test per signal lives
beside the code it tests). ``tests/faults/test_corpus_size.py`` counts them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Case:
    """One bad input.

    Attributes:
        id: unique name of the case (``area-what``).
        setup: ``setup(tmp_path) -> argv`` builds the bad input under ``tmp_path`` and returns the
            command line (without ``python -m analysis``).
        rc: the exit code expected (2 for bad input; 0 where the command must succeed and say so).
        says: substrings the one stderr line must hold (case-insensitive); for rc 0, stdout + stderr.
        check: ``check(tmp_path, out, err)``: what must hold afterwards (nothing lost, a file intact,
            the JSON says the reason ...); raises AssertionError otherwise.
    """

    id: str
    setup: Callable[[Path], list[str]]
    rc: int = 2
    says: tuple[str, ...] = ()
    check: Callable[[Path, str, str], None] | None = None
    marks: tuple = field(default=())


def run_case(case: Case, tmp_path: Path, capsys) -> tuple[str, str]:
    """Runs ``case`` in-process and asserts its contract; returns (stdout, stderr)."""
    from analysis.__main__ import main

    argv = case.setup(tmp_path)
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == case.rc, f"{case.id}: exit {rc}, expected {case.rc}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, f"{case.id}: a traceback\n{err}"
    if case.rc == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{case.id}: not one error line:\n{err}"
        text = lines[0]
    else:
        text = out + err
    for s in case.says:
        assert s.lower() in text.lower(), f"{case.id}: {s!r} not in {text!r}"
    if case.check is not None:
        case.check(tmp_path, out, err)
    return out, err


def params(cases: list[Case]):
    """``pytest.mark.parametrize`` arguments: one test per case, named by its id."""
    import pytest

    ids = [c.id for c in cases]
    assert len(set(ids)) == len(ids), "duplicate case ids"
    return [pytest.param(c, id=c.id, marks=c.marks) for c in cases]
