"""Outputs never clobber inputs or strangers' files: every case runs the real CLI and
checks the inputs are bit-identical afterwards, and that a refusal writes nothing."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from analysis.__main__ import main
from analysis.io import OutputError, check_output_dir, check_output_file, write_atomic
from conftest import tiny_llama, mount_tmpfs_at


def tree_digest(root: Path) -> dict:
    """Every file under root (relative path -> SHA-256), and every directory, so a deleted or added
    file or directory shows."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def pair(tmp_path):
    """Two small Llama checkpoints that differ (a base and a 'fine-tune')."""
    a, b = tmp_path / "base", tmp_path / "tuned"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1).save_pretrained(b)
    return a, b


@pytest.fixture
def sft(demo, tmp_path):
    """A private copy of the demo's sft model: tests that try to clobber it never touch the shared demo."""
    d = tmp_path / "ckpt" / "sft"
    shutil.copytree(demo / "sft", d)
    return d


def _one_line_error(capsys, *needles) -> str:
    err = capsys.readouterr().err
    err = "".join(ln for ln in err.splitlines(True) if not ln.startswith("[transformers]"))  # library notices
    assert err.count("\n") == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, err
    return err


FT = ["--random", "0.01", "--steps", "1", "--batch-size", "4", "--eval-every", "1", "--reward-samples", "0",
      "--quiet"]


# ---------------------------------------------------------------- finetune --out

def test_finetune_out_is_the_checkpoint_refused(sft, capsys):
    before = tree_digest(sft)
    assert main(["finetune", str(sft), *FT, "--out", str(sft)]) == 2
    _one_line_error(capsys, str(sft), "is an input of this command")
    assert tree_digest(sft) == before


def test_finetune_out_is_the_parent_of_the_checkpoint_refused(sft, capsys):
    parent = sft.parent
    before = tree_digest(parent)
    assert main(["finetune", str(sft), *FT, "--out", str(parent)]) == 2
    _one_line_error(capsys, "holds the input")
    assert tree_digest(parent) == before  # nothing deleted: not model/, not state/, nothing


def test_finetune_out_inside_the_checkpoint_refused(sft, capsys):
    before = tree_digest(sft)
    assert main(["finetune", str(sft), *FT, "--out", str(sft / "run")]) == 2
    _one_line_error(capsys, "lies inside the input")
    assert tree_digest(sft) == before


def test_finetune_out_holding_a_mask_or_a_diff_checkpoint_refused(demo, sft, tmp_path, capsys):
    from analysis.sparsity.masks import save_mask
    from analysis.checkpoints.models import load_model

    model, _ = load_model(sft, device="cpu")
    import torch

    runs = tmp_path / "runs"
    mask = runs / "m.safetensors"
    save_mask(mask, {n: torch.ones(p.shape, dtype=torch.bool) for n, p in model.named_parameters()
                     if n.endswith("q_proj.weight")})
    before = tree_digest(runs)
    args = ["--steps", "1", "--batch-size", "4", "--quiet"]
    assert main(["finetune", str(sft), "--mask", str(mask), *args, "--out", str(runs)]) == 2
    _one_line_error(capsys, "holds the input", "m.safetensors")
    assert tree_digest(runs) == before
    assert main(["finetune", str(sft), "--diff", str(sft), str(demo / "rl-seed1"), *args,
                 "--out", str(demo / "rl-seed1" / "x")]) == 2
    _one_line_error(capsys, "lies inside the input")
    assert not (demo / "rl-seed1" / "x").exists()


def test_finetune_out_a_strangers_directory_needs_overwrite(sft, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "config.json").write_text('{"mine": true}')  # a model directory has one too: not a marker
    before = tree_digest(out)
    assert main(["finetune", str(sft), *FT, "--out", str(out)]) == 2
    _one_line_error(capsys, "non-empty directory that Subnetscope did not write", "--overwrite")
    assert tree_digest(out) == before
    assert main(["finetune", str(sft), *FT, "--out", str(out), "--overwrite"]) == 0
    assert (out / "notes.txt").read_text() == "my notes"  # ours written beside it, nothing of theirs deleted
    assert (out / "model" / "model.safetensors").is_file() and (out / ".subnetscope-run").is_file()


