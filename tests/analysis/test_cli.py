"""CLI contracts: inspect / align JSON, one-line errors with exit code 2, atomic outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from analysis.__main__ import main
from conftest import ROOT, tiny_gpt2, tiny_llama


def test_inspect_json(llama_sharded_dir, tmp_path, capsys):
    out = tmp_path / "o" / "inspect.json"
    assert main(["inspect", str(llama_sharded_dir), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    sd = tiny_llama().state_dict()
    assert d["total_params"] == 68_160
    assert {t["name"]: t["numel"] for t in d["tensors"]} == {k: v.numel() for k, v in sd.items()}
    assert (d["model_type"], d["num_layers"], d["hidden_size"], d["num_heads"], d["num_kv_heads"],
            d["head_dim"], d["intermediate_size"], d["vocab_size"], d["tie_word_embeddings"]) == \
        ("llama", 2, 64, 4, 2, 16, 96, 50, False)
    assert d["dtypes"] == {"float32": 68_160}
    assert "68,160" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["inspect.json"]  # no temp file left behind


def test_align_json(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama(seed=0).save_pretrained(a)
    tiny_llama(seed=1, vocab=52).save_pretrained(b)
    out = tmp_path / "align.json"
    assert main(["align", str(a), str(b), "--json", str(out)]) == 0
    d = json.loads(out.read_text())
    assert d["aligned"] == 21 and d["missing"] == [] and d["shape_mismatches"] == []
    assert [r["key"] for r in d["resized"]] == ["embed_tokens.weight", "lm_head.weight"]
    assert d["compared_params"] == 68_160


def test_error_exit_code_and_no_output_file(tmp_path, capsys):
    out = tmp_path / "x.json"
    assert main(["inspect", str(tmp_path / "missing-dir"), "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "missing-dir" in err
    assert not out.exists()


def test_align_different_architectures_exit_2(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny_llama().save_pretrained(a)
    tiny_gpt2().save_pretrained(b)
    assert main(["align", str(a), str(b)]) == 2
    assert "different architecture" in capsys.readouterr().err


def _run_cli(*args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "analysis", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_hub_unreachable_real_process(tmp_path):
    """A real process: hub id neither cached nor reachable -> one line on stderr, exit 2, no traceback."""
    r = _run_cli("inspect", "acme/never-cached", env_extra={
        "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_ETAG_TIMEOUT": "2",
        "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("error: acme/never-cached: hub id not in the local cache")
    assert "cannot be reached" in lines[0]


@pytest.mark.parametrize("argv", [["inspect"], ["frobnicate"], ["align", "only-one"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        code = main(argv)
        raise SystemExit(code)
    assert ei.value.code == 2


def test_every_command_that_reads_checkpoints_takes_quiet():
    import argparse

    from analysis.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    without = {name for name, p in sub.choices.items()
               if not any("--quiet" in a.option_strings for a in p._actions)}
    assert without == {"selectors", "run-queue", "run-job"}  # a listing and the app's workers (quiet already)


def test_help_does_not_import_torch():
    """`python -m analysis --help` builds every subcommand's parser without torch or transformers
    (their import is most of a command's start; bench/startup.py times it)."""
    code = ("import sys\nfrom analysis.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
