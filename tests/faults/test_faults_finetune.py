"""Fault cases of the fine-tuning runs: damaged run files (summary.json, config.json, metrics.jsonl,
eval.json, state/) read by ``compare-runs``, ``finetune --resume`` and ``--config``, a directory
that is not a run, and lm data files of absurd sizes."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fault_corpus import Case, params, run_case

GARBAGE = random.Random(0).randbytes(512)  # not UTF-8 (fixed, so the case is the same every time)
ROW = {"loss": 3.5, "lr": 1e-3, "grad_norm": 1.0, "trainable": 10, "tokens_per_s": 100.0, "step_s": 0.01}


def tiny(tmp: Path) -> Path:
    """A 2-layer GPT-2 with the demo's tokenizer (a checkpoint a run can start from in a second)."""
    from analysis.families.demo import make_tokenizer
    from conftest import tiny_gpt2

    d = tmp / "gpt2"
    if not d.is_dir():
        tiny_gpt2().save_pretrained(d)
        make_tokenizer().save_pretrained(d)
    return d


def run_dir(tmp: Path, name: str = "run", *, config=None, summary=None, metrics=None, checkpoint="/nowhere/ck") -> Path:
    """A run directory written by hand, as a finished run leaves it (no model): ``config``,
    ``summary`` are JSON values (or bytes, written as they are), ``metrics`` the bytes of
    ``metrics.jsonl`` (default: three good rows)."""
    from analysis.jobs import RunDir

    run = RunDir(tmp / name)
    run.mark()
    files = {"config.json": {"checkpoint": checkpoint, "full": True, "steps": 3} if config is None else config,
             "summary.json": {"status": "finished", "mask_source": "full", "task": "demo-sft", "steps_done": 3,
                              "trainable": 10, "final": {"step": 3, **ROW}} if summary is None else summary,
             "metrics.jsonl": b"".join(json.dumps({"step": s, **ROW}).encode() + b"\n" for s in (1, 2, 3))
             if metrics is None else metrics}
    for f, v in files.items():
        (run.path / f).write_bytes(v if isinstance(v, bytes) else json.dumps(v).encode())
    return run.path


def compare(tmp: Path, **files) -> list[str]:
    return ["compare-runs", run_dir(tmp, **files), "--json", tmp / "cmp.json"]


def rows(*steps, tail: bytes = b"") -> bytes:
    return b"".join(json.dumps({"step": s, **ROW}).encode() + b"\n" for s in steps) + tail


def curves(steps):
    """check: the comparison's JSON kept exactly these metric rows."""
    def check(tmp, out, err):
        d = json.loads((tmp / "cmp.json").read_text())
        assert [r["step"] for r in d["curves"][str(tmp / "run")]] == steps

    return check


def untouched(name: str):
    """check: the directory holds only what the setup wrote (nothing written into it)."""
    def check(tmp, out, err):
        assert sorted(p.name for p in (tmp / name).iterdir()) == sorted(
            json.loads((tmp / f"{name}.files").read_text()))

    return check


def listing(tmp: Path, name: str) -> None:
    (tmp / f"{name}.files").write_text(json.dumps([p.name for p in (tmp / name).iterdir()]))


def model_dir(tmp: Path) -> Path:
    """A model directory (its config.json is a model's, not a run's)."""
    d = tiny(tmp)
    listing(tmp, "gpt2")
    return d


def resumable(tmp: Path, *, meta=None, state: bytes | None = None, config=None) -> Path:
    """A run that was cancelled after step 1, with ``state/`` as given (default: a state that
    matches neither the model nor anything: the setup damages what the case names)."""
    run = run_dir(tmp, checkpoint=str(tiny(tmp)), config=config,
                  summary={"status": "cancelled", "mask_source": "full", "task": "demo-sft", "steps_done": 1},
                  metrics=rows(1))
    (run / "state").mkdir()
    meta = {"step": 1} if meta is None else meta
    (run / "state" / "meta.json").write_bytes(meta if isinstance(meta, bytes) else json.dumps(meta).encode())
    (run / "state" / "state.pt").write_bytes(GARBAGE if state is None else state)
    return run


def wrong_shapes_state(tmp: Path) -> bytes:
    """A state.pt a run could have written, for another model (a tensor of the wrong shape)."""
    import io

    import torch

    blob = {"step": 1, "optimizer": {}, "weights": {"transformer.wte.weight": torch.zeros(3, 3)},
            "ranks": [{"torch_rng": torch.get_rng_state(), "task": {"rng": [3, [0] * 625, None]}}],
            "lisa_rng": json.dumps(random.Random(1).getstate()), "lisa_layers": []}
    buf = io.BytesIO()
    torch.save(blob, buf)
    return buf.getvalue()


