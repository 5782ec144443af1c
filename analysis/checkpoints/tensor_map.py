"""Per-tensor work over aligned checkpoints, in this process or as Ray tasks beyond one machine.

``diff``, ``overlap`` and ``trajectory`` each reduce to one function applied to every aligned
tensor, whose per-tensor results are merged in alignment order. :func:`map_aligned` runs that
function here, or — with ``ray`` — as one Ray task per shard file of the first checkpoint, on a
local Ray started for the command or on an existing cluster. A task opens the checkpoints by
reference where it runs (on a cluster the files must be on storage every node can read), aligns
them the same deterministic way and applies the same function to its tensors; the caller receives
``(AlignedTensor, result)`` in alignment order either way, so every merged count is identical.

Only Ray's public task API: ``ray.init``, ``ray.remote``, ``ray.get``, ``ray.wait`` (results as they
finish, for the progress bar) and ``ray.cancel``.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterator

from analysis.checkpoints import Alignment, AlignedTensor, Checkpoint, align, iter_aligned, open_checkpoint
from analysis.errors import SubnetscopeError

LOCAL = ""  # ``--ray`` without an address: RAY_ADDRESS when set, else a Ray started for the command
CONNECT_TIMEOUT = 3.0  # seconds to reach a cluster's address before saying it cannot be reached


class RayError(SubnetscopeError):
    """Ray missing, or a cluster that cannot be reached, in one line."""


def _reachable(address: str) -> None:
    """A TCP connection to ``host:port`` within :data:`CONNECT_TIMEOUT` (Ray itself retries for
    minutes before failing on an unreachable address)."""
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayError(f"Ray address {address!r}: expected host:port (or ray://host:port)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT):
            pass
    except OSError as e:
        raise RayError(f"cannot reach a Ray cluster at {address}: {e.strerror or type(e).__name__}") from None


def connect(address: str | None = LOCAL):
    """Ray, initialised: the running instance of this process, the cluster at ``address`` (or
    ``RAY_ADDRESS``), or a local one started now.

    Raises:
        RayError: ray is not installed, or the address cannot be reached.
    """
    running = sys.modules.get("ray")
    if running is not None and running.is_initialized():
        return running
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address != "auto":
        _reachable(address)  # before importing ray (seconds): a typo or a closed port is said at once
    try:
        import ray
    except ImportError:
        raise RayError("--ray needs the ray package: pip install ray") from None
    try:
        if address:  # a cluster: ship our two packages to its workers (they need no checkout of this repository)
            import analysis
            import kernels

            ray.init(address=address, log_to_driver=False, runtime_env={
                "py_modules": [os.path.dirname(analysis.__file__), os.path.dirname(kernels.__file__)]})
        else:
            ray.init(include_dashboard=False, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise RayError(f"cannot start or join Ray{f' at {address}' if address else ''}: {e}") from None
    return ray


def shard_groups(al: Alignment, ck: Checkpoint) -> list[list[int]]:
    """Indices of ``al.tensors`` grouped by the file of ``ck`` that holds each (one task each)."""
    groups: dict[str, list[int]] = {}
    for i, at in enumerate(al.tensors):
        groups.setdefault(ck.tensors[at.names[0]].file, []).append(i)
    return list(groups.values())


def _run_group(refs: list[str], indices: list[int], fn, args: tuple) -> list:
    """A Ray task: the checkpoints opened where it runs, the same alignment, ``fn`` on its tensors."""
    cks = [open_checkpoint(r) for r in refs]
    al = align(cks)
    out = []
    for i in indices:
        at = al.tensors[i]
        values = [ck.tensor(n) for ck, n in zip(cks, at.names)]
        if at.resized:
            values = [v[: at.compare_shape[0]] for v in values]
        out.append(fn(at, values, *args))
    return out


def map_aligned(cks: list[Checkpoint], al: Alignment, fn: Callable, *args, ray: str | None = None,
                should_stop: Callable[[], bool] | None = None,
                what: str = "work") -> Iterator[tuple[AlignedTensor, object]]:
    """``(AlignedTensor, fn(at, values, *args))`` for every aligned tensor, in alignment order.

    Args:
        cks (list[Checkpoint]): the checkpoints, as aligned.
        al (Alignment): their alignment.
        fn (callable): a module-level function (Ray pickles it) of ``(at, [tensor per checkpoint], *args)``.
        ray (str, optional): None runs here; :data:`LOCAL` (``""``) or an address runs one Ray task
            per shard file of the first checkpoint. Default: None.
        should_stop (callable, optional): polled between tensors (here) or results (Ray); True
            cancels with a SubnetscopeError.
        what (str): the work's name, for the cancellation message.
    """
    if ray is None:
        for at, values in iter_aligned(al, cks):
            if should_stop is not None and should_stop():
                raise SubnetscopeError(f"{what} cancelled")
            yield at, fn(at, values, *args)
        return
    rt = connect(ray)
    task = rt.remote(_run_group)
    refs = [str(c.path) for c in cks]
    pending = {task.remote(refs, idx, fn, args): idx for idx in shard_groups(al, cks[0])}
    results: dict[int, object] = {}
    nxt = 0
    try:
        while nxt < len(al.tensors):
            while nxt in results:
                yield al.tensors[nxt], results.pop(nxt)
                nxt += 1
            if nxt >= len(al.tensors):
                break
            if should_stop is not None and should_stop():
                raise SubnetscopeError(f"{what} cancelled")
            done, _ = rt.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in done:
                idx = pending.pop(ref)
                try:
                    values = rt.get(ref)
                except rt.exceptions.RayTaskError as e:  # the task's own error, e.g. an unreadable file there
                    cause = getattr(e, "cause", None)
                    if isinstance(cause, SubnetscopeError):
                        raise SubnetscopeError(str(cause)) from None
                    raise SubnetscopeError(f"a Ray task of {what} failed: {type(cause).__name__}: {cause}") from None
                results.update(zip(idx, values))
    finally:
        for ref in pending:
            rt.cancel(ref)
