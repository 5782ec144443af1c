"""Outputs through a file descriptor, inside a fine-tune run directory, inside a hub snapshot."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from analysis.io import Inputs, OutputError, check_output_file
from conftest import tiny_llama


def test_descriptor_open_on_weights_or_input_is_refused(tmp_path):
    """`--json /dev/fd/3 3<>ck/model.safetensors` would write into the weights."""
    ck = tmp_path / "ck"
    tiny_llama().save_pretrained(ck)
    other = tmp_path / "other.safetensors"
    shutil.copy(ck / "model.safetensors", other)
    for target, inputs in ((ck / "model.safetensors", [ck]), (other, []), (ck / "config.json", [])):
        fd = os.open(target, os.O_RDWR)
        try:
            with pytest.raises(OutputError, match=f"file descriptor {fd}"):
                check_output_file(f"/dev/fd/{fd}", Inputs(inputs))
        finally:
            os.close(fd)
    plain = tmp_path / "out.json"
    fd = os.open(plain, os.O_RDWR | os.O_CREAT)
    try:
        assert check_output_file(f"/dev/fd/{fd}", Inputs([ck])) == Path(f"/dev/fd/{fd}")  # a file of the user's
    finally:
        os.close(fd)


def test_run_directory_with_our_mask_is_no_checkpoint(tmp_path):
    """A run's config.json (its options) beside our mask is no model directory."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"checkpoint": "x", "steps": 3}))  # a fine-tune's options
    import torch

    from analysis.sparsity.masks import save_mask

    save_mask(run / "mask.safetensors", {"w": torch.ones(3, dtype=torch.bool)}, source="t")
    assert check_output_file(run / "report.json", []) == (run / "report.json").resolve()
    assert check_output_file(run / "mask.safetensors", []) == (run / "mask.safetensors").resolve()


def test_hub_snapshot_file_linking_into_blobs_is_refused(tmp_path):
    """A snapshot's files are links into blobs/, which holds no config.json."""
    ck = tmp_path / "hub" / "snapshots" / "abc"
    blobs = tmp_path / "hub" / "blobs"
    ck.mkdir(parents=True)
    blobs.mkdir()
    tiny_llama().save_pretrained(tmp_path / "src")
    for name in ("config.json", "model.safetensors"):
        (blobs / name.replace(".", "_")).write_bytes((tmp_path / "src" / name).read_bytes())
        (ck / name).symlink_to(blobs / name.replace(".", "_"))
    with pytest.raises(OutputError, match="inside the checkpoint"):
        check_output_file(ck / "config.json", [])