def resume(tmp: Path, **kw) -> list[str]:
    return ["finetune", "--resume", resumable(tmp, **kw), "--quiet"]


def lm_data(tmp: Path, name: str, write) -> list[str]:
    data = tmp / name
    write(data)
    return ["finetune", tiny(tmp), "--task", "lm", "--data", data, "--full", "--steps", "2", "--batch-size", "4",
            "--seq-len", "32", "--eval-samples", "4", "--device", "cpu", "--out", tmp / "lm-run", "--quiet"]


def sparse(size: int):
    """A file of one line of ``size`` NUL characters, made without writing them (a sparse file)."""
    def write(p: Path) -> None:
        with open(p, "wb") as f:
            f.truncate(size)

    return write


def finished(tmp, out, err):
    s = json.loads((tmp / "lm-run" / "summary.json").read_text())
    assert s["status"] == "finished" and s["steps_done"] == 2


CASES = [
    # ---- summary.json (item 2: compare-runs of a damaged summary gave AttributeError)
    Case("ft-summary-list", lambda tmp: compare(tmp, summary=[1, 2]),
         says=("run/summary.json", "damaged run summary", "a list, not a JSON object")),
    Case("ft-summary-status-number", lambda tmp: compare(tmp, summary={"status": 5}),
         says=("summary.json", "status must be one of queued, running", "got 5")),
    Case("ft-summary-random-bytes", lambda tmp: compare(tmp, summary=GARBAGE),
         says=("summary.json", "unreadable run summary (not UTF-8 text)")),
    Case("ft-summary-not-json", lambda tmp: compare(tmp, summary=b'{"status": "finished", '),
         says=("summary.json", "not JSON")),
    Case("ft-summary-final-not-numbers",
         lambda tmp: compare(tmp, summary={"status": "finished", "final": {"accuracy": "high"}}),
         says=("summary.json", "final must be an object of numbers")),
    Case("ft-summary-missing", lambda tmp: ["compare-runs", _without(run_dir(tmp), "summary.json"), "--json",
                                            tmp / "cmp.json"],
         says=("not a run directory", "missing summary.json")),
    # ---- config.json (compare-runs and --resume)
    Case("ft-config-list", lambda tmp: compare(tmp, config=["checkpoint"]),
         says=("run/config.json", "damaged run configuration", "a list, not a JSON object")),
    Case("ft-config-wrong-type", lambda tmp: compare(tmp, config={"checkpoint": "/x", "full": True, "steps": "3"}),
         says=("config.json", "steps must be int, got '3'")),
    Case("ft-config-unknown-key", lambda tmp: compare(tmp, config={"checkpoint": "/x", "full": True, "stpes": 3}),
         says=("config.json", "unknown configuration key 'stpes'")),
    Case("ft-resume-config-list", lambda tmp: resume(tmp, config=[]),
         says=("run/config.json", "damaged run configuration", "a list, not a JSON object")),
    Case("ft-resume-config-wrong-type", lambda tmp: resume(tmp, config={"checkpoint": "/x", "full": "yes"}),
         says=("config.json", "full must be bool, got 'yes'")),
    Case("ft-config-file-list", lambda tmp: ["finetune", "--config", _write(tmp / "c.json", b"[]"),
                                             "--out", tmp / "out"],
         says=("c.json", "damaged run configuration", "JSON object")),
    Case("ft-config-file-random-bytes", lambda tmp: ["finetune", "--config", _write(tmp / "c.json", GARBAGE),
                                                     "--out", tmp / "out"],
         says=("c.json", "not UTF-8")),
    # ---- metrics.jsonl: a damaged line is skipped and counted, the good ones kept (exit 0)
    Case("ft-metrics-garbage-lines",
         lambda tmp: compare(tmp,
                             metrics=rows(1, 2) + b"garbage\n" + GARBAGE[:40].replace(b"\n", b"") + b"\n" + rows(4)),
         rc=0, says=("warning: ", "metrics.jsonl: 2 damaged lines skipped, 3 rows kept", "line 3: not JSON"),
         check=curves([1, 2, 4])),
    Case("ft-metrics-random-bytes", lambda tmp: compare(tmp, metrics=GARBAGE),
         rc=0, says=("metrics.jsonl", "damaged line", "not UTF-8 text"), check=curves([])),
    Case("ft-metrics-empty", lambda tmp: compare(tmp, metrics=b""), rc=0, says=("wrote",),
         check=lambda tmp, out, err: (curves([])(tmp, out, err), _no_warning(err))),
    Case("ft-metrics-cut-last-line", lambda tmp: compare(tmp, metrics=rows(1, 2, tail=b'{"step": 3, "lo')),
         rc=0, says=("1 damaged line skipped", "line 3: cut short"), check=curves([1, 2])),
    Case("ft-metrics-not-objects", lambda tmp: compare(tmp, metrics=rows(1) + b"[1, 2]\n5\n" + rows(2)),
         rc=0, says=("2 damaged lines skipped", "a list, not a JSON object"), check=curves([1, 2])),
    Case("ft-metrics-wrong-types", lambda tmp: compare(tmp, metrics=rows(1) + b'{"step": "2", "loss": 1}\n'
                                                       + b'{"step": 3, "loss": "low"}\n' + rows(4)),
         rc=0, says=("2 damaged lines skipped", "step is '2'"), check=curves([1, 4])),
    Case("ft-metrics-out-of-order", lambda tmp: compare(tmp, metrics=rows(1, 2, 2, 3)),
         rc=0, says=("1 damaged line skipped", "step 2 after step 2"), check=curves([1, 2, 3])),
    Case("ft-metrics-huge-line", lambda tmp: compare(tmp, metrics=rows(1) + b"x" * (3 * 2**20) + b"\n" + rows(2)),
         rc=0, says=("1 damaged line skipped", "longer than 1,048,576 bytes"), check=curves([1, 2])),
    Case("ft-metrics-nan-loss", lambda tmp: compare(tmp, metrics=rows(1) + b'{"step": 2, "loss": NaN}\n'),
         rc=0, says=("wrote",),
         check=lambda tmp, out, err: _nan_is_null(tmp)),
    # ---- eval.json
    Case("ft-eval-damaged", lambda tmp: ["compare-runs", _write(run_dir(tmp) / "eval.json",
                                                                b'{"per_problem_accuracy": "all"}').parent,
                                         "--json", tmp / "cmp.json"],
         says=("eval.json", "damaged evaluation", "per_problem_accuracy")),
    # ---- not a run directory
    Case("ft-compare-model-dir", lambda tmp: ["compare-runs", model_dir(tmp), "--json", tmp / "cmp.json"],
         says=("gpt2", "not a run directory", ".subnetscope-run marker"), check=untouched("gpt2")),
    Case("ft-resume-model-dir", lambda tmp: ["finetune", "--resume", model_dir(tmp), "--quiet"],
         says=("gpt2", "not a run directory", ".subnetscope-run marker"), check=untouched("gpt2")),
    Case("ft-resume-a-file", lambda tmp: ["finetune", "--resume", _write(tmp / "run.json", b"{}"), "--quiet"],
         says=("run.json", "not a run directory (not a directory)")),
    # ---- state/
    Case("ft-resume-meta-list", lambda tmp: resume(tmp, meta=[1]),
         says=("state/meta.json", "unreadable saved state", "a list, not a JSON object")),
    Case("ft-resume-meta-step-text", lambda tmp: resume(tmp, meta={"step": "1"}),
         says=("meta.json", "step must be a whole number", "'1'")),
    Case("ft-resume-meta-random-bytes", lambda tmp: resume(tmp, meta=GARBAGE), says=("meta.json", "not UTF-8")),
    Case("ft-resume-state-random-bytes", lambda tmp: resume(tmp),
         says=("state/state.pt", "unreadable saved state", "cannot be resumed")),
    Case("ft-resume-state-of-another-model", lambda tmp: resume(tmp, state=wrong_shapes_state(tmp)),
         says=("state.pt", "not this run's", "transformer.wte.weight", "does not fit the model")),
    # ---- lm data of absurd sizes (item 5b: one huge line aborted the process)
    Case("ft-lm-txt-one-huge-line", lambda tmp: lm_data(tmp, "huge.txt", sparse(50 * 2**20)),
         rc=0, says=("note: ", "huge.txt: read the first 262,144 characters", "finished: 2 steps"), check=finished),
    Case("ft-lm-jsonl-huge-record", lambda tmp: lm_data(
        tmp, "huge.jsonl", lambda p: p.write_bytes(b'{"text": "' + b"a" * (17 * 2**20) + b'"}\n')),
         says=("huge.jsonl:1", "longer than 16 MiB", "at most that size")),
    Case("ft-lm-jsonl-long-record-cut", lambda tmp: lm_data(
        tmp, "long.jsonl", lambda p: p.write_text("".join(json.dumps({"text": "1+1=2 " * 200_000}) + "\n"
                                                           for _ in range(12)))),
         rc=0, says=("finished: 2 steps",), check=finished),
]


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _without(run: Path, name: str) -> Path:
    (run / name).unlink()
    return run


def _no_warning(err: str) -> None:
    assert "warning" not in err, err


def _nan_is_null(tmp: Path) -> None:
    d = json.loads((tmp / "cmp.json").read_text())
    assert [r["loss"] for r in d["curves"][str(tmp / "run")]] == [3.5, None]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