def test_finetune_out_an_existing_file_refused(sft, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["finetune", str(sft), *FT, "--out", str(f)]) == 2
    _one_line_error(capsys, "exists and is a file, not a directory")
    assert f.read_text() == "x"


def test_a_run_directory_is_reused_by_a_new_run(sft, tmp_path):
    out = tmp_path / "run"
    assert main(["finetune", str(sft), *FT, "--out", str(out)]) == 0
    first = (out / "model" / "model.safetensors").read_bytes()
    assert main(["finetune", str(sft), *FT, "--seed", "3", "--out", str(out)]) == 0  # ours: no --overwrite needed
    assert (out / "model" / "model.safetensors").read_bytes() != first


def test_a_second_writer_of_a_run_directory_is_refused(sft, tmp_path, capsys):
    from analysis.jobs import RunLock

    out = tmp_path / "run"
    with RunLock(out):  # as if another `finetune --out run` were training right now
        assert main(["finetune", str(sft), *FT, "--out", str(out)]) == 2
        _one_line_error(capsys, "another process", "is writing this run directory")
        assert sorted(p.name for p in out.iterdir()) == [".subnetscope-run"]  # the first run's files untouched
    assert main(["finetune", str(sft), *FT, "--out", str(out)]) == 0  # the lock is gone with its holder


@pytest.mark.multiprocess
def test_two_runs_into_one_directory_at_once(sft, tmp_path):
    """Two real processes: exactly one trains, the other is refused in one line."""
    import subprocess
    import sys

    from conftest import ROOT

    import time

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "analysis", "finetune", str(sft), *FT, "--steps", "150", "--eval-every", "1000",
           "--out", str(out)]
    # The second starts once the first is training (started together, a slow machine can let the first
    # finish before the second looks, and then a finished run of ours is rightly trained again).
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        summary = out / "summary.json"
        if summary.exists() and '"running"' in summary.read_text():
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first run ended before it was seen training"
    second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (first, second)]
    codes = sorted(r for r, _ in results)
    assert codes == [0, 2], results
    refused = next(err for r, err in results if r == 2)
    assert refused.strip().count("\n") == 0 and ("another process" in refused or "still training" in refused
                                                 or "did not write" in refused)
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"


# ---------------------------------------------------------------- output files

def test_diff_json_onto_the_weights_file_refused(pair, capsys):
    a, b = pair
    before = tree_digest(b)
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(b / "model.safetensors")]) == 2
    _one_line_error(capsys, "is an input of this command")
    assert tree_digest(b) == before


def test_diff_json_inside_an_input_checkpoint_refused(pair, capsys):
    a, b = pair
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(a / "diff.json")]) == 2
    _one_line_error(capsys, "lies inside the input")
    assert not (a / "diff.json").exists()


def test_mask_out_onto_an_input_refused(pair, tmp_path, capsys):
    a, b = pair
    single = tmp_path / "single.safetensors"
    shutil.copy(b / "model.safetensors", single)
    before = single.read_bytes()
    assert main(["diff", str(a), str(single), "--quiet", "--json", str(tmp_path / "d.json"),
                 "--mask-out", str(single)]) == 2
    _one_line_error(capsys, "is an input of this command")
    assert single.read_bytes() == before and not (tmp_path / "d.json").exists()


def test_the_same_file_for_two_outputs_refused(pair, tmp_path, capsys):
    a, b = pair
    out = tmp_path / "o.json"
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(out), "--mask-out", str(out)]) == 2
    _one_line_error(capsys, "given as both --json and --mask-out")


def test_json_to_a_fifo_without_a_reader_is_one_line_not_a_hang(pair, tmp_path, capsys):
    a, b = pair
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(fifo)]) == 2
    _one_line_error(capsys, f"{fifo}: no process is reading the FIFO")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def _read_in_thread(open_reader):
    """Starts a thread that reads everything from ``open_reader()``; returns (thread, chunks)."""
    import threading

    chunks = []

    def read():
        with open_reader() as f:
            chunks.append(f.read())

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, chunks


