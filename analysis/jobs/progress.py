"""Progress of long work: a tqdm bar on stderr and/or ``progress.json`` that a page polls.

The one writer and the one reader of the progress file, used by every command (diff, overlap,
importance, evaluate-selectors, finetune) and the pages that poll their jobs.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class Progress:
    """The ``progress(done, total, name)`` callback of analysis functions.

    Args:
        desc (str): the bar's label.
        enabled (bool): show the tqdm bar. Default: True.
        file (str | Path, optional): also write ``{"status", "done", "total", "current"}`` here
            (atomically, at most four times a second, and at the end). Default: None.
    """

    def __init__(self, desc: str, enabled: bool = True, file: str | Path | None = None):
        self.bar = None
        self.desc = desc
        self.enabled = enabled
        self.file = file
        self._last = 0.0

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.file and (time.monotonic() - self._last > 0.25 or done == total):
            self._last = time.monotonic()
            self.write("running", done=done, total=total, current=name)
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="el", unit_scale=True, file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.refresh()

    def write(self, status: str, **fields) -> None:
        """Writes the progress file (when there is one) with ``status`` and ``fields``."""
        if self.file:
            from analysis.io import write_json_atomic

            write_json_atomic(self.file, {"status": status, **fields})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def read_json(path: str | Path) -> dict | None:
    """A JSON object file's content (a progress, job or summary file), or None when it is
    missing, unreadable or not an object."""
    try:
        p = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return p if isinstance(p, dict) else None
