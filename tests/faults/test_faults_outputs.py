"""Outputs: an output that resolves to a checkpoint's weights — through a symlink,
or inside a checkpoint directory that is not even an input — is refused before any work and the
weights stay byte-identical; a virtual file system, a path under a file, a directory, a socket, a
FIFO nobody reads and a full device are one line, never a traceback or a hang."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama
from fault_corpus import Case, params, run_case


def _digest(root: Path) -> dict:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _pair(tmp: Path) -> tuple[Path, Path]:
    a, b = tmp / "base", tmp / "tuned"
    if not a.exists():
        tiny_llama(seed=0).save_pretrained(a)
        tiny_llama(seed=1).save_pretrained(b)
    return a, b


def _stranger(tmp: Path) -> Path:
    """A checkpoint that is not an input of the command (another model on the same disk)."""
    c = tmp / "other" / "ck"
    tiny_llama(seed=2).save_pretrained(c)
    (tmp / "before.txt").write_text(repr(_digest(c)))
    return c


def _intact(tmp: Path, path: Path) -> None:
    assert repr(_digest(path)) == (tmp / "before.txt").read_text(), f"{path} changed"


def _link(tmp: Path, name: str, target: Path) -> Path:
    link = tmp / name
    link.symlink_to(target)
    return link


def _json_link_to_stranger_weights(tmp):
    a, b = _pair(tmp)
    c = _stranger(tmp)
    return ["diff", a, b, "--quiet", "--json", _link(tmp, "d.json", c / "model.safetensors")]


def _check_stranger_intact(tmp, out, err):
    _intact(tmp, tmp / "other" / "ck")
    assert os.path.islink(tmp / "d.json")  # the link stays too


def _mask_link_to_stranger_weights(tmp):
    a, b = _pair(tmp)
    c = _stranger(tmp)
    return ["diff", a, b, "--quiet", "--json", tmp / "out.json",
            "--mask-out", _link(tmp, "m.safetensors", c / "model.safetensors")]


def _check_stranger_intact_no_json(tmp, out, err):
    _intact(tmp, tmp / "other" / "ck")
    assert not (tmp / "out.json").exists()


def _lone_weights(tmp: Path, kind: str) -> Path:
    """A single weights file, not inside any checkpoint directory."""
    sd = {k: v.contiguous() for k, v in tiny_llama(seed=3).state_dict().items()}
    d = tmp / "loose"
    d.mkdir()
    if kind == "safetensors":
        from safetensors.torch import save_file

        f = d / "w.safetensors"
        save_file(sd, f)
    else:
        f = d / ("w.pt" if kind == "zip" else "w.bin")
        torch.save(sd, f, _use_new_zipfile_serialization=kind == "zip")
    (tmp / "before.txt").write_text(repr(_digest(f)))
    return f


def _scores_link_to_lone_safetensors(tmp):
    a, _ = _pair(tmp)
    w = _lone_weights(tmp, "safetensors")
    return ["importance", a, "--selector", "magnitude", "--quiet", "--json", tmp / "out.json",
            "--scores-out", _link(tmp, "s.safetensors", w)]


def _json_onto(kind):
    def setup(tmp):
        a, _ = _pair(tmp)
        w = _lone_weights(tmp, kind)
        return ["inspect", a, "--json", _link(tmp, "i.json", w)]
    return setup


def _check_lone_intact(tmp, out, err):
    f = next((tmp / "loose").iterdir())
    _intact(tmp, f)
    assert sorted(p.name for p in (tmp / "loose").iterdir()) == [f.name]  # no temporary file left either


def _json_inside_stranger(name):
    def setup(tmp):
        a, b = _pair(tmp)
        c = _stranger(tmp)
        return ["diff", a, b, "--quiet", "--json", c / name]
    return setup


def _check_stranger_untouched(tmp, out, err):
    _intact(tmp, tmp / "other" / "ck")
    assert sorted(p.name for p in (tmp / "other" / "ck").iterdir()) == ["config.json", "generation_config.json",
                                                                         "model.safetensors"]


def _inspect_to(path):
    def setup(tmp):
        a, _ = _pair(tmp)
        return ["inspect", a, "--json", path(tmp) if callable(path) else path]
    return setup


def _under_a_file(tmp):
    a, b = _pair(tmp)
    (tmp / "f").write_text("x")
    return ["diff", a, b, "--quiet", "--json", tmp / "out.json", "--mask-out", tmp / "f" / "m.safetensors"]


def _check_file_kept(tmp, out, err):
    assert (tmp / "f").read_text() == "x" and not (tmp / "out.json").exists()


def _check_nothing_named_newdir(tmp, out, err):
    assert not os.path.lexists(tmp / "newdir")


def _a_directory(tmp):
    (tmp / "adir").mkdir()
    return tmp / "adir"


def _socket(tmp):
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(tmp / "sock"))
    s.close()  # the socket file stays
    return tmp / "sock"


def _fifo(tmp):
    os.mkfifo(tmp / "fifo")
    return tmp / "fifo"


def _both_stdout(tmp):
    a, b = _pair(tmp)
    return ["diff", a, b, "--quiet", "--json", "-", "--mask-out", "-"]


def _both_devnull(tmp):
    a, b = _pair(tmp)
    return ["diff", a, b, "--quiet", "--json", "/dev/null", "--mask-out", "/dev/null"]


def _nothing_written(tmp, out, err):
    assert "changed" in out  # the diff ran and printed its summary
    assert sorted(p.name for p in tmp.iterdir()) == ["base", "tuned"]  # no file beside the inputs


CASES = [
    Case("outputs-json-symlink-to-another-checkpoints-weights", _json_link_to_stranger_weights,
         says=("d.json", "model.safetensors", "a checkpoint's weights", "refusing"), check=_check_stranger_intact),
    Case("outputs-mask-out-symlink-to-another-checkpoints-weights", _mask_link_to_stranger_weights,
         says=("m.safetensors", "a checkpoint's weights"), check=_check_stranger_intact_no_json),
    Case("outputs-scores-out-symlink-to-a-lone-safetensors", _scores_link_to_lone_safetensors,
         says=("s.safetensors", "w.safetensors", "a checkpoint's weights"), check=_check_lone_intact),
    Case("outputs-json-symlink-to-a-torch-zip-state-dict", _json_onto("zip"),
         says=("i.json", "w.pt", "a checkpoint's weights"), check=_check_lone_intact),
    Case("outputs-json-symlink-to-a-legacy-torch-state-dict", _json_onto("legacy"),
         says=("i.json", "w.bin", "a checkpoint's weights"), check=_check_lone_intact),
    Case("outputs-json-new-file-inside-another-checkpoint", _json_inside_stranger("notes.json"),
         says=("notes.json", "lies inside the checkpoint", "other/ck"), check=_check_stranger_untouched),
    Case("outputs-json-onto-another-checkpoints-config", _json_inside_stranger("config.json"),
         says=("config.json", "lies inside the checkpoint"), check=_check_stranger_untouched),
    Case("outputs-json-inside-proc", _inspect_to("/proc/self/subnetscope-out.json"),
         says=("/proc/self/subnetscope-out.json", "virtual file system")),
    Case("outputs-json-onto-a-proc-file", _inspect_to("/proc/self/comm"),
         says=("/proc/self/comm", "virtual file system")),
    Case("outputs-json-inside-sys", _inspect_to("/sys/kernel/subnetscope-out.json"),
         says=("/sys/kernel/subnetscope-out.json", "virtual file system")),
    Case("outputs-mask-out-under-a-regular-file", _under_a_file, says=("f/m.safetensors", "not a directory"),
         check=_check_file_kept),
    Case("outputs-json-is-a-directory", _inspect_to(_a_directory), says=("adir", "is a directory")),
    Case("outputs-json-names-a-directory-with-a-trailing-slash", _inspect_to(lambda tmp: f"{tmp}/newdir/"),
         says=("newdir/", "names a directory"), check=_check_nothing_named_newdir),
    Case("outputs-json-is-a-socket", _inspect_to(_socket), says=("sock", "is a socket")),
    Case("outputs-json-fifo-without-a-reader", _inspect_to(_fifo), says=("fifo", "no process is reading")),
    Case("outputs-json-to-a-full-device", _inspect_to("/dev/full"), says=("/dev/full", "no space left on device")),
    Case("outputs-json-and-mask-out-both-stdout", _both_stdout, says=("given as both --json and --mask-out",)),
    Case("outputs-json-to-a-closed-file-descriptor", _inspect_to("/dev/fd/977"),
         says=("/dev/fd/977", "file descriptor 977, which is not open")),
    # discarded outputs are no clash: both may go to /dev/null
    Case("outputs-json-and-mask-out-both-devnull", _both_devnull, rc=0, check=_nothing_written),
]


@pytest.mark.parametrize("case", params(CASES))
def test_fault(case, tmp_path, capsys):
    run_case(case, tmp_path, capsys)