def test_json_to_a_fifo_with_a_reader_is_written_directly(pair, tmp_path):
    a, b = pair
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    t, chunks = _read_in_thread(lambda: open(fifo, "rb"))
    _wait_until_opening(t)  # the reader is there first: a writer never waits for one
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(fifo)]) == 0
    t.join(10)
    d = json.loads(chunks[0])
    assert d["total_params"] == 68_160 and 0 < d["changed_params"] <= 68_160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "pipe", "tuned"]  # no temporary file beside it


def _wait_until_opening(t) -> None:
    """Waits until thread ``t`` blocks in opening a FIFO for reading (Linux: its wchan)."""
    import time

    wchan = Path(f"/proc/self/task/{t.native_id}/wchan")
    for _ in range(1000):
        if wchan.read_text() == "wait_for_partner":
            return
        time.sleep(0.01)
    pytest.fail("the reader thread never opened the FIFO")


def test_json_to_an_os_pipe_through_dev_fd(pair):
    a, _ = pair
    r, w = os.pipe()
    t, chunks = _read_in_thread(lambda: os.fdopen(r, "rb"))
    try:
        assert main(["inspect", str(a), "--json", f"/dev/fd/{w}"]) == 0
    finally:
        os.close(w)
    t.join(10)
    assert json.loads(chunks[0])["total_params"] == 68_160


def test_json_through_a_descriptor_of_a_regular_file_and_a_read_only_one(pair, tmp_path, capsys):
    """`--json /dev/stdout > out.txt` writes at the descriptor's place (nothing is renamed over the
    shell's file); a descriptor open for reading only is refused before any work."""
    a, _ = pair
    out = tmp_path / "out.txt"
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        assert main(["inspect", str(a), "--json", f"/proc/self/fd/{fd}"]) == 0
    finally:
        os.close(fd)
    assert json.loads(out.read_text())["total_params"] == 68_160
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "out.txt", "tuned"]
    ro = os.open(out, os.O_RDONLY)
    try:
        assert main(["inspect", str(a), "--json", f"/dev/fd/{ro}"]) == 2
        _one_line_error(capsys, f"/dev/fd/{ro}: names file descriptor {ro}, which is open for reading only")
    finally:
        os.close(ro)
    assert json.loads(out.read_text())["total_params"] == 68_160


