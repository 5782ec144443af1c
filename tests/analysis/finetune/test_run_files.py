"""A run's files under faults: Ctrl-C keeps the run resumable, a cut metrics line costs no row after
a resume, a full disk leaves the summary failed with the reason in words, a diverged run's NaN is
written as null, local paths are recorded absolute, and the lm task reads a huge data file in
bounded pieces. On a 2-layer GPT-2 with the demo's tokenizer (a run takes about a second)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from analysis.__main__ import main
from analysis.finetune.config import FinetuneConfig
from analysis.finetune.run import resume_finetune, run_finetune
from conftest import ROOT, tiny_gpt2, mount_tmpfs_at

COMMON = dict(full=True, batch_size=4, eval_every=1000, save_every=1000, reward_samples=0, lr=1e-3, device="cpu")
FLAGS = ["--full", "--batch-size", "4", "--eval-every", "1000", "--save-every", "1000", "--reward-samples", "0",
         "--lr", "1e-3", "--device", "cpu", "--quiet"]


@pytest.fixture
def ckpt(tmp_path) -> Path:
    from analysis.families.demo import make_tokenizer

    d = tmp_path / "ck" / "gpt2"
    tiny_gpt2().save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _same_weights(a: Path, b: Path) -> bool:
    x, y = (load_file(d / "model" / "model.safetensors") for d in (a, b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """``python -m analysis ARGS`` in a fresh process (as the SIGTERM test of test_distributed: the
    weights of runs in processes with different histories may differ in the last bit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "analysis", *args], capture_output=True, text=True, timeout=300,
                       env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr[-2000:]
    return p


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ctrl_c_saves_the_state_and_resume_gives_the_uninterrupted_weights(ckpt, tmp_path):
    """Item 1 (test_distributed's SIGTERM test, with SIGINT and one process): a Ctrl-C before the
    first periodic save stops after the current step with the state saved and says so on stderr
    (and that a second Ctrl-C stops at once); --resume then gives the weights and metrics of an
    uninterrupted run."""
    args = [str(ckpt), "--steps", "30", *FLAGS]
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    _cli(["finetune", *args, "--out", str(straight)], tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "analysis", "finetune", *args, "--out", str(cut)], env=env,
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t = time.time()
    while not (cut / "metrics.jsonl").is_file() or len((cut / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() - t < 300 and p.poll() is None, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    assert "interrupted: stopping after the current step and saving the state" in err
    assert "Ctrl-C again to stop at once" in err and "Traceback" not in err
    s = json.loads((cut / "summary.json").read_text())
    assert s["status"] == "cancelled" and 3 <= s["steps_done"] < 30, s
    assert json.loads((cut / "state" / "meta.json").read_text())["step"] == s["steps_done"]
    _cli(["finetune", "--resume", str(cut), "--quiet"], tmp_path)
    assert json.loads((cut / "summary.json").read_text())["status"] == "finished"
    assert _same_weights(straight, cut)
    assert [r["step"] for r in _rows(cut)] == list(range(1, 31))
    assert [r["loss"] for r in _rows(cut)] == [r["loss"] for r in _rows(straight)]


def test_in_process_finetune_puts_the_signal_handlers_back(ckpt, tmp_path):
    """``main(["finetune", ...])`` installs its SIGINT and SIGTERM handlers only while it runs."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert main(["finetune", str(ckpt), "--steps", "1", *FLAGS, "--out", str(tmp_path / "run")]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


@pytest.mark.parametrize("cut_at", ["last-row-half", "last-row-all-but-newline"])
def test_resume_after_a_cut_last_metrics_line_has_every_row(ckpt, tmp_path, cut_at):
    """Item 9c: the last metrics line (the row of the saved step) cut by a crash: the resumed run
    puts it back from the state, and ends with exactly one row per step 1 … 30, the rows of an
    uninterrupted run."""
    straight = tmp_path / "straight"
    run_finetune(FinetuneConfig(checkpoint=str(ckpt), steps=30, **COMMON), straight)
    cut = tmp_path / "cut"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 15

    assert run_finetune(FinetuneConfig(checkpoint=str(ckpt), steps=30, **COMMON), cut, should_stop=stop)[
        "steps_done"] == 15
    text = (cut / "metrics.jsonl").read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    keep = len(last) // 2 if cut_at == "last-row-half" else len(last)
    (cut / "metrics.jsonl").write_text(text[:len(text) - len(last) - 1] + last[:keep])  # no end of line
    s = resume_finetune(cut)
    assert s["status"] == "finished" and "metrics_missing" not in s
    assert [r["step"] for r in _rows(cut)] == list(range(1, 31))
    assert _rows(cut) == [{**r, "tokens_per_s": r2["tokens_per_s"], "step_s": r2["step_s"]}
                          for r, r2 in zip(_rows(straight), _rows(cut))]
    assert _same_weights(straight, cut)


def test_rows_lost_before_the_saved_step_are_counted_not_invented(ckpt, tmp_path, capsys):
    """More than the last line lost (rows 9 … 15 of a state saved at 15): the resume says how many
    rows are missing, in the summary and on stderr, and the rest is complete."""
    cut = tmp_path / "cut"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 15

    run_finetune(FinetuneConfig(checkpoint=str(ckpt), steps=20, **COMMON), cut, should_stop=stop)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:8]) + "\n")
    assert main(["finetune", "--resume", str(cut), "--quiet"]) == 0
    assert "metrics.jsonl: 6 rows before the saved step were lost" in capsys.readouterr().err
    assert json.loads((cut / "summary.json").read_text())["metrics_missing"] == 6
    assert [r["step"] for r in _rows(cut)] == [*range(1, 9), 15, *range(16, 21)]


# ---------------------------------------------------------------- a full disk (item 6)

@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of the given size (root can mount one here and in CI)."""
    mounted = []

    def mount(size: str) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        mount_tmpfs_at(d, f"size={size}")
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        os.system(f"umount {d} 2>/dev/null")


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("size,where", [("300k", "state/state.pt"), ("16k", "metrics.jsonl")])
def test_full_disk_fails_the_run_and_says_the_disk_is_full(ckpt, small_disk, capsys, size, where):
    """The disk fills while the state is saved (torch's writer said "unexpected pos … vs …", and the
    partial file it held open kept the disk full, so summary.json stayed "running" with a dead pid)
    or while a metrics row is written (no new file fits at all): one line saying the disk is full
    with the bytes free, the summary failed with that reason, no temporary file left."""
    out = small_disk(size) / "run"
    assert main(["finetune", str(ckpt), "--steps", "40", *FLAGS, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert f"run/{where}: cannot write: No space left on device (the disk is full: " in line
    assert "bytes free on it)" in line and "inline_container" not in line and "unexpected pos" not in line
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and s["error"] == line.removeprefix("error: ")
    assert not any(p.name.endswith(".tmp") or p.name == "state.tmp" for p in out.iterdir())


def test_full_disk_reported_by_torch_as_its_writer_error(ckpt, tmp_path, monkeypatch, capsys):
    """The state file's writes fail with ENOSPC; torch's own writer turns that into "[enforce fail
    at inline_container.cc:672] . unexpected pos …": the line still says the disk is full, in
    words, with the bytes free (from shutil.disk_usage)."""
    import errno
    import shutil

    from analysis.jobs import rundir

    def write(self, data):
        self.error = OSError(errno.ENOSPC, "No space left on device")
        raise self.error

    monkeypatch.setattr(rundir._Recording, "write", write)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    out = tmp_path / "run"
    assert main(["finetune", str(ckpt), "--steps", "2", *FLAGS, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.endswith("run/state/state.pt: cannot write: No space left on device (the disk is full: 4,096 "
                         "bytes free on it)"), line
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and "No space left on device" in s["error"]
    assert not (out / "state.tmp").exists() and not (out / "state").exists()


def test_a_diverged_run_writes_its_nan_loss_as_null(ckpt, tmp_path):
    """A NaN loss (lr 1e30): the summary could not be written (JSON has no NaN), a traceback."""
    out = tmp_path / "run"
    s = run_finetune(FinetuneConfig(checkpoint=str(ckpt), steps=3, **{**COMMON, "lr": 1e30}), out)
    assert s["status"] == "finished"
    saved = json.loads((out / "summary.json").read_text())
    assert saved["status"] == "finished" and saved["final"]["loss"] is None and saved["final"]["step"] == 3
    assert [r["step"] for r in _rows(out)] == [1, 2, 3]


# ---------------------------------------------------------------- paths (item 11)

def test_local_paths_are_recorded_absolute_and_a_hub_id_stays(ckpt, tmp_path, monkeypatch):
    """A run started with a relative checkpoint (``ck/gpt2``) records it absolute, so a resume from
    another directory finds it (it was taken for a hub id); the diff's checkpoints, mask files and
    data file likewise; a hub id or a dataset name stays as given."""
    monkeypatch.chdir(tmp_path)
    out = Path("runs") / "rel"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1

    tiny_gpt2(seed=1).save_pretrained(tmp_path / "ck" / "tuned")
    run_finetune(FinetuneConfig(checkpoint="ck/gpt2", diff=["ck/gpt2", "./ck/../ck/tuned"], steps=3,
                                **{k: v for k, v in COMMON.items() if k != "full"}), out, should_stop=stop)
    saved = json.loads((tmp_path / "runs" / "rel" / "config.json").read_text())
    assert saved["checkpoint"] == str(ckpt) and saved["diff"] == [str(ckpt), str(tmp_path / "ck" / "tuned")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["finetune", "--resume", str(tmp_path / "runs" / "rel"), "--quiet"]) == 0
    (tmp_path / "m.safetensors").write_bytes(b"")
    (tmp_path / "d.txt").write_text("x")
    monkeypatch.chdir(tmp_path)
    c = FinetuneConfig(checkpoint="HuggingFaceTB/SmolLM2-135M", task="lm", data="d.txt", mask=["m.safetensors"])
    a = c.with_absolute_paths()
    assert a.checkpoint == "HuggingFaceTB/SmolLM2-135M"  # names nothing on disk: a hub id
    assert a.data == str(tmp_path / "d.txt") and a.mask == [str(tmp_path / "m.safetensors")]
    assert FinetuneConfig(checkpoint="x", task="lm", data="wikitext:wikitext-2-raw-v1",
                          full=True).with_absolute_paths().data == "wikitext:wikitext-2-raw-v1"


# ---------------------------------------------------------------- lm data (item 5b)

def test_lm_data_read_in_bounded_pieces(tmp_path, monkeypatch):
    """One line of 50 MB (the process aborted: "memory allocation of 3489660928 bytes failed"): the
    tokenizer sees at most PIECE_CHARS characters at a time, and the file is read only as far as
    the run needs (with defaults, every small file is read whole)."""
    from analysis.families.demo import make_tokenizer
    from analysis.finetune import tasks

    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(50 * 2**20)  # sparse: 50 MB of NUL on one line, made at once
    tok = make_tokenizer()
    seen = []
    real = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, text, *a, **k: (seen.append(len(text)),
                                                                             real(self, text, *a, **k))[1])
    seqs, note = tasks.lm_sequences(FinetuneConfig(checkpoint="x", task="lm", data=str(huge), full=True, steps=2,
                                                   batch_size=4, seq_len=32, eval_samples=4), tok)
    assert max(seen) <= tasks.PIECE_CHARS == 2**18 and sum(seen) == tasks.MIN_TOKENS
    assert len(seqs) == tasks.MIN_TOKENS // 32 and all(len(ids) == 32 for ids, _ in seqs)
    assert note == f"{huge}: read the first 262,144 characters (262,144 tokens), as many as the run's steps, " \
                   "batch size and held-out sequences use"
    # a run that needs more reads more: (200 steps × 64 + 5 × 4 held out) × 32 tokens = 410,240: two pieces
    seen.clear()
    seqs, _ = tasks.lm_sequences(FinetuneConfig(checkpoint="x", task="lm", data=str(huge), full=True, steps=200,
                                                batch_size=64, seq_len=32, eval_samples=4), tok)
    assert seen == [2**18, 2**18] and len(seqs) == 2 * 2**18 // 32


def test_lm_data_of_small_files_is_what_it_was(tmp_path):
    """A file under the bounds gives calibration's sequences exactly (same tokens, same order)."""
    from analysis.importance.calibration import token_sequences
    from analysis.families.demo import make_tokenizer
    from analysis.finetune.tasks import lm_sequences

    tok = make_tokenizer()
    txt, jsonl = tmp_path / "s.txt", tmp_path / "s.jsonl"
    txt.write_text("".join(f"{a}+{b}={a + b}\n" for a in range(30) for b in range(30)))
    jsonl.write_text("".join(json.dumps({"prompt": f"{a}+1=", "completion": str(a + 1)}) + "\n"
                             + json.dumps({"text": f"{a}-1={a - 1}"}) + "\n" for a in range(30)))
    for data in (txt, jsonl):
        cfg = FinetuneConfig(checkpoint="x", task="lm", data=str(data), full=True, seq_len=16, seed=3)
        seqs, note = lm_sequences(cfg, tok)
        assert note is None and len(seqs) > 50
        assert seqs == token_sequences(str(data), tok, 10**9, 16, 0, 3, "auto")


def test_a_masked_run_leaves_the_thread_count_as_it_was(ckpt, tmp_path):
    """The inside-mask check runs the diff's parallel kernels, which set torch's thread count to
    the number of cores: a later run in the same process then computed other last bits (an
    uninterrupted run and its resume disagreed)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest's (an earlier diff in this process may have changed it)
    try:
        s = run_finetune(FinetuneConfig(checkpoint=str(ckpt), steps=1, **{**COMMON, "full": False, "random": 0.1}),
                         tmp_path / "run")
        assert s["outside_mask_changed"] == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
