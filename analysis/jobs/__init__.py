"""Job directories and run directories: one owner each.

- :class:`JobDir`: a long analysis (diff, overlap, …) run as a background CLI process that a page
  polls (:mod:`.jobdir`);
- :class:`RunDir`: a fine-tune's run directory, its marker, writer lock, status and saved state
  (:mod:`.rundir`);
- :class:`Progress`: the progress bar and the progress file every long command writes
  (:mod:`.progress`);
- :func:`alive`, :func:`spawn`, :func:`terminate`: the processes behind both (:mod:`.process`).
"""

from analysis.jobs.jobdir import JobDir, JobState, run_in_process
from analysis.jobs.process import alive, last_line, spawn, terminate
from analysis.jobs.progress import Progress, read_json
from analysis.jobs.rundir import ACTIVE, RunDir, RunError, RunLock

__all__ = ["ACTIVE", "JobDir", "JobState", "Progress", "RunDir", "RunError", "RunLock", "alive", "run_in_process",
           "last_line", "read_json", "spawn", "terminate"]