def test_json_dash_is_the_json_alone_on_stdout(pair, tmp_path, capsys, monkeypatch):
    a, b = pair
    monkeypatch.chdir(tmp_path)
    assert main(["diff", str(a), str(b), "--quiet", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)  # stdout holds the JSON and nothing else: the summary went to stderr
    assert d["base"] == str(a) and d["total_params"] == 68_160
    assert f"{d['changed_params']:,} of 68,160 changed" in err and "wrote -" in err
    assert not os.path.lexists(tmp_path / "-")
    assert main(["inspect", str(a), "--json", "-"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["total_params"] == 68_160 and "total_params" in err
    assert not os.path.lexists(tmp_path / "-")


@pytest.mark.multiprocess
def test_json_to_dev_stdout_of_a_real_pipe(pair, tmp_path):
    """One real process: `diff ... --json /dev/stdout | reader`. The JSON is written into the pipe
    directly (it used to fail after the whole diff, on a temporary file beside /proc/self/fd)."""
    import subprocess
    import sys

    a, b = pair
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    p = subprocess.run([sys.executable, "-m", "analysis", "diff", str(a), str(b), "--quiet", "--json", "/dev/stdout"],
                       capture_output=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr.decode()
    d, end = json.JSONDecoder().raw_decode(p.stdout.decode())  # the JSON first, then the summary
    assert d["total_params"] == 68_160 and "wrote /dev/stdout" in p.stdout.decode()[end:]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["base", "tuned"]


def test_an_output_in_proc_is_refused_before_any_work(pair, capsys, monkeypatch):
    import analysis.sparsity.diff

    a, b = pair
    calls = []
    monkeypatch.setattr(analysis.sparsity.diff, "diff_stats", lambda *x: calls.append(1))  # must never be reached
    for out in ("/proc/self/fd/out.json", "/sys/kernel/out.json"):
        assert main(["diff", str(a), str(b), "--quiet", "--json", out]) == 2
        _one_line_error(capsys, f"{out}: lies in /", "the kernel's virtual file system")
    assert calls == []


def test_a_mask_or_scores_file_of_ours_is_replaced_by_a_rerun(demo, tmp_path, capsys):
    """The weights rule tells our own outputs apart: a rerun replaces its mask and scores files."""
    a, b = demo / "base", demo / "sft"
    mask, scores = tmp_path / "m.safetensors", tmp_path / "s.safetensors"
    for _ in range(2):
        assert main(["diff", str(a), str(b), "--quiet", "--json", str(tmp_path / "d.json"),
                     "--mask-out", str(mask)]) == 0
        assert main(["importance", str(a), "--selector", "magnitude", "--quiet", "--json",
                     str(tmp_path / "i.json"), "--scores-out", str(scores)]) == 0
    from analysis.sparsity.masks import load_mask

    assert load_mask(mask) and scores.stat().st_size > 0


def test_an_output_onto_weights_is_refused_by_content_not_name(tmp_path):
    from safetensors.torch import save_file

    w = tmp_path / "weights.json"  # a misleading name: the bytes decide
    save_file({"x": __import__("torch").zeros(2)}, w)
    with pytest.raises(OutputError, match="is a checkpoint's weights, safetensors"):
        check_output_file(w)
    plain = tmp_path / "old.safetensors"
    plain.write_text("{}")  # not weights (no header): an earlier output may be replaced
    assert check_output_file(plain) == plain.resolve()


def test_json_to_a_directory_refused(pair, tmp_path, capsys):
    a, b = pair
    d = tmp_path / "adir"
    d.mkdir()
    assert main(["inspect", str(a), "--json", str(d)]) == 2
    _one_line_error(capsys, "is a directory, not a regular file")
    assert d.is_dir() and not any(d.iterdir())


def test_json_through_a_symlink_replaces_the_target_and_keeps_the_link(pair, tmp_path):
    a, b = pair
    target = tmp_path / "real" / "out.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert main(["inspect", str(a), "--json", str(link)]) == 0
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["total_params"] == 68_160
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]  # temp file was beside the target


def test_a_symlink_to_an_input_refused(pair, tmp_path, capsys):
    a, b = pair
    link = tmp_path / "sneaky.json"
    link.symlink_to(b / "model.safetensors")
    before = tree_digest(b)
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(link)]) == 2
    _one_line_error(capsys, "is an input of this command")
    assert tree_digest(b) == before and link.is_symlink()


def test_a_symlink_loop_is_one_line(pair, tmp_path, capsys):
    a, _ = pair
    loop = tmp_path / "loop.json"
    loop.symlink_to(tmp_path / "loop.json")
    assert main(["inspect", str(a), "--json", str(loop)]) == 2
    _one_line_error(capsys, "loop.json")


def test_scores_out_onto_an_input_refused(demo, sft, capsys):
    w = sft / "model.safetensors"
    before = w.read_bytes()
    assert main(["importance", str(sft), "--selector", "magnitude", "--quiet", "--json", "/tmp/unused.json",
                 "--scores-out", str(w)]) == 2
    _one_line_error(capsys, "is an input of this command")
    assert w.read_bytes() == before


def test_output_under_a_regular_file_refused(pair, tmp_path, capsys):
    a, _ = pair
    f = tmp_path / "f"
    f.write_text("x")
    assert main(["inspect", str(a), "--json", str(f / "out.json")]) == 2
    _one_line_error(capsys, "f/out.json: cannot write (Not a directory)")


# ---------------------------------------------------------------- read-only and full filesystems

@pytest.fixture
def mount_tmpfs(tmp_path):
    """Mounts a small tmpfs (root can here and in CI); yields a function (size, ro) -> mount point."""
    mounted = []

    def mount(size: str, ro: bool = False, name: str = "fs") -> Path:
        d = tmp_path / name
        d.mkdir(exist_ok=True)
        opts = f"size={size}" + (",ro" if ro else "")
        mount_tmpfs_at(d, opts)
        mounted.append(d)
        return d

    yield mount
    for d in mounted:
        os.system(f"umount {d} 2>/dev/null")


def test_read_only_filesystem_refused_before_any_work(pair, mount_tmpfs, capsys, monkeypatch):
    import analysis.sparsity.diff

    a, b = pair
    ro = mount_tmpfs("64k", ro=True)
    calls = []
    monkeypatch.setattr(analysis.sparsity.diff, "diff_stats", lambda *x: calls.append(1))  # must never be reached
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(ro / "d.json")]) == 2
    _one_line_error(capsys, "read-only file system")
    assert calls == []


def test_full_disk_while_writing_json_is_one_line_and_leaves_no_temp_file(pair, mount_tmpfs, capsys):
    a, b = pair
    small = mount_tmpfs("8k")
    assert main(["diff", str(a), str(b), "--quiet", "--json", str(small / "d.json")]) == 2
    _one_line_error(capsys, "No space left on device", "d.json")
    assert list(small.iterdir()) == []


def test_write_atomic_removes_its_temp_file_on_any_error(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OutputError, match=r"x\.json: cannot write \(Input/output error\)"):
        write_atomic(tmp_path / "x.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_saving_the_model_keeps_the_training(sft, tmp_path, mount_tmpfs, capsys):
    """The model does not fit: one line, exit 2, no model.tmp, summary failed with the error, and the
    state saved before the model lets --resume finish the run once space is back, with the weights
    an uninterrupted run gives."""
    fs = mount_tmpfs("240k")
    out = fs / "run"
    assert main(["finetune", str(sft), *FT, "--steps", "2", "--out", str(out)]) == 2
    _one_line_error(capsys, "No space left on device")
    assert not (out / "model.tmp").exists() and not (out / "model").exists()
    s = json.loads((out / "summary.json").read_text())
    assert s["status"] == "failed" and "No space left on device" in s["error"]
    assert json.loads((out / "state" / "meta.json").read_text())["step"] == 2
    os.system(f"mount -o remount,size=8m {fs}")  # space is back
    assert main(["finetune", "--resume", str(out), "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert main(["finetune", str(sft), *FT, "--steps", "2", "--out", str(ref)]) == 0
    assert (out / "model" / "model.safetensors").read_bytes() == (ref / "model" / "model.safetensors").read_bytes()
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert not (out / "state").exists()


# ---------------------------------------------------------------- resume and config

@pytest.fixture
def cancelled_run(sft, tmp_path):
    """A run directory cancelled after its first step (state saved, resumable)."""
    from analysis.finetune.config import FinetuneConfig
    from analysis.finetune.run import run_finetune

    out = tmp_path / "run"
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 1

    run_finetune(FinetuneConfig(checkpoint=str(sft), random=0.01, steps=3, batch_size=4, reward_samples=0), out,
                 should_stop=stop)
    return out


def test_resume_of_a_corrupt_state_is_one_line(cancelled_run, capsys):
    out = cancelled_run
    state = out / "state" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    assert main(["finetune", "--resume", str(out), "--quiet"]) == 2
    _one_line_error(capsys, "state.pt: unreadable saved state")
    (out / "state" / "meta.json").write_text("{not json")
    assert main(["finetune", "--resume", str(out), "--quiet"]) == 2
    _one_line_error(capsys, "meta.json: unreadable saved state")


def test_resume_of_a_run_still_training_refused(cancelled_run, capsys):
    from analysis.jobs import RunLock

    out = cancelled_run
    with RunLock(out):
        assert main(["finetune", "--resume", str(out), "--quiet"]) == 2
        _one_line_error(capsys, "still training")


@pytest.mark.parametrize("flag,value,needle", [("--lr", "inf", "lr must be a finite number > 0"),
                                               ("--lr", "nan", "lr must be a finite number > 0"),
                                               ("--id3-exp", "inf", "id3_exp must be a finite number"),
                                               ("--id3-eps", "nan", "id3_eps must be a finite number"),
                                               ("--device", "bogus", "device must be auto, cpu or cuda")])
def test_bad_numbers_are_refused_before_a_run_directory_exists(sft, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "run"
    assert main(["finetune", str(sft), *FT, flag, value, "--out", str(out)]) == 2
    _one_line_error(capsys, needle)
    assert not out.exists()


def test_a_mask_of_another_model_is_refused_before_anything_is_written(sft, tmp_path, capsys):
    import torch

    from analysis.sparsity.masks import save_mask

    m = tmp_path / "other.safetensors"
    save_mask(m, {"model.layers.0.self_attn.q_proj.weight": torch.ones(3, 3, dtype=torch.bool)})
    out = tmp_path / "run"
    assert main(["finetune", str(sft), "--mask", str(m), "--steps", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "has shape (3, 3), the checkpoint's tensor")
    save_mask(m, {"transformer.h.0.attn.c_attn.weight": torch.ones(3, 3, dtype=torch.bool)})
    assert main(["finetune", str(sft), "--mask", str(m), "--steps", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "does not hold", "a mask of another model?")
    assert not out.exists()


# ---------------------------------------------------------------- the checks themselves

def test_check_output_dir_and_file_rules(tmp_path):
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "w.safetensors").write_bytes(b"x")
    data = tmp_path / "data.txt"
    data.write_text("d")
    inputs = [ck, data]
    for bad in (ck, tmp_path, ck / "sub"):
        with pytest.raises(OutputError):
            check_output_dir(bad, inputs)
    with pytest.raises(OutputError, match="holds the input .*data.txt"):
        check_output_dir(tmp_path, [data])
    assert check_output_dir(tmp_path / "new" / "run", inputs) == (tmp_path / "new" / "run").resolve()
    for bad in (ck / "w.safetensors", ck / "new.json", data):
        with pytest.raises(OutputError):
            check_output_file(bad, inputs)
    assert check_output_file(tmp_path / "out" / "x.json", inputs) == (tmp_path / "out" / "x.json").resolve()


@pytest.mark.parametrize("real", [False, True])
def test_demo_never_replaces_a_strangers_directory(tmp_path, capsys, real):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree_digest(out)
    assert main(["demo", "--out", str(out), *(["--real"] if real else [])]) == 2
    _one_line_error(capsys, "non-empty directory that Subnetscope did not write")
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary directory left beside it


def test_finetune_of_a_checkpoint_without_float_weights_is_one_line(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    model = tiny_llama()
    d = tmp_path / "int8"
    d.mkdir()
    save_file({k: (v * 100).round().clamp(-128, 127).to(torch.int8).contiguous()
               for k, v in model.state_dict().items()},
              d / "model.safetensors")
    model.config.to_json_file(d / "config.json")
    out = tmp_path / "run"
    assert main(["finetune", str(d), "--full", "--steps", "1", "--out", str(out)]) == 2
    _one_line_error(capsys, "holds no floating-point weights to train")
    assert not out.exists()


@pytest.mark.parametrize("command", ["inspect", "align"])
def test_outputs_are_checked_before_a_hub_download(pair, capsys, monkeypatch, command):
    """A hub id not cached yet: the bad output is reported and nothing is fetched."""
    import huggingface_hub
    from huggingface_hub import constants

    real = huggingface_hub.snapshot_download
    fetched = []

    def recording(repo_id, *a, local_files_only=False, **kw):
        if not local_files_only:
            fetched.append(repo_id)
            raise AssertionError("the network was used")
        return real(repo_id, *a, local_files_only=True, **kw)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recording)
    refs = ["nobody-here/not-cached"] + ([str(pair[0])] if command == "align" else [])
    assert main([command, *refs, "--json", "/proc/self/out.json"]) == 2
    _one_line_error(capsys, "/proc/self/out.json: lies in /proc")
    assert fetched == []
